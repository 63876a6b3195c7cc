/**
 * Disk and file-system layouts the guest-file commands must read as Linux does: partition tables
 * with gaps (numbered as sfdisk/sgdisk wrote them and partx reads them), partitions holding swap or
 * FAT, and valid ext4 variants made by mke2fs (bigalloc, 64 KiB blocks, casefold, mmp) checked
 * against debugfs; an unknown incompatible feature is refused the same way by ls, get and diff.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { readPartitionTable } from '../../src/guestfs/partition-table.js';
import { debugfsCat, md5OfFile, runProgram, ubdcow } from '../uml/harness.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { debugfsListing, lsJsonListing } from '../helpers/debugfs-listing.js';

const missing = missingTools('mke2fs', 'debugfs', 'sfdisk', 'sgdisk', 'partx', 'mkswap', 'mkfs.vfat');

async function ok(program: string, args: string[], input?: string): Promise<string> {
  const result = input === undefined ? await runProgram(program, args) : await runWithInput(program, args, input);
  expect(result.status, `${program} ${args.join(' ')}: ${result.stderr}`).toBe(0);
  return result.stdout;
}

async function runWithInput(program: string, args: string[], input: string): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const { spawnSync } = await import('node:child_process');
  const result = spawnSync(program, args, { input, encoding: 'utf8' });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** An ext4 file system with one file, /id.txt, saying `text`, written into `disk` at `sector`. */
async function extAt(dir: string, disk: string, sector: number, sizeKiB: number, text: string): Promise<void> {
  const tree = path.join(dir, `tree-${sector}`);
  fs.mkdirSync(tree, { recursive: true });
  fs.writeFileSync(path.join(tree, 'id.txt'), text);
  await ok('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '1024', '-E', `offset=${sector * 512}`, '-d', tree, disk, `${sizeKiB}k`]);
}

/** Writes a file's bytes into `disk` at `sector` (the disk keeps its size). */
function place(disk: string, image: string, sector: number): void {
  const fd = fs.openSync(disk, 'r+');
  fs.writeSync(fd, fs.readFileSync(image), 0, fs.statSync(image).size, sector * 512);
  fs.closeSync(fd);
}

async function partx(disk: string): Promise<number[][]> {
  const out = await ok('partx', ['--show', '-g', '-o', 'NR,START,SECTORS', disk]);
  return out.trim().split('\n').map((line) => line.trim().split(/\s+/).map(Number));
}

async function ourTable(disk: string): Promise<number[][]> {
  const fd = fs.openSync(disk, 'r');
  try {
    const table = await readPartitionTable(async (offset, length) => {
      const buffer = new Uint8Array(length);
      fs.readSync(fd, buffer, 0, length, offset);
      return buffer;
    }, fs.statSync(disk).size);
    return (table?.partitions ?? []).map((p) => [p.number, p.offset / 512, p.size / 512]);
  } finally {
    fs.closeSync(fd);
  }
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('partition tables with gaps, and what a non-ext partition holds', missing), () => {
  const tmp = useTempDir();

  it('MBR with slots 1 and 3, an extended partition 4 and logical 5 and 6: numbered as partx numbers them; --partition 2 names the ones that exist', async () => {
    const disk = path.join(tmp.path, 'mbr.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 40 << 20);
    await ok('sfdisk', ['-q', disk], 'label: dos\n1: start=2048, size=8192, type=83\n3: start=12288, size=8192, type=83\n4: start=22528, size=18432, type=5\n5: start=24576, size=8192, type=83\n6: start=34816, size=4096, type=82\n');
    const table = await partx(disk);
    expect(table.map((row) => row[0])).toEqual([1, 3, 4, 5, 6]);
    expect(await ourTable(disk)).toEqual(table);
    const start = new Map(table.map((row) => [row[0]!, row[1]!]));
    await extAt(tmp.path, disk, start.get(1)!, 4096, 'partition 1\n');
    await extAt(tmp.path, disk, start.get(3)!, 4096, 'partition 3\n');
    await extAt(tmp.path, disk, start.get(5)!, 4096, 'partition 5\n');
    const swap = path.join(tmp.path, 'swap.img');
    fs.writeFileSync(swap, Buffer.alloc(2 << 20));
    await ok('mkswap', [swap]);
    place(disk, swap, start.get(6)!);
    const before = md5OfFile(disk);

    for (const n of [1, 3, 5]) {
      const got = await ubdcow(['get', disk, '/id.txt', '--partition', String(n)]);
      expect(got.status, got.stderr).toBe(0);
      expect(got.stdout).toBe(`partition ${n}\n`);
    }
    // Three Linux partitions: without --partition the error lists them by their real numbers.
    const which = await ubdcow(['ls', disk]);
    expect(which.status).toBe(2);
    expect(which.stderr).toMatch(/MBR disk with 3 Linux partitions: 1 \(type 0x83, 4194304 bytes\), 3 .*, 4 \(type 0x5, .*\), 5 .*, 6 \(type 0x82, .*\); choose one with --partition N/);
    for (const command of [['get', disk, '/id.txt'], ['ls', disk], ['diff', '--files', disk, disk]]) {
      const gap = await ubdcow([...command, '--partition', '2']);
      expect(gap.status, command.join(' ')).toBe(2);
      expect(gap.stdout).toBe('');
      expect(gap.stderr.trim().split('\n')).toEqual([expect.stringMatching(/mbr\.img: its MBR table has no partition 2 \(it has 1, 3, 4, 5, 6\)$/)]);
    }
    const extended = await ubdcow(['ls', disk, '--partition', '4']);
    expect(extended.status).toBe(2);
    expect(extended.stderr).toMatch(/partition 4 is an MBR extended partition/);
    const swapped = await ubdcow(['get', disk, '/id.txt', '--partition', '6']);
    expect(swapped.status).toBe(2);
    expect(swapped.stderr.trim()).toMatch(/mbr\.img partition 6 holds Linux swap, not an ext2\/3\/4 file system$/);
    expect(md5OfFile(disk)).toBe(before);
  });

  it('GPT using only entry 5: it is partition 5, found alone or by number; a FAT partition is named as such', async () => {
    const disk = path.join(tmp.path, 'gpt.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 40 << 20);
    await ok('sgdisk', ['-n', '5:2048:+8M', '-t', '5:8300', disk]);
    expect(await partx(disk)).toEqual([[5, 2048, 16384]]);
    expect(await ourTable(disk)).toEqual([[5, 2048, 16384]]);
    await extAt(tmp.path, disk, 2048, 8192, 'entry 5\n');
    for (const args of [[], ['--partition', '5']]) {
      const got = await ubdcow(['get', disk, '/id.txt', ...args]);
      expect(got.status, got.stderr).toBe(0);
      expect(got.stdout).toBe('entry 5\n');
    }
    const one = await ubdcow(['get', disk, '/id.txt', '--partition', '1']);
    expect(one.status).toBe(2);
    expect(one.stderr.trim()).toMatch(/gpt\.img: its GPT table has no partition 1 \(it has 5\)$/);

    // Add a FAT partition as entry 2 and an ext one as entry 7 (sgdisk keeps entry numbers).
    await ok('sgdisk', ['-n', '2:20480:+4M', '-t', '2:0700', '-n', '7:30720:+4M', '-t', '7:8300', disk]);
    expect(await ourTable(disk)).toEqual(await partx(disk));
    const fat = path.join(tmp.path, 'fat.img');
    fs.writeFileSync(fat, Buffer.alloc(4 << 20));
    await ok('mkfs.vfat', [fat]);
    place(disk, fat, 20480);
    const fatLs = await ubdcow(['ls', disk, '--partition', '2']);
    expect(fatLs.status).toBe(2);
    expect(fatLs.stderr.trim()).toMatch(/gpt\.img partition 2 holds a FAT file system, not an ext2\/3\/4 file system$/);
    const alone = await ubdcow(['ls', disk]);
    expect(alone.status).toBe(2);
    expect(alone.stderr).toMatch(/GPT disk with 2 Linux partitions: 2 \(EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, 4194304 bytes\), 5 .*, 7 .*; choose one/);

    // A damaged primary header: the backup at the disk's end has the same table (partx agrees).
    const fd = fs.openSync(disk, 'r+');
    fs.writeSync(fd, Buffer.alloc(512), 0, 512, 512);
    fs.closeSync(fd);
    expect(await ourTable(disk)).toEqual(await partx(disk));
    const fromBackup = await ubdcow(['get', disk, '/id.txt', '--partition', '5']);
    expect(fromBackup.status, fromBackup.stderr).toBe(0);
    expect(fromBackup.stdout).toBe('entry 5\n');
  });

  const otherMkfs = missingTools('mkfs.ntfs', 'mkfs.xfs', 'mkfs.btrfs');
  it.skipIf(otherMkfs.length > 0)(titleWithSkipReason('NTFS, XFS and btrfs partitions are named by their signatures', otherMkfs), async () => {
    const disk = path.join(tmp.path, 'others.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 40 << 20);
    await ok('sgdisk', ['-n', '1:2048:+8M', '-n', '2:20480:+4M', '-n', '3:30720:+4M', disk]);
    const made = [
      { n: 1, program: 'mkfs.ntfs', args: ['-F', '-f', '-q'], size: 8 << 20, what: 'an NTFS file system' },
      { n: 2, program: 'mkfs.xfs', args: ['-q', '-f'], size: 300 << 20, what: 'an XFS file system' },
      { n: 3, program: 'mkfs.btrfs', args: ['-q', '-f'], size: 120 << 20, what: 'a btrfs file system' },
    ];
    const starts = new Map((await partx(disk)).map((row) => [row[0]!, row[1]!]));
    for (const { n, program, args, size } of made) {
      const image = path.join(tmp.path, `fs${n}.img`);
      fs.writeFileSync(image, Buffer.alloc(0));
      fs.truncateSync(image, size);
      await ok(program, [...args, image]);
      // The signatures sit in the first 68 KiB; that much of each file system is enough here.
      const head = path.join(tmp.path, `head${n}.img`);
      const fd = fs.openSync(image, 'r');
      const bytes = Buffer.alloc(1 << 20);
      fs.readSync(fd, bytes, 0, bytes.length, 0);
      fs.closeSync(fd);
      fs.writeFileSync(head, bytes);
      place(disk, head, starts.get(n)!);
    }
    for (const { n, what } of made) {
      const result = await ubdcow(['ls', disk, '--partition', String(n)]);
      expect(result.status).toBe(2);
      expect(result.stderr.trim()).toBe(`ubdcow ls: ${disk} partition ${n} holds ${what}, not an ext2/3/4 file system`);
    }
  });
});

const featureMissing = missingTools('mke2fs', 'debugfs');

interface Variant {
  name: string;
  mkfs: string[];
  size: string;
}

const variants: Variant[] = [
  { name: 'ext4 bigalloc, 1 KiB blocks in 16 KiB clusters', mkfs: ['-t', 'ext4', '-O', 'bigalloc', '-C', '16384', '-b', '1024'], size: '64M' },
  { name: 'ext4 bigalloc, 4 KiB blocks in 64 KiB clusters', mkfs: ['-t', 'ext4', '-O', 'bigalloc', '-C', '65536', '-b', '4096'], size: '256M' },
  { name: 'ext2 with 64 KiB blocks', mkfs: ['-t', 'ext2', '-b', '65536'], size: '64M' },
  { name: 'ext4 with 64 KiB blocks', mkfs: ['-t', 'ext4', '-b', '65536'], size: '256M' },
  { name: 'ext4 with casefold', mkfs: ['-t', 'ext4', '-O', 'casefold'], size: '32M' },
  { name: 'ext4 with mmp', mkfs: ['-t', 'ext4', '-O', 'mmp'], size: '32M' },
];

function fillTree(dir: string): void {
  const file = (rel: string, data: string | Uint8Array) => {
    fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
    fs.writeFileSync(path.join(dir, rel), data);
  };
  const big = new Uint8Array(700_000);
  for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
  file('data/big.bin', big);
  file('data/Hello.txt', 'hello\n');
  for (let i = 0; i < 200; i++) file(`many/file-${i}.txt`, `file ${i}\n`.repeat(i));
}

describe.skipIf(featureMissing.length > 0)(titleWithSkipReason('valid ext variants mke2fs makes: read as debugfs reads them', featureMissing), () => {
  const tmp = useTempDir();

  for (const variant of variants) {
    it(`${variant.name}: ls -R and get agree with debugfs`, async () => {
      const tree = path.join(tmp.path, 'tree');
      fillTree(tree);
      const image = path.join(tmp.path, 'fs.img');
      await ok('mke2fs', ['-q', '-F', ...variant.mkfs, '-d', tree, image, variant.size]);
      const host = path.join(tmp.path, 'added.txt');
      fs.writeFileSync(host, 'added by debugfs\n'.repeat(100));
      const script = path.join(tmp.path, 'script');
      const casefold = variant.mkfs.includes('casefold');
      // A casefold directory (the flag the kernel's chattr +F sets), with a mixed-case name in it.
      const commands = ['mkdir /cf', `write ${host} /data/added.txt`];
      if (casefold) commands.push('set_inode_field /cf flags 0x40080000'); // casefold + extents
      commands.push(`write ${host} /cf/MixedCase.TXT`);
      fs.writeFileSync(script, `${commands.join('\n')}\n`);
      await ok('debugfs', ['-w', '-f', script, image]);
      const before = md5OfFile(image);

      const ls = await ubdcow(['ls', image, '-R', '--json']);
      expect(ls.status, ls.stderr).toBe(0);
      const ours = lsJsonListing(ls.stdout);
      expect(ours).toEqual(await debugfsListing(image));
      for (const file of ['/data/big.bin', '/data/Hello.txt', '/data/added.txt', '/many/file-199.txt', '/cf/MixedCase.TXT']) {
        const got = await ubdcow(['get', image, file, '-o', path.join(tmp.path, 'out'), '--force']);
        expect(got.status, `${file}: ${got.stderr}`).toBe(0);
        expect(fs.readFileSync(path.join(tmp.path, 'out')).equals(await debugfsCat(image, file)), file).toBe(true);
      }
      // Lookups in a casefold directory ignore case, as the kernel's; elsewhere they never do.
      const folded = await ubdcow(['get', image, '/cf/mixedcase.txt']);
      expect(folded.status, folded.stderr).toBe(casefold ? 0 : 2);
      if (casefold) expect(folded.stdout).toBe('added by debugfs\n'.repeat(100));
      const exact = await ubdcow(['get', image, '/data/hello.txt']);
      expect(exact.status).toBe(2);
      expect(exact.stderr).toMatch(/\/data\/hello\.txt: no such file or directory in the guest/);
      expect(md5OfFile(image)).toBe(before);
    });
  }

  it('an unknown incompatible feature: ls, get and diff --files all refuse it by name (exit 2, one line)', async () => {
    const tree = path.join(tmp.path, 'tree');
    fillTree(tree);
    const image = path.join(tmp.path, 'fs.img');
    await ok('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, image, '32M']);
    const other = path.join(tmp.path, 'other.img');
    fs.copyFileSync(image, other);
    const fd = fs.openSync(image, 'r+');
    const field = Buffer.alloc(4);
    fs.readSync(fd, field, 0, 4, 1024 + 0x60);
    field.writeUInt32LE(field.readUInt32LE(0) | 0x40000, 0); // no feature has this bit (yet)
    fs.writeSync(fd, field, 0, 4, 1024 + 0x60);
    fs.closeSync(fd);
    for (const args of [['ls', image], ['get', image, '/data/Hello.txt'], ['diff', '--files', image, other], ['diff', '--files', other, image]]) {
      const result = await ubdcow(args);
      expect(result.status, `${args.join(' ')}: ${result.stderr}`).toBe(2);
      expect(result.stdout).toBe('');
      expect(result.stderr.trim().split('\n')).toEqual([expect.stringMatching(/fs\.img: the file system uses unknown incompatible feature 0x40000, which ubdcow cannot read yet$/)]);
    }
  });
});
