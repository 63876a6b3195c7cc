/**
 * Guest files without booting: a real UML guest changes files on an ext4 base (made with
 * `mke2fs -d`) through a ubdcow COW; on the host, `ubdcow diff --files`, `get` and `ls` must
 * agree with what the guest did and printed, and with debugfs on the merged image (truth from
 * e2fsprogs). Two guests on one base: `diff --files a.cow b.cow` must equal a comparison of the
 * two merged images' trees as debugfs rdump writes them out.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  UmlLab,
  expectGuestOk,
  filesWritten,
  markersNamed,
  md5,
  md5OfFile,
  missingUmlTools,
  runProgram,
  ubdcow,
  ubdcowJson,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';
import { debugfsListing } from '../helpers/debugfs-listing.js';

const missing = missingUmlTools();

interface Change {
  path: string;
  change: 'added' | 'removed' | 'modified';
  type: string;
  what: string[];
}

/** The base tree every guest starts from. */
function buildBaseTree(dir: string): void {
  const file = (rel: string, text: string) => {
    fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
    fs.writeFileSync(path.join(dir, rel), text);
  };
  file('data/append.txt', 'first line\n');
  file('data/trunc.bin', 'x'.repeat(5000));
  file('data/delete.txt', 'to be deleted\n');
  file('data/old-name.txt', 'renamed\n');
  file('data/mode.txt', 'mode\n');
  file('data/owner.txt', 'owner\n');
  file('data/same-size.bin', 'abcdefghijklmnopqrstuvwxyz');
  file('data/untouched.txt', 'nobody writes me\n');
  file('gone/keep.txt', 'keep\n');
  fs.mkdirSync(path.join(dir, 'gone', 'emptydir'), { recursive: true });
  file('tree-removed/a.txt', 'a\n');
  file('tree-removed/sub/b.txt', 'b\n');
  fs.mkdirSync(path.join(dir, 'links'), { recursive: true });
  fs.symlinkSync('../data/untouched.txt', path.join(dir, 'links', 'retarget'));
  for (let i = 0; i < 40; i++) file(`bulk/f${i}.txt`, `bulk file ${i}\n`.repeat(i + 1));
}

/* Every line changes something the host must find; each written file's md5 is printed. */
const guestA = `
mount -t ext4 /dev/ubdb /mnt
put /mnt new/created.bin 4096 3
echo appended >> /mnt/data/append.txt
sumfile /mnt data/append.txt
truncate -s 100 /mnt/data/trunc.bin
sumfile /mnt data/trunc.bin
rm /mnt/data/delete.txt
mv /mnt/data/old-name.txt /mnt/data/new-name.txt
chmod 600 /mnt/data/mode.txt
chown 1234:567 /mnt/data/owner.txt
ln -s ../data/append.txt /mnt/links/to-append
ln -sf ../data/append.txt /mnt/links/retarget
mkdir /mnt/madedir
mkdir /mnt/madedir/sub
rmdir /mnt/gone/emptydir
rm -r /mnt/tree-removed
printf 'ABCDEFGHIJ' | dd of=/mnt/data/same-size.bin bs=1 seek=3 conv=notrunc 2>/dev/null
sumfile /mnt data/same-size.bin
umount /mnt
`;

/* A second guest on the same base changes some of the same files differently. */
const guestB = `
mount -t ext4 /dev/ubdb /mnt
put /mnt new/other.bin 1000 2
echo other >> /mnt/data/append.txt
rm /mnt/data/untouched.txt
chmod 700 /mnt/data/mode.txt
mkdir /mnt/madedir
rm /mnt/bulk/f3.txt
put /mnt bulk/f4.txt 512 1
umount /mnt
`;

const expectedA: Change[] = [
  { path: '/', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/data', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/data/append.txt', change: 'modified', type: 'file', what: ['content', 'size', 'mtime'] },
  { path: '/data/delete.txt', change: 'removed', type: 'file', what: [] },
  { path: '/data/mode.txt', change: 'modified', type: 'file', what: ['mode'] },
  { path: '/data/new-name.txt', change: 'added', type: 'file', what: [] },
  { path: '/data/old-name.txt', change: 'removed', type: 'file', what: [] },
  { path: '/data/owner.txt', change: 'modified', type: 'file', what: ['owner'] },
  { path: '/data/same-size.bin', change: 'modified', type: 'file', what: ['content', 'mtime'] },
  { path: '/data/trunc.bin', change: 'modified', type: 'file', what: ['content', 'size', 'mtime'] },
  { path: '/gone', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/gone/emptydir', change: 'removed', type: 'dir', what: [] },
  { path: '/links', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/links/retarget', change: 'modified', type: 'symlink', what: ['target'] },
  { path: '/links/to-append', change: 'added', type: 'symlink', what: [] },
  { path: '/madedir', change: 'added', type: 'dir', what: [] },
  { path: '/madedir/sub', change: 'added', type: 'dir', what: [] },
  { path: '/new', change: 'added', type: 'dir', what: [] },
  { path: '/new/created.bin', change: 'added', type: 'file', what: [] },
  { path: '/tree-removed', change: 'removed', type: 'dir', what: [] },
  { path: '/tree-removed/a.txt', change: 'removed', type: 'file', what: [] },
  { path: '/tree-removed/sub', change: 'removed', type: 'dir', what: [] },
  { path: '/tree-removed/sub/b.txt', change: 'removed', type: 'file', what: [] },
];

/** For directories and replaced symlinks only the listed items are asserted (their times change too). */
function comparable(changes: Change[]): Change[] {
  return changes.map((c) => (c.type === 'dir' || c.type === 'symlink' ? { ...c, what: c.what.filter((w) => w !== 'mtime' && w !== 'size') } : c));
}

interface TreeNode {
  type: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  md5?: string;
  target?: string;
  entries?: string[];
}

/** The tree debugfs rdump writes out of a (merged, raw) image, as path -> attributes. */
async function rdumpTree(image: string, out: string): Promise<Map<string, TreeNode>> {
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { recursive: true });
  const dump = await runProgram('debugfs', ['-R', `rdump / ${out}`, image]);
  expect(dump.status, dump.stderr).toBe(0);
  const tree = new Map<string, TreeNode>();
  const visit = (host: string, guest: string) => {
    const st = fs.lstatSync(host);
    const node: TreeNode = {
      type: st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : st.isFile() ? 'file' : 'other',
      mode: st.mode & 0o7777,
      uid: st.uid,
      gid: st.gid,
      size: st.size,
      mtime: Math.floor(st.mtimeMs / 1000),
    };
    if (node.type === 'file') node.md5 = md5(fs.readFileSync(host));
    if (node.type === 'symlink') node.target = fs.readlinkSync(host);
    if (node.type === 'dir') {
      node.entries = fs.readdirSync(host).sort();
      for (const name of node.entries) visit(path.join(host, name), guest === '/' ? `/${name}` : `${guest}/${name}`);
    }
    tree.set(guest, node);
  };
  visit(out, '/');
  return tree;
}

/** What a tree comparison finds (times compared in whole seconds; rdump leaves symlink times alone). */
function compareTrees(a: Map<string, TreeNode>, b: Map<string, TreeNode>): Change[] {
  const changes: Change[] = [];
  for (const [p, na] of a) {
    const nb = b.get(p);
    if (!nb) {
      changes.push({ path: p, change: 'added', type: na.type, what: [] });
      continue;
    }
    const what: string[] = [];
    if (na.type !== nb.type) what.push('type');
    else {
      if (na.type === 'file' && na.md5 !== nb.md5) what.push('content');
      if (na.type === 'dir' && na.entries!.join('/') !== nb.entries!.join('/')) what.push('content');
      if ((na.type === 'file' || na.type === 'symlink') && na.size !== nb.size) what.push('size');
      if (na.type === 'symlink' && na.target !== nb.target) what.push('target');
      if (na.mode !== nb.mode && na.type !== 'symlink') what.push('mode');
      if (na.uid !== nb.uid || na.gid !== nb.gid) what.push('owner');
      if (na.mtime !== nb.mtime && na.type !== 'symlink' && na.type !== 'dir') what.push('mtime');
    }
    if (what.length > 0) changes.push({ path: p, change: 'modified', type: na.type, what });
  }
  for (const [p, nb] of b) if (!a.has(p)) changes.push({ path: p, change: 'removed', type: nb.type, what: [] });
  return changes.sort((x, y) => (x.path < y.path ? -1 : 1));
}

describe.skipIf(missing.length > 0)(umlSuiteTitle('guest files without booting: diff --files, get, ls against real guests and debugfs', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  let cowA: string;
  let cowB: string;
  let mergedA: string;
  let mergedB: string;
  let files: Map<string, { md5: string; bytes: number }>;
  let reads: Map<string, { md5: string; bytes: number }>;

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('guest-files');
    const tree = path.join(dir, 'tree');
    buildBaseTree(tree);
    base = path.join(dir, 'base.img');
    const mk = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', tree, base, '64M']);
    expect(mk.status, mk.stderr).toBe(0);
    cowA = path.join(dir, 'a.cow');
    cowB = path.join(dir, 'b.cow');
    for (const cow of [cowA, cowB]) expect((await ubdcow(['create', cow, base])).status).toBe(0);
    const resultA = expectGuestOk(await lab.run(guestA, { disks: { b: `${cowA},${base}` } }));
    files = filesWritten(resultA);
    reads = new Map(markersNamed(resultA, 'read').map(([file, sum, bytes]) => [file!, { md5: sum!, bytes: Number(bytes) }]));
    expectGuestOk(await lab.run(guestB, { disks: { b: `${cowB},${base}` } }));
    mergedA = path.join(dir, 'a-merged.img');
    mergedB = path.join(dir, 'b-merged.img');
    expect((await ubdcow(['commit', cowA, mergedA])).status).toBe(0);
    expect((await ubdcow(['commit', cowB, mergedB])).status).toBe(0);
  }, umlTestTimeout * 2);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('diff --files --json lists exactly the paths the guest changed, with the right change and what', async () => {
    const before = [md5OfFile(cowA), md5OfFile(base)];
    const { status, value } = await ubdcowJson(['diff', '--files', cowA], [1]);
    expect(status).toBe(1);
    expect(value.mode).toBe('smart');
    expect(comparable(value.changes)).toEqual(expectedA);
    expect([md5OfFile(cowA), md5OfFile(base)]).toEqual(before);
  });

  it('--deep (every file compared) and the merged image against the base (unrelated images, full walk) give the same answer', async () => {
    const smart = await ubdcowJson(['diff', '--files', cowA], [1]);
    const deep = await ubdcowJson(['diff', '--files', '--deep', cowA], [1]);
    const raw = await ubdcowJson(['diff', '--files', mergedA, base], [1]);
    expect(deep.value.mode).toBe('full');
    expect(raw.value.mode).toBe('full');
    expect(deep.value.changes).toEqual(smart.value.changes);
    expect(raw.value.changes).toEqual(smart.value.changes);
    // The merged image is the COW's view: no file differs.
    const same = await ubdcow(['diff', '--files', cowA, mergedA]);
    expect(same.status, same.stderr).toBe(0);
    expect(same.stdout).toBe('');
  });

  it('get returns the bytes the guest wrote and read back (md5 as the guest printed), symlinks resolved in the guest', async () => {
    const expected = new Map([...files, ...reads]);
    expect(expected.size).toBe(4);
    for (const [file, { md5: sum, bytes }] of expected) {
      const out = path.join(dir, `got-${path.basename(file)}`);
      const got = await ubdcow(['get', cowA, `/${file}`, '-o', out]);
      expect(got.status, got.stderr).toBe(0);
      expect(fs.statSync(out).size, file).toBe(bytes);
      expect(md5OfFile(out), file).toBe(sum);
    }
    const viaLink = path.join(dir, 'via-link');
    expect((await ubdcow(['get', cowA, '/links/to-append', '-o', viaLink])).status).toBe(0);
    expect(md5OfFile(viaLink)).toBe(reads.get('data/append.txt')!.md5);
  });

  it('ls -R --json agrees with debugfs ls -p on the merged image (every path, type, mode, uid, gid, size)', async () => {
    const { value } = await ubdcowJson(['ls', cowA, '-R']);
    const ours = new Map<string, string>(
      value.entries.map((e: { path: string; type: string; mode: number; uid: number; gid: number; size: number }) => [
        e.path,
        `${e.type} ${e.mode.toString(8)} ${e.uid} ${e.gid} ${e.type === 'dir' ? '' : e.size}`,
      ]),
    );
    const theirs = await debugfsListing(mergedA);
    expect(theirs.size).toBeGreaterThan(50);
    expect(ours).toEqual(theirs);
  });

  it('two guests on one base: diff --files a.cow b.cow equals the comparison of their rdump trees', async () => {
    const { status, value } = await ubdcowJson(['diff', '--files', cowA, cowB], [1]);
    expect(status).toBe(1);
    expect(value.mode).toBe('smart');
    const treeA = await rdumpTree(mergedA, path.join(dir, 'rdump-a'));
    const treeB = await rdumpTree(mergedB, path.join(dir, 'rdump-b'));
    const truth = compareTrees(treeA, treeB);
    // rdump cannot carry symlink times and host directory sizes differ: those are left out of both sides.
    const ours = (value.changes as Change[]).map((c) => ({
      ...c,
      what: c.what.filter((w) => !(w === 'mtime' && (c.type === 'symlink' || c.type === 'dir')) && !(w === 'size' && c.type === 'dir')),
    })).filter((c) => c.change !== 'modified' || c.what.length > 0);
    expect(ours).toEqual(truth);
    expect(truth.length).toBeGreaterThan(20);
  });

  it('a guest that never unmounts its ext3 leaves a journal needing recovery: ls and diff --files replay it in memory, say so and write nothing', async () => {
    const scratch = lab.scratch('unclean-ext3');
    const tree = path.join(scratch, 'tree');
    buildBaseTree(tree);
    const ext3 = path.join(scratch, 'ext3.img');
    const mk = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext3', '-d', tree, ext3, '32M']);
    expect(mk.status, mk.stderr).toBe(0);
    const cow = path.join(scratch, 'unclean.cow');
    expect((await ubdcow(['create', cow, ext3])).status).toBe(0);
    // sync commits to the journal; poweroff -f without umount leaves needs_recovery set.
    const body = 'mount -t ext3 /dev/ubdb /mnt\nput /mnt unclean.bin 4096 2\nsync';
    expectGuestOk(await lab.run(body, { disks: { b: `${cow},${ext3}` } }));
    const features = await runProgram('dumpe2fs', ['-h', ext3]);
    expect(features.stdout).not.toMatch(/needs_recovery/);
    const before = [md5OfFile(cow), md5OfFile(ext3)];
    const ls = await ubdcow(['ls', cow, '/data']);
    expect(ls.status, ls.stderr).toBe(0);
    expect(ls.stdout.split('\n')).toContain('append.txt');
    // sync may or may not have written everything home before power-off; either way it is said.
    const said = /unclean\.cow: the ext3 (journal needed recovery .*: replayed in memory|file system is marked as needing journal recovery, but .*nothing to replay)/;
    expect(ls.stderr).toMatch(said);
    const diff = await ubdcow(['diff', '--files', cow]);
    expect(diff.status, diff.stderr).toBe(1);
    expect(diff.stdout.split('\n')).toContain('+ /unclean.bin');
    expect(diff.stderr).toMatch(said);
    expect([md5OfFile(cow), md5OfFile(ext3)]).toEqual(before);
  }, umlTestTimeout);

  it('--checksum gives the SHA-256 of both sides of a changed file', async () => {
    const { value } = await ubdcowJson(['diff', '--files', '--checksum', cowA], [1]);
    const append = value.changes.find((c: Change) => c.path === '/data/append.txt');
    const bytes = fs.readFileSync(path.join(dir, 'got-append.txt'));
    expect(append.sha256.a).toBe(createHash('sha256').update(bytes).digest('hex'));
    expect(append.sha256.b).toBe(createHash('sha256').update('first line\n').digest('hex'));
  });
});
