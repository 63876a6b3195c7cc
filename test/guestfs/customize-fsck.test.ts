/**
 * `customize` on COWs over ext2/ext3/ext4 (metadata_csum, 64bit), 1 KiB and 4 KiB blocks: every
 * basic operation at once, then e2fsprogs is the judge: `e2fsck -fn` clean, and debugfs shows
 * each change byte for byte (content, mode, owner, link target). The backing file is never written.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { customize } from '../../src/commands/customize.js';
import { parseOperation } from '../../src/guestfs/customize-spec.js';
import { debugfsCat, runProgram } from '../uml/harness.js';
import { createCow } from '../../src/commands/create.js';
import { mapCow } from '../../src/commands/map.js';
import { debugfsListing } from '../helpers/debugfs-listing.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { sha256 } from '../helpers/cow-fixtures.js';
import { baseAndCow, debugfsStat, flatten, fsConfigs, fsckClean } from '../helpers/customize-fixtures.js';

const missing = missingTools('mke2fs', 'debugfs', 'e2fsck');

describe.skipIf(missing.length > 0)(titleWithSkipReason('customize: e2fsck clean, debugfs sees every change', missing), () => {
  const tmp = useTempDir();

  for (const config of fsConfigs) {
    it(`${config.name}: all basic operations in one run`, async () => {
      const { base, cow } = await baseAndCow(tmp.path, config);
      const baseHash = sha256(base);
      const upload = path.join(tmp.path, 'payload.bin');
      const payload = Buffer.alloc(3 << 20);
      for (let i = 0; i < payload.length; i++) payload[i] = (i * 2654435761) >>> 24;
      fs.writeFileSync(upload, payload);
      fs.chmodSync(upload, 0o750);
      const ops = [
        ['mkdir', '/srv/app/data'],
        ['upload', `${upload}:/srv/app/data`],
        ['write', '/etc/app.conf:key=value with: colons'],
        ['append-line', '/etc/motd:second line'],
        ['append-line', '/etc/hostname:extra'],
        ['chmod', '0600:/etc/app.conf'],
        ['chown', '1000:1000:/srv/app'],
        ['link', '/srv/app/data/payload.bin:/usr/local/payload:/etc/many/payload-link'],
        ['delete', '/etc/gone.txt'],
        ['delete', '/opt/tree/a'],
        ['move', '/etc/old.conf:/etc/new.conf'],
        ['move', '/opt/tree:/srv'],
        ['touch', '/etc/touched'],
        ['truncate', '/var/log/big.log'],
        ['hostname', 'vm-1'],
        ['write', '/etc/many/entry-with-a-long-name-7:replaced'],
      ].map(([name, value]) => parseOperation(name!, value!));
      // /usr/local does not exist: --link needs its parent, so make it first.
      ops.splice(7, 0, parseOperation('mkdir', '/usr/local'));
      const result = await customize(cow, ops);
      expect(result.steps.map((step) => step.paths)).toContainEqual(['/srv/app/data/payload.bin']);
      expect(sha256(base)).toBe(baseHash);
      expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);

      const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
      await fsckClean(flat);
      expect(Buffer.compare(await debugfsCat(flat, '/srv/app/data/payload.bin'), payload)).toBe(0);
      expect((await debugfsCat(flat, '/etc/app.conf')).toString()).toBe('key=value with: colons');
      expect((await debugfsCat(flat, '/etc/motd')).toString()).toBe('no newline at the end\nsecond line\n');
      expect((await debugfsCat(flat, '/etc/hostname')).toString()).toBe('vm-1\n');
      expect((await debugfsCat(flat, '/etc/new.conf')).toString()).toBe('old\n');
      expect((await debugfsCat(flat, '/srv/tree/top.txt')).toString()).toBe('top\n');
      expect((await debugfsCat(flat, '/etc/many/entry-with-a-long-name-7')).toString()).toBe('replaced');
      expect((await debugfsCat(flat, '/etc/many/entry-with-a-long-name-8')).toString()).toBe('8\n');
      const listing = await debugfsListing(flat);
      expect(listing.get('/srv/app/data/payload.bin')).toBe(`file 750 0 0 ${payload.length}`);
      expect(listing.get('/etc/app.conf')).toBe('file 600 0 0 22');
      expect(listing.get('/srv/app')).toBe('dir 755 1000 1000 ');
      expect(listing.get('/srv/app/data')).toBe('dir 755 0 0 ');
      expect(listing.get('/etc/touched')).toBe('file 644 0 0 0');
      expect(listing.get('/var/log/big.log')).toBe('file 644 0 0 0');
      expect(listing.get('/usr/local/payload')).toMatch(/^symlink 777 0 0 /);
      for (const gone of ['/etc/gone.txt', '/etc/old.conf', '/opt/tree', '/srv/tree/a', '/srv/tree/a/b/c.txt']) expect(listing.has(gone), gone).toBe(false);
      expect(await debugfsStat(flat, '/usr/local/payload')).toContain('Fast link dest: "/srv/app/data/payload.bin"');
      expect(await debugfsStat(flat, '/etc/many/payload-link')).toContain('Fast link dest: "/srv/app/data/payload.bin"');
      // 400 untouched entries of the big directory are all still there.
      expect([...listing.keys()].filter((p) => p.startsWith('/etc/many/entry-')).length).toBe(400);
    });
  }

  it("--touch sets an existing file's mtime to now; --truncate and --write keep its inode, mode and owner", async () => {
    const { base, cow } = await baseAndCow(tmp.path, fsConfigs[2]!);
    fs.rmSync(cow);
    for (const command of ['sif /etc/motd mtime 20000101000000', 'sif /etc/old.conf uid 4242', 'sif /etc/old.conf mode 0100640']) {
      expect((await runProgram('debugfs', ['-w', '-R', command, base])).status).toBe(0);
    }
    await createCow(cow, base);
    const inodeOf = async (image: string, p: string) => /Inode: (\d+)/.exec(await debugfsStat(image, p))?.[1];
    const before = await inodeOf(base, '/etc/old.conf');
    const started = Math.floor(Date.now() / 1000);
    await customize(cow, [parseOperation('touch', '/etc/motd'), parseOperation('write', '/etc/old.conf:new'), parseOperation('truncate', '/var/log/big.log')]);
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    const mtime = /mtime: (0x[0-9a-f]+)/.exec(await debugfsStat(flat, '/etc/motd'))?.[1];
    expect(Number(mtime)).toBeGreaterThanOrEqual(started);
    expect((await debugfsCat(flat, '/etc/motd')).toString()).toBe('no newline at the end');
    expect(await inodeOf(flat, '/etc/old.conf')).toBe(before);
    expect((await debugfsListing(flat)).get('/etc/old.conf')).toBe('file 640 4242 0 3');
  });

  it('pages spilled to the journal file (a 1 MiB memory budget) give the same file system', async () => {
    const { cow } = await baseAndCow(tmp.path, fsConfigs[3]!);
    const upload = path.join(tmp.path, 'payload.bin');
    const payload = Buffer.alloc(12 << 20);
    for (let i = 0; i < payload.length; i += 512) payload.writeUInt32LE(i, i);
    fs.writeFileSync(upload, payload);
    const result = await customize(cow, [parseOperation('upload', `${upload}:/payload`), parseOperation('write', '/etc/after:x'), parseOperation('upload', `${upload}:/payload2`)], { memoryBytes: 1 << 20 });
    expect(result.pagesChanged).toBeGreaterThan(6000);
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    expect(Buffer.compare(await debugfsCat(flat, '/payload'), payload)).toBe(0);
    expect(Buffer.compare(await debugfsCat(flat, '/payload2'), payload)).toBe(0);
    expect((await debugfsCat(flat, '/etc/after')).toString()).toBe('x');
  });

  it('--partition 2 of an MBR disk whose partition starts off a 4 KiB boundary: only that partition changes', async () => {
    const tree = path.join(tmp.path, 'tree');
    fs.mkdirSync(path.join(tree, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(tree, 'etc', 'hostname'), 'base\n');
    const one = path.join(tmp.path, 'one.img');
    const two = path.join(tmp.path, 'two.img');
    for (const image of [one, two]) {
      expect((await runProgram('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '1024', '-O', 'metadata_csum,64bit', '-d', tree, image, '8M'])).status).toBe(0);
    }
    const disk = path.join(tmp.path, 'mbr.img');
    const sectors = 20 * 2048;
    const bytes = Buffer.alloc(sectors * 512);
    const parts = [{ first: 2048, count: 8 * 2048 }, { first: 10 * 2048 + 1, count: 8 * 2048 }];
    parts.forEach((part, i) => {
      bytes[446 + i * 16 + 4] = 0x83;
      bytes.writeUInt32LE(part.first, 446 + i * 16 + 8);
      bytes.writeUInt32LE(part.count, 446 + i * 16 + 12);
    });
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    fs.readFileSync(one).copy(bytes, parts[0]!.first * 512);
    fs.readFileSync(two).copy(bytes, parts[1]!.first * 512);
    fs.writeFileSync(disk, bytes);
    const cow = path.join(tmp.path, 'disk.cow');
    await createCow(cow, disk);
    const result = await customize(cow, [parseOperation('hostname', 'second'), parseOperation('mkdir', '/srv/x')], { partition: 2 });
    expect(result.location).toBe('partition 2');
    // Whole 4 KiB pages of the virtual disk only, although the partition starts 512 bytes past a page boundary.
    const { extents } = await mapCow(cow);
    expect(extents.length).toBeGreaterThan(0);
    for (const extent of extents) expect([extent.offset % 4096, extent.length % 4096]).toEqual([0, 0]);
    const flat = fs.readFileSync(await flatten(cow, path.join(tmp.path, 'flat.img')));
    expect(Buffer.compare(flat.subarray(0, parts[1]!.first * 512), bytes.subarray(0, parts[1]!.first * 512))).toBe(0);
    const partition = path.join(tmp.path, 'p2.img');
    fs.writeFileSync(partition, flat.subarray(parts[1]!.first * 512, (parts[1]!.first + parts[1]!.count) * 512));
    await fsckClean(partition);
    expect((await debugfsCat(partition, '/etc/hostname')).toString()).toBe('second\n');
    expect((await debugfsListing(partition)).get('/srv/x')).toBe('dir 755 0 0 ');
  });
});
