/**
 * Guest file systems without a guest: images built and changed by e2fsprogs (mke2fs -d,
 * debugfs -w), COWs holding exactly the sectors debugfs changed (written through the engine),
 * then ubdcow's view compared with what e2fsprogs says: dumpe2fs for the layout, debugfs for
 * listings and bytes. ext2, ext3, ext4, 1 KiB and 4 KiB blocks, MBR and GPT disks, bad input.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import { diffFiles } from '../../src/guestfs/diff-files.js';
import { openGuestFs } from '../../src/guestfs/guest-fs.js';
import { parseGroupDescriptors, parseSuperblock, descriptorBlocks } from '../../src/guestfs/ext-layout.js';
import { debugfsCat, md5OfFile, runProgram, ubdcow } from '../uml/harness.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { debugfsListing, lsJsonListing } from '../helpers/debugfs-listing.js';

const missing = missingTools('mke2fs', 'debugfs', 'dumpe2fs');

function buildTree(dir: string): void {
  const file = (rel: string, text: string | Uint8Array) => {
    fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
    fs.writeFileSync(path.join(dir, rel), text);
  };
  for (const name of ['delete.txt', 'mode.txt', 'owner.txt', 'touch.txt', 'old.txt', 'keep.txt']) file(`data/${name}`, `${name}\n`);
  const big = new Uint8Array(3 << 20);
  for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
  file('data/big.bin', big);
  for (let i = 0; i < 30; i++) file(`many/sub${i % 3}/f${i}`, `file ${i}\n`.repeat(i * 50 + 1));
  fs.symlinkSync('../data/keep.txt', path.join(dir, 'data', 'keep-link'));
}

async function mkfs(tree: string, image: string, type: string, blockSize: number, size = '24M'): Promise<void> {
  const result = await runProgram('mke2fs', ['-q', '-F', '-t', type, '-b', String(blockSize), '-d', tree, image, size]);
  expect(result.status, result.stderr).toBe(0);
}

async function debugfsWrite(image: string, commands: string[]): Promise<void> {
  const script = `${image}.debugfs`;
  fs.writeFileSync(script, `${commands.join('\n')}\n`);
  const result = await runProgram('debugfs', ['-w', '-f', script, image]);
  expect(result.status, result.stderr).toBe(0);
  expect(result.stderr.split('\n').filter((line) => line && !line.startsWith('debugfs ')), result.stderr).toEqual([]);
}

/** A COW over `base` whose view is `changed`: the differing sectors written through the engine. */
async function cowBetween(base: string, changed: string, cow: string): Promise<number> {
  await createCow(cow, base);
  const device = await openCow(cow);
  const a = fs.readFileSync(base);
  const b = fs.readFileSync(changed);
  let written = 0;
  try {
    for (let at = 0; at < a.length; at += 512) {
      if (a.compare(b, at, at + 512, at, at + 512) !== 0) {
        await device.write(at, b.subarray(at, at + 512));
        written++;
      }
    }
  } finally {
    await device.close();
  }
  return written;
}

const changes = (host: string) => [
  `write ${host} /data/new.txt`,
  'rm /data/delete.txt',
  'mkdir /newdir',
  'symlink /data/link ../data/keep.txt',
  'sif /data/mode.txt mode 0100600',
  'sif /data/owner.txt uid 1234',
  'sif /data/touch.txt mtime 20200102030405',
  'link /data/old.txt /data/renamed.txt',
  'unlink /data/old.txt',
];

const expected = [
  { path: '/', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/data', change: 'modified', type: 'dir', what: ['content'] },
  { path: '/data/delete.txt', change: 'removed', type: 'file', what: [] },
  { path: '/data/link', change: 'added', type: 'symlink', what: [] },
  { path: '/data/mode.txt', change: 'modified', type: 'file', what: ['mode'] },
  { path: '/data/new.txt', change: 'added', type: 'file', what: [] },
  { path: '/data/old.txt', change: 'removed', type: 'file', what: [] },
  { path: '/data/owner.txt', change: 'modified', type: 'file', what: ['owner'] },
  { path: '/data/renamed.txt', change: 'added', type: 'file', what: [] },
  { path: '/data/touch.txt', change: 'modified', type: 'file', what: ['mtime'] },
  { path: '/newdir', change: 'added', type: 'dir', what: [] },
];

function dirsContentOnly<T extends { type: string; what: string[] }>(list: T[]): T[] {
  return list.map((c) => (c.type === 'dir' ? { ...c, what: c.what.filter((w) => w === 'content') } : c));
}


const variants = [
  { type: 'ext2', blockSize: 1024 },
  { type: 'ext3', blockSize: 1024 },
  { type: 'ext3', blockSize: 4096 },
  { type: 'ext4', blockSize: 1024 },
  { type: 'ext4', blockSize: 4096 },
];

describe.skipIf(missing.length > 0)(titleWithSkipReason('guest file systems built and changed by e2fsprogs', missing), () => {
  const tmp = useTempDir();

  for (const { type, blockSize } of variants) {
    describe(`${type}, ${blockSize}-byte blocks`, () => {
      it('superblock and group descriptors decode to what dumpe2fs prints (inode tables, sizes, counts)', async () => {
        const tree = path.join(tmp.path, 'tree');
        buildTree(tree);
        const image = path.join(tmp.path, 'fs.img');
        await mkfs(tree, image, type, blockSize, blockSize === 4096 ? '300M' : '40M');
        const bytes = fs.readFileSync(image);
        const sb = parseSuperblock(bytes.subarray(1024, 2048));
        const table = Buffer.concat(descriptorBlocks(sb).map((b) => bytes.subarray(b * sb.blockSize, (b + 1) * sb.blockSize)));
        const groups = parseGroupDescriptors(sb, table);
        const dump = (await runProgram('dumpe2fs', [image])).stdout;
        const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(dump)![1]);
        expect(sb.blockSize).toBe(field('Block size'));
        expect(sb.inodeSize).toBe(field('Inode size'));
        expect(sb.inodesPerGroup).toBe(field('Inodes per group'));
        expect(sb.inodesCount).toBe(field('Inode count'));
        expect(sb.blocksCount).toBe(field('Block count'));
        expect(sb.kind).toBe(type);
        const tables = [...dump.matchAll(/Inode table at (\d+)-(\d+)/g)].map((m) => Number(m[1]));
        expect(tables.length).toBe(sb.groupCount);
        expect(groups.map((g) => g.inodeTable)).toEqual(tables);
        expect(sb.groupCount).toBeGreaterThan(1);
      });

      it('diff --files of a COW holding debugfs\'s changes lists exactly them; --deep and raw-vs-raw agree; get and ls match debugfs', async () => {
        const tree = path.join(tmp.path, 'tree');
        buildTree(tree);
        const base = path.join(tmp.path, 'base.img');
        await mkfs(tree, base, type, blockSize);
        const changed = path.join(tmp.path, 'changed.img');
        fs.copyFileSync(base, changed);
        const newFile = path.join(tmp.path, 'new.txt');
        fs.writeFileSync(newFile, 'a new file\n'.repeat(300));
        await debugfsWrite(changed, changes(newFile));
        const cow = path.join(tmp.path, 'vm.cow');
        expect(await cowBetween(base, changed, cow)).toBeGreaterThan(0);
        const before = [md5OfFile(cow), md5OfFile(base)];

        const smart = await diffFiles(cow);
        expect(smart.mode).toBe('smart');
        expect(dirsContentOnly(smart.changes)).toEqual(expected);
        const deep = await diffFiles(cow, undefined, { deep: true });
        expect(deep.mode).toBe('full');
        expect(deep.changes).toEqual(smart.changes);
        const raw = await diffFiles(changed, base);
        expect(raw.changes).toEqual(smart.changes);
        // The smart path never read the untouched files.
        expect(smart.stats.filesRead).toBeLessThan(deep.stats.filesRead);
        // Two COWs whose backings are one file by two names (a hard link) share a base: the
        // candidates still come from what the COWs hold. A copy of the base is another file.
        const hardLink = path.join(tmp.path, 'base-link.img');
        fs.linkSync(base, hardLink);
        const linked = path.join(tmp.path, 'over-link.cow');
        await createCow(linked, hardLink);
        const viaLink = await diffFiles(cow, linked);
        expect(viaLink.mode).toBe('smart');
        expect(viaLink.changes).toEqual(smart.changes);
        const copy = path.join(tmp.path, 'base-copy.img');
        fs.copyFileSync(base, copy, fs.constants.COPYFILE_FICLONE);
        fs.utimesSync(copy, fs.statSync(base).atime, fs.statSync(base).mtime);
        const overCopy = path.join(tmp.path, 'over-copy.cow');
        await createCow(overCopy, copy);
        const viaCopy = await diffFiles(cow, overCopy);
        expect(viaCopy.mode).toBe('full');
        expect(viaCopy.fullReason).toMatch(/do not share a backing file/);
        expect(viaCopy.changes).toEqual(smart.changes);

        const guest = await openGuestFs(cow);
        try {
          for (const file of ['/data/new.txt', '/data/big.bin', '/data/renamed.txt', '/many/sub1/f28', '/data/link']) {
            const ours = Buffer.from(await guest.readFile(file));
            const theirs = await debugfsCat(changed, file === '/data/link' ? '/data/keep.txt' : file);
            expect(ours.length, file).toBe(theirs.length);
            expect(ours.equals(theirs), file).toBe(true);
          }
          expect(await guest.readlink('/data/link')).toBe('../data/keep.txt');
          // readdir (names only) and list (names with their inodes) agree.
          for (const dir of ['/', '/data', '/many/sub1']) {
            expect((await guest.list(dir)).map((e) => e.name), dir).toEqual(await guest.readdir(dir));
          }
        } finally {
          await guest.close();
        }
        const bigOut = path.join(tmp.path, 'big.out');
        const got = await ubdcow(['get', cow, '/data/big.bin', '-o', bigOut]);
        expect(got.status, got.stderr).toBe(0);
        expect(md5OfFile(bigOut)).toBe(md5OfFile(path.join(tree, 'data', 'big.bin')));

        const ls = await ubdcow(['ls', cow, '-R', '--json']);
        expect(ls.status, ls.stderr).toBe(0);
        const ours = lsJsonListing(ls.stdout);
        expect(ours).toEqual(await debugfsListing(changed));
        expect([md5OfFile(cow), md5OfFile(base)]).toEqual(before);
      });
    });
  }

  it('a file system marked as needing recovery with an empty log: a warning, and the image is not written', async () => {
    const tree = path.join(tmp.path, 'tree');
    buildTree(tree);
    const image = path.join(tmp.path, 'ext3.img');
    await mkfs(tree, image, 'ext3', 1024);
    await debugfsWrite(image, ['feature needs_recovery']);
    const before = md5OfFile(image);
    const mtime = fs.statSync(image).mtimeMs;
    const guest = await openGuestFs(image);
    expect(guest.warnings.join('\n')).toMatch(/marked as needing journal recovery, but its journal holds no committed transaction/);
    expect(await guest.readdir('/data')).toContain('keep.txt');
    await guest.close();
    const ls = await ubdcow(['ls', image]);
    expect(ls.status).toBe(0);
    expect(ls.stderr).toMatch(/^ubdcow ls: warning: .*nothing to replay/);
    expect(md5OfFile(image)).toBe(before);
    expect(fs.statSync(image).mtimeMs).toBe(mtime);
  });
});

/* ------------------------------------------------------------------------------------------- */
/* Partitioned disks                                                                             */

function guidBytes(guid: string): Buffer {
  const hex = guid.replace(/-/g, '');
  const b = Buffer.from(hex, 'hex');
  // The first three fields are stored little-endian.
  return Buffer.concat([Buffer.from(b.subarray(0, 4)).reverse(), Buffer.from(b.subarray(4, 6)).reverse(), Buffer.from(b.subarray(6, 8)).reverse(), b.subarray(8)]);
}

const LINUX = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const ESP = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';

/** A GPT disk (protective MBR, primary and backup tables) with the given partitions, in sectors. */
function writeGpt(file: string, sectors: number, parts: Array<{ type: string; first: number; last: number; name: string }>): void {
  const disk = Buffer.alloc(sectors * 512);
  disk[446 + 4] = 0xee;
  disk.writeUInt32LE(1, 446 + 8);
  disk.writeUInt32LE(Math.min(sectors - 1, 0xffffffff), 446 + 12);
  disk[510] = 0x55;
  disk[511] = 0xaa;
  const entries = Buffer.alloc(128 * 128);
  parts.forEach((p, i) => {
    const e = entries.subarray(i * 128);
    guidBytes(p.type).copy(e, 0);
    guidBytes(`00000000-0000-4000-8000-00000000000${i + 1}`).copy(e, 16);
    e.writeBigUInt64LE(BigInt(p.first), 32);
    e.writeBigUInt64LE(BigInt(p.last), 40);
    Buffer.from(p.name, 'utf16le').copy(e, 56);
  });
  const header = (current: number, backup: number, entriesLba: number) => {
    const h = Buffer.alloc(92);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x00010000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(BigInt(current), 24);
    h.writeBigUInt64LE(BigInt(backup), 32);
    h.writeBigUInt64LE(34n, 40);
    h.writeBigUInt64LE(BigInt(sectors - 34), 48);
    guidBytes('12345678-1234-4234-8234-123456789ABC').copy(h, 56);
    h.writeBigUInt64LE(BigInt(entriesLba), 72);
    h.writeUInt32LE(128, 80);
    h.writeUInt32LE(128, 84);
    h.writeUInt32LE(crc32(entries), 88);
    h.writeUInt32LE(crc32(h), 16);
    return h;
  };
  header(1, sectors - 1, 2).copy(disk, 512);
  entries.copy(disk, 1024);
  entries.copy(disk, (sectors - 33) * 512);
  header(sectors - 1, 1, sectors - 33).copy(disk, (sectors - 1) * 512);
  fs.writeFileSync(file, disk);
}

/** An MBR disk with primary partitions (type, first sector, sector count). */
function writeMbr(file: string, sectors: number, parts: Array<{ type: number; first: number; count: number }>): void {
  const disk = Buffer.alloc(sectors * 512);
  parts.forEach((p, i) => {
    const at = 446 + i * 16;
    disk[at + 4] = p.type;
    disk.writeUInt32LE(p.first, at + 8);
    disk.writeUInt32LE(p.count, at + 12);
  });
  disk[510] = 0x55;
  disk[511] = 0xaa;
  fs.writeFileSync(file, disk);
}

function place(disk: string, image: string, sector: number): void {
  const fd = fs.openSync(disk, 'r+');
  fs.writeSync(fd, fs.readFileSync(image), 0, fs.statSync(image).size, sector * 512);
  fs.closeSync(fd);
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('partitioned disks (GPT and MBR) and bad input', missing), () => {
  const tmp = useTempDir();

  it('GPT: the only Linux partition is found by itself, --partition N picks one, a non-ext partition says what it holds', async () => {
    const tree = path.join(tmp.path, 'tree');
    buildTree(tree);
    const fsImage = path.join(tmp.path, 'part.img');
    await mkfs(tree, fsImage, 'ext4', 4096, '16M');
    const disk = path.join(tmp.path, 'gpt.img');
    const sectors = 40 * 2048;
    writeGpt(disk, sectors, [
      { type: ESP, first: 2048, last: 2048 + 8 * 2048 - 1, name: 'esp' },
      { type: LINUX, first: 10 * 2048, last: 10 * 2048 + 16 * 2048 - 1, name: 'root' },
    ]);
    place(disk, fsImage, 10 * 2048);
    if (missingTools('partx').length === 0) {
      // util-linux reads the same table.
      const partx = await runProgram('partx', ['--show', '-g', '-o', 'NR,START,SECTORS', disk]);
      expect(partx.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/).map(Number))).toEqual([
        [1, 2048, 8 * 2048],
        [2, 10 * 2048, 16 * 2048],
      ]);
    }
    const cow = path.join(tmp.path, 'gpt.cow');
    await createCow(cow, disk);
    for (const args of [[], ['--partition', '2']]) {
      const ls = await ubdcow(['ls', cow, '/data', ...args]);
      expect(ls.status, ls.stderr).toBe(0);
      expect(ls.stdout.split('\n')).toContain('keep.txt');
    }
    const got = await ubdcow(['get', cow, '/data/big.bin', '-o', path.join(tmp.path, 'big'), '--partition', '2']);
    expect(got.status, got.stderr).toBe(0);
    expect(md5OfFile(path.join(tmp.path, 'big'))).toBe(md5OfFile(path.join(tree, 'data', 'big.bin')));
    const esp = await ubdcow(['ls', cow, '--partition', '1']);
    expect(esp.status).toBe(2);
    expect(esp.stderr).toMatch(/^ubdcow ls: .*gpt\.cow partition 1 holds only zeros in its first \d+ bytes .*, not an ext2\/3\/4 file system$/m);
    const none = await ubdcow(['ls', cow, '--partition', '3']);
    expect(none.status).toBe(2);
    expect(none.stderr).toMatch(/has no partition 3 \(it has 1, 2\)/);
  });

  it('MBR with two Linux partitions: without --partition a one-line error lists them; --partition 2 reads the second', async () => {
    const tree = path.join(tmp.path, 'tree');
    buildTree(tree);
    const one = path.join(tmp.path, 'one.img');
    const two = path.join(tmp.path, 'two.img');
    await mkfs(tree, one, 'ext2', 1024, '8M');
    fs.rmSync(path.join(tree, 'many'), { recursive: true });
    await mkfs(tree, two, 'ext4', 1024, '8M');
    const disk = path.join(tmp.path, 'mbr.img');
    writeMbr(disk, 20 * 2048, [
      { type: 0x83, first: 2048, count: 8 * 2048 },
      { type: 0x83, first: 10 * 2048, count: 8 * 2048 },
    ]);
    place(disk, one, 2048);
    place(disk, two, 10 * 2048);
    const which = await ubdcow(['ls', disk]);
    expect(which.status).toBe(2);
    expect(which.stderr.trim().split('\n')).toHaveLength(1);
    expect(which.stderr).toMatch(/MBR disk with 2 Linux partitions: 1 .*, 2 .*; choose one with --partition N/);
    const ls2 = await ubdcow(['ls', disk, '--partition', '2']);
    expect(ls2.stdout.split('\n')).not.toContain('many');
    const ls1 = await ubdcow(['ls', disk, '--partition', '1']);
    expect(ls1.stdout.split('\n')).toContain('many');
  });

  it('bad input: no file system, corrupt superblock, missing path, symlink loop: one line, exit 2, nothing modified', async () => {
    const tree = path.join(tmp.path, 'tree');
    buildTree(tree);
    const good = path.join(tmp.path, 'good.img');
    await mkfs(tree, good, 'ext4', 1024, '8M');
    await debugfsWrite(good, ['symlink /loop1 /loop2', 'symlink /loop2 loop1', 'mkdir /deep', 'symlink /deep/x /loop1']);
    const zeros = path.join(tmp.path, 'zeros.img');
    fs.writeFileSync(zeros, Buffer.alloc(8 << 20));
    const emptyCow = path.join(tmp.path, 'empty.cow');
    await createCow(emptyCow, zeros);
    const corrupt = path.join(tmp.path, 'corrupt.img');
    fs.copyFileSync(good, corrupt);
    const fd = fs.openSync(corrupt, 'r+');
    fs.writeSync(fd, Buffer.from([99, 0, 0, 0]), 0, 4, 1024 + 0x18); // s_log_block_size
    fs.closeSync(fd);
    const xfsLike = path.join(tmp.path, 'xfs.img');
    const xfs = Buffer.alloc(1 << 20);
    xfs.write('XFSB', 0, 'latin1');
    fs.writeFileSync(xfsLike, xfs);
    const all = [good, zeros, emptyCow, corrupt, xfsLike];
    const snapshot = () => all.map((f) => `${md5OfFile(f)} ${fs.statSync(f).mtimeMs}`);
    const before = snapshot();

    const cases: Array<{ args: string[]; message: RegExp }> = [
      { args: ['ls', emptyCow], message: /empty\.cow: no ext2\/3\/4 file system and no partition table; the disk holds only zeros/ },
      { args: ['diff', '--files', emptyCow], message: /empty\.cow: no ext2\/3\/4 file system/ },
      { args: ['ls', xfsLike], message: /holds an XFS file system/ },
      { args: ['ls', corrupt], message: /corrupt\.img: .*block size field is 99/ },
      { args: ['get', good, '/data/missing.txt'], message: /good\.img: \/data\/missing\.txt: no such file or directory in the guest/ },
      { args: ['ls', good, '/nowhere'], message: /no such file or directory in the guest/ },
      { args: ['get', good, '/loop1'], message: /\/loop1: too many levels of symbolic links in the guest/ },
      { args: ['get', good, '/deep/x', '-o', path.join(tmp.path, 'never')], message: /too many levels of symbolic links/ },
      { args: ['get', good, '/data'], message: /\/data: is a dir, not a regular file/ },
      { args: ['diff', '--files', good], message: /is not a COW file, so there is no backing file/ },
      { args: ['diff', good, good, '--deep'], message: /--deep only applies with --files/ },
      { args: ['diff', '--files', good, good, '--stat'], message: /files and stat are mutually exclusive/ },
    ];
    for (const { args, message } of cases) {
      const result = await ubdcow(args);
      expect(result.status, `${args.join(' ')}: ${result.stderr}`).toBe(2);
      const lines = result.stderr.trim().split('\n');
      expect(lines, args.join(' ')).toHaveLength(1);
      expect(lines[0], args.join(' ')).toMatch(message);
      expect(lines[0]).not.toMatch(/internal error|at .*\.js/);
    }
    expect(fs.existsSync(path.join(tmp.path, 'never'))).toBe(false);
    expect(snapshot()).toEqual(before);
  });
});
