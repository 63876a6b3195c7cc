/**
 * Journals that need recovery, replayed in memory: transactions written into the journal by
 * debugfs (journal_open/journal_write: committed, revoked, escaped and uncommitted ones, with
 * every tag format: 32/64-bit block numbers, no checksum, csum v2, csum v3), then every block of
 * ubdcow's view compared with the same image after `e2fsck -fy` replayed it on a copy. The real
 * kernel's journal (a guest killed before unmount) is in test/uml/guest-journal.test.ts.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openGuestDisk } from '../../src/guestfs/disk-adapter.js';
import { openVolume } from '../../src/guestfs/guest-fs.js';
import { debugfsCat, md5OfFile, runProgram, ubdcow } from '../uml/harness.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

const missing = missingTools('mke2fs', 'debugfs', 'e2fsck', 'dumpe2fs');

async function ok(program: string, args: string[]): Promise<string> {
  const result = await runProgram(program, args);
  expect(result.status, `${program} ${args.join(' ')}: ${result.stderr}`).toBe(0);
  return result.stdout;
}

/** Physical blocks of a file, from debugfs `blocks`. */
async function blocksOf(image: string, file: string): Promise<number[]> {
  return (await ok('debugfs', ['-R', `blocks ${file}`, image])).trim().split(/\s+/).map(Number);
}

const variants = [
  { name: '1 KiB blocks, 64-bit tags, no journal checksums', mkfs: ['-b', '1024'], open: 'jo', features: /journal_64bit/ },
  { name: '1 KiB blocks, 32-bit tags, csum v2', mkfs: ['-b', '1024', '-O', '^64bit'], open: 'jo -c -v 2', features: /journal_checksum_v2/ },
  { name: '4 KiB blocks, 64-bit tags, csum v3', mkfs: ['-b', '4096'], open: 'jo -c -v 3', features: /journal_64bit journal_checksum_v3/ },
  // The old v1 journal_checksum: e2fsck finds debugfs's revoke-only transaction's CRC wrong and
  // stops replaying there, and so must ubdcow.
  { name: '4 KiB blocks, 32-bit tags, v1 journal_checksum', mkfs: ['-b', '4096', '-O', '^64bit,^metadata_csum'], open: 'jo -c', features: /journal_checksum(?!_)/ },
];

describe.skipIf(missing.length > 0)(titleWithSkipReason('journals written by debugfs, replayed in memory, against e2fsck', missing), () => {
  const tmp = useTempDir();

  for (const variant of variants) {
    it(`${variant.name}: every block reads as after e2fsck's replay; ls/get/diff --files see the replayed files and say so`, async () => {
      const tree = path.join(tmp.path, 'tree');
      fs.mkdirSync(path.join(tree, 'data'), { recursive: true });
      fs.writeFileSync(path.join(tree, 'data', 'keep.txt'), 'the old keep\n');
      fs.writeFileSync(path.join(tree, 'data', 'other.txt'), 'the old other\n');
      fs.writeFileSync(path.join(tree, 'data', 'third.txt'), 'the old third\n');
      const image = path.join(tmp.path, 'fs.img');
      await ok('mke2fs', ['-q', '-F', '-t', 'ext4', ...variant.mkfs, '-d', tree, image, '32M']);
      const base = path.join(tmp.path, 'base.img');
      fs.copyFileSync(image, base);
      const [keep] = await blocksOf(image, '/data/keep.txt');
      const [other] = await blocksOf(image, '/data/other.txt');
      const [third] = await blocksOf(image, '/data/third.txt');
      const bs = Number(/Block size:\s+(\d+)/.exec(await ok('dumpe2fs', ['-h', image]))![1]);
      const block = (name: string, head: Buffer) => {
        const file = path.join(tmp.path, name);
        fs.writeFileSync(file, Buffer.concat([head, Buffer.alloc(bs - head.length)]));
        return file;
      };
      const magic = Buffer.from('c03b3998', 'hex');
      const t1 = block('t1', Buffer.from('the new keep\n'));
      const t2 = path.join(tmp.path, 't2');
      fs.writeFileSync(t2, Buffer.concat([fs.readFileSync(block('t2a', Buffer.from('newer keep!!\n'))), fs.readFileSync(block('t2b', Buffer.from('revoked othe\n')))]));
      const t4 = block('t4', Buffer.concat([magic, Buffer.from('escaped\n!!')])); // starts with the jbd2 magic: logged escaped
      const t5 = block('t5', Buffer.from('NOT COMMITTED'));
      const script = path.join(tmp.path, 'journal.debugfs');
      fs.writeFileSync(
        script,
        [
          variant.open,
          `jw -b ${keep} ${t1}`, // transaction 1
          `jw -b ${keep},${other} ${t2}`, // 2: both
          `jw -r ${other} /dev/null`, // 3: revokes other: its copy in 2 must not be replayed
          `jw -b ${third} ${t4}`, // 4: an escaped block
          `jw -b ${keep} -c ${t5}`, // 5: never committed
          'jc',
          '',
        ].join('\n'),
      );
      await ok('debugfs', ['-w', '-f', script, image]);
      const header = await ok('dumpe2fs', ['-h', image]);
      expect(header).toMatch(/^Filesystem features:.*needs_recovery/m);
      expect(/^Journal features:(.*)$/m.exec(header)![1]).toMatch(variant.features);
      const truth = path.join(tmp.path, 'truth.img');
      fs.copyFileSync(image, truth);
      const fsck = await runProgram('e2fsck', ['-fy', truth]);
      expect(fsck.stdout).toMatch(/recovering journal/);
      const before = md5OfFile(image);

      // Every block but the superblock's (e2fsck clears needs_recovery there) and the journal's own.
      const disk = await openGuestDisk(image);
      let note: { file: string; transactions: number; blocks: number } | undefined;
      try {
        const opened = await openVolume(disk, undefined);
        expect(opened.journal!.transactions).toBeGreaterThan(0);
        note = opened.journal!;
        const journalBlocks = new Set(await blocksOf(image, '<8>'));
        const superblockBlock = bs === 1024 ? 1 : 0;
        const expected = fs.readFileSync(truth);
        const differing: number[] = [];
        for (let b = 0; b < opened.volume.sb.blocksCount; b++) {
          if (b === superblockBlock || journalBlocks.has(b)) continue;
          const ours = Buffer.from(await opened.source.read(b * bs, bs));
          if (!ours.equals(expected.subarray(b * bs, (b + 1) * bs))) differing.push(b);
        }
        expect(differing).toEqual([]);
      } finally {
        await disk.close();
      }

      const warning = new RegExp(`^ubdcow get: warning: .*fs\\.img: the ext4 journal needed recovery .*replayed in memory \\(${note!.transactions} transactions?, ${note!.blocks} blocks?\\)`);
      const changed: string[] = [];
      for (const file of ['/data/keep.txt', '/data/other.txt', '/data/third.txt']) {
        const got = await ubdcow(['get', image, file, '-o', path.join(tmp.path, 'out'), '--force']);
        expect(got.status, got.stderr).toBe(0);
        const replayed = await debugfsCat(truth, file);
        expect(fs.readFileSync(path.join(tmp.path, 'out')).equals(replayed), file).toBe(true);
        expect(got.stderr).toMatch(warning);
        if (!replayed.equals(await debugfsCat(base, file))) changed.push(`${file} content`);
      }
      // The journal changed something visible (else this test could not tell replay from none).
      expect(changed.length).toBeGreaterThan(0);
      const ls = await ubdcow(['ls', image, '/data', '--json']);
      expect(ls.status, ls.stderr).toBe(0);
      expect(JSON.parse(ls.stdout).journal).toEqual(note);

      const diff = await ubdcow(['diff', '--files', image, base, '--json']);
      expect(diff.status, diff.stderr).toBe(1);
      const result = JSON.parse(diff.stdout);
      expect(result.changes.map((c: { path: string; what: string[] }) => `${c.path} ${c.what.join(',')}`)).toEqual(changed);
      expect(result.journal).toEqual([note]);
      expect(md5OfFile(image)).toBe(before);
    });
  }

  it('marked as needing recovery with an empty log: nothing replayed, and said so', async () => {
    const image = path.join(tmp.path, 'empty-log.img');
    await ok('mke2fs', ['-q', '-F', '-t', 'ext3', image, '16M']);
    await ok('debugfs', ['-w', '-R', 'feature needs_recovery', image]);
    const ls = await ubdcow(['ls', image, '--json']);
    expect(ls.status, ls.stderr).toBe(0);
    expect(ls.stderr).toMatch(/marked as needing journal recovery, but its journal holds no committed transaction: nothing to replay/);
    expect(JSON.parse(ls.stdout).journal).toEqual({ file: image, transactions: 0, blocks: 0 });
  });

  it('an external journal device is refused by name when the file system needs recovery', async () => {
    const image = path.join(tmp.path, 'ext.img');
    // mke2fs -J device= wants a block device; the superblock fields are what matter: no journal
    // inode, the device's UUID and number (what mke2fs writes for an external journal).
    await ok('mke2fs', ['-q', '-F', '-t', 'ext4', '-O', '^has_journal', image, '32M']);
    const script = path.join(tmp.path, 'external.debugfs');
    fs.writeFileSync(script, 'feature has_journal needs_recovery\nssv journal_uuid 6c3b1a4e-1d2f-4a3b-9c8d-0123456789ab\nssv journal_dev 0x0811\n');
    await ok('debugfs', ['-w', '-f', script, image]);
    expect(await ok('dumpe2fs', ['-h', image])).toMatch(/^Journal UUID:\s+6c3b1a4e-1d2f-4a3b-9c8d-0123456789ab/m);
    for (const args of [['ls', image], ['get', image, '/lost+found'], ['diff', '--files', image, image]]) {
      const result = await ubdcow(args);
      expect(result.status, args.join(' ')).toBe(2);
      expect(result.stderr.trim().split('\n')).toEqual([expect.stringMatching(/ext\.img: the journal needs recovery .*, but the journal is on an external journal device \(UUID 6c3b1a4e-1d2f-4a3b-9c8d-0123456789ab, device 8:17\), and ubdcow replays internal journals only/)]);
    }
  });
});
