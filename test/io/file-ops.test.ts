import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type FileHandleLike } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { cloneFile, cloneOrCopyFile, cloneRange, copyRange, punchHole, syncRange } from '../../src/io/file/file-ops.js';
import { overrideOsCalls } from '../../src/os/libc.js';
import { makeTempDir, removeTempDir, useTempDir } from '../helpers/tmp.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const MiB = 1 << 20;

function injected(code: string, syscall: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code} (injected)`), { code, syscall });
}

function sha(file: string, start = 0, length?: number): string {
  const bytes = fs.readFileSync(file);
  return createHash('sha256').update(bytes.subarray(start, length === undefined ? undefined : start + length)).digest('hex');
}

function writeFile(file: string, size: number, data: [number, Buffer][] = []): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (const [at, bytes] of data) fs.writeSync(fd, bytes, 0, bytes.length, at);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function withHandles<T>(files: [string, 'r' | 'r+'][], run: (...handles: FileHandleLike[]) => Promise<T>): Promise<T> {
  const handles: FileHandleLike[] = [];
  try {
    for (const [file, mode] of files) handles.push(await nodeFileSystem.open(file, mode));
    return await run(...handles);
  } finally {
    for (const handle of handles) await handle.close();
  }
}

describe('file operations on a file system without shared extents (the test temp folder)', () => {
  const tmp = useTempDir();

  it('cloneFile says "not supported here" (EOPNOTSUPP/EXDEV/EINVAL) and leaves the target alone; cloneOrCopyFile copies, sparse', async () => {
    const source = path.join(tmp.path, 'base');
    const target = path.join(tmp.path, 'out');
    writeFile(source, 32 * MiB, [[MiB, randomBytes(MiB)], [20 * MiB, randomBytes(4096)]]);
    writeFile(target, 0);
    await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
      const outcome = await cloneFile(dst, src);
      if (outcome.cloned) return; // a reflink-capable temp folder: the XFS suite covers it
      expect(outcome.reason).toMatch(/^(EOPNOTSUPP|EXDEV|EINVAL|ENOTTY) from ioctl$/);
      expect(fs.statSync(target).size).toBe(0);
      const report = await cloneOrCopyFile(dst, src);
      expect(report.wholeFileClone).toBe(false);
      expect(report.copiedInKernel + report.copied).toBe(MiB + 4096);
      expect(report.skipped).toBe(32 * MiB - MiB - 4096);
    });
    expect(sha(target)).toBe(sha(source));
    expect(fs.statSync(target).blocks * 512).toBeLessThan(4 * MiB);
  });

  it('copyRange: unaligned ranges skip the clone; copy_file_range does the copy; bytes land exactly', async () => {
    const source = path.join(tmp.path, 'src');
    const target = path.join(tmp.path, 'dst');
    writeFile(source, 4 * MiB, [[0, randomBytes(4 * MiB)]]);
    writeFile(target, 4 * MiB);
    await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
      const report = await copyRange(dst, src, { sourceOffset: 1000, length: 123_457, targetOffset: 77 });
      expect(report).toEqual({ cloned: 0, copiedInKernel: 123_457, copied: 0, skipped: 0 });
    });
    expect(sha(target, 77, 123_457)).toBe(sha(source, 1000, 123_457));
    expect(fs.readFileSync(target).subarray(0, 77).every((b) => b === 0)).toBe(true);
  });

  it('copyRange fallback: a handle without clone or copy_file_range copies with reads and writes', async () => {
    const source = path.join(tmp.path, 'src');
    const target = path.join(tmp.path, 'dst');
    writeFile(source, 3 * MiB, [[0, randomBytes(3 * MiB)]]);
    writeFile(target, 3 * MiB);
    await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
      const bare = wrapHandle(dst, {});
      const report = await copyRange(bare, src, { sourceOffset: 4096, length: 2 * MiB, targetOffset: 8192 }, { chunkBytes: 300_000 });
      expect(report).toEqual({ cloned: 0, copiedInKernel: 0, copied: 2 * MiB, skipped: 0 });
    });
    expect(sha(target, 8192, 2 * MiB)).toBe(sha(source, 4096, 2 * MiB));
  });

  it('copyRange fallback: clone refused and copy_file_range refused (EXDEV) → reads and writes; EIO and ENOSPC are errors', async () => {
    const source = path.join(tmp.path, 'src');
    const target = path.join(tmp.path, 'dst');
    writeFile(source, MiB, [[0, randomBytes(MiB)]]);
    writeFile(target, MiB);
    await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
      const calls: string[] = [];
      const refusing = wrapHandle(dst, {
        cloneFrom: async () => {
          calls.push('clone');
          throw injected('EOPNOTSUPP', 'ioctl');
        },
        copyRangeFrom: async () => {
          calls.push('copy_file_range');
          throw injected('EXDEV', 'copy_file_range');
        },
      });
      const report = await copyRange(refusing, src, { sourceOffset: 0, length: MiB, targetOffset: 0 });
      expect(report.copied).toBe(MiB);
      expect(calls).toEqual(['clone', 'copy_file_range']);
      const broken = wrapHandle(dst, { copyRangeFrom: async () => Promise.reject(injected('EIO', 'copy_file_range')) });
      await expect(copyRange(broken, src, { sourceOffset: 0, length: 4096, targetOffset: 0 }, { clone: false })).rejects.toMatchObject({ code: 'EIO' });
      const full = wrapHandle(dst, { cloneFrom: async () => Promise.reject(injected('ENOSPC', 'ioctl')) });
      await expect(cloneRange(full, src, { sourceOffset: 0, length: 4096, targetOffset: 0 })).rejects.toMatchObject({ code: 'ENOSPC' });
      await expect(cloneFile(full, src)).rejects.toMatchObject({ code: 'ENOSPC' });
    });
    expect(sha(target)).toBe(sha(source));
  });

  it('copyRange with the bindings unavailable: every step falls back and the bytes are the same', async () => {
    const source = path.join(tmp.path, 'src');
    const target = path.join(tmp.path, 'dst');
    writeFile(source, 8 * MiB, [[2 * MiB, randomBytes(MiB)]]);
    writeFile(target, 8 * MiB);
    const restore = overrideOsCalls(undefined);
    try {
      await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
        expect((await cloneFile(dst, src)).cloned).toBe(false);
        const report = await copyRange(dst, src, { sourceOffset: 0, length: 8 * MiB, targetOffset: 0 }, { targetIsZero: true });
        // No SEEK_DATA either: the whole range counts as data.
        expect(report).toEqual({ cloned: 0, copiedInKernel: 0, copied: 8 * MiB, skipped: 0 });
      });
    } finally {
      restore.reset();
    }
    expect(sha(target)).toBe(sha(source));
  });

  it('copyRange names a source that ends inside the range (ESHORT), on both copy paths', async () => {
    const source = path.join(tmp.path, 'src');
    const target = path.join(tmp.path, 'dst');
    writeFile(source, 10_000, [[0, randomBytes(10_000)]]);
    writeFile(target, 0);
    await withHandles([[source, 'r'], [target, 'r+']], async (src, dst) => {
      await expect(copyRange(dst, src, { sourceOffset: 0, length: 20_000, targetOffset: 0 }, { clone: false })).rejects.toMatchObject({ code: 'ESHORT' });
      await expect(copyRange(wrapHandle(dst, {}), src, { sourceOffset: 0, length: 20_000, targetOffset: 0 })).rejects.toMatchObject({ code: 'ESHORT' });
    });
  });

  it('punchHole frees the blocks and keeps the size; fallbacks write zeros or skip', async () => {
    const file = path.join(tmp.path, 'f');
    const original = randomBytes(4 * MiB);
    writeFile(file, 4 * MiB, [[0, original]]);
    await withHandles([[file, 'r+']], async (handle) => {
      const before = (await handle.stat()).allocated;
      expect(await punchHole(handle, MiB, MiB)).toBe('punched');
      expect((await handle.stat()).allocated).toBe(before - MiB);
      expect((await handle.stat()).size).toBe(4 * MiB);
      const refusing = wrapHandle(handle, { punchHole: async () => Promise.reject(injected('EOPNOTSUPP', 'fallocate')) });
      expect(await punchHole(refusing, 3 * MiB, 4096, { chunkBytes: 1000 })).toBe('zeroed');
      expect(await punchHole(refusing, 3 * MiB + 8192, 4096, { fallback: 'skip' })).toBe('skipped');
      expect(await punchHole(wrapHandle(handle, {}), 0, 512)).toBe('zeroed');
      const failing = wrapHandle(handle, { punchHole: async () => Promise.reject(injected('EIO', 'fallocate')) });
      await expect(punchHole(failing, 0, 4096)).rejects.toMatchObject({ code: 'EIO' });
    });
    const after = fs.readFileSync(file);
    const expected = Buffer.from(original);
    expected.fill(0, MiB, 2 * MiB);
    expected.fill(0, 3 * MiB, 3 * MiB + 4096);
    expected.fill(0, 0, 512);
    expect(after.equals(expected)).toBe(true);
  });

  it('syncRange runs sync_file_range; without it: nothing, or fdatasync when asked to wait', async () => {
    const file = path.join(tmp.path, 'f');
    writeFile(file, MiB, [[0, randomBytes(MiB)]]);
    await withHandles([[file, 'r+']], async (handle) => {
      expect(await syncRange(handle, 0, 0)).toBe(true);
      expect(await syncRange(handle, 0, MiB, { wait: true })).toBe(true);
      let datasyncs = 0;
      const bare = wrapHandle(handle, {
        datasync: async () => {
          datasyncs++;
        },
      });
      expect(await syncRange(bare, 0, MiB)).toBe(false);
      expect(datasyncs).toBe(0);
      expect(await syncRange(bare, 0, MiB, { wait: true })).toBe(false);
      expect(datasyncs).toBe(1);
      const failing = wrapHandle(handle, { syncRange: async () => Promise.reject(injected('EIO', 'sync_file_range')) });
      await expect(syncRange(failing, 0, 0)).rejects.toMatchObject({ code: 'EIO' });
    });
  });
});

/** File systems that share extents, each made fresh on a 512 MiB loop device. */
const reflinkFileSystems = [
  { name: 'XFS reflink=1', mkfs: ['mkfs.xfs', '-q', '-m', 'reflink=1'] },
  { name: 'btrfs', mkfs: ['mkfs.btrfs', '-q'] },
];

function reflinkMissing(mkfs: string): string[] {
  return [
    ...(process.getuid?.() === 0 ? [] : ['root']),
    ...missingTools(mkfs, 'mount', 'umount', 'losetup'),
    ...(fs.existsSync('/dev/loop-control') ? [] : ['a loop device']),
  ];
}

/** Free bytes of the file system at `dir`, after pending writes are flushed. */
function freeBytes(dir: string): number {
  spawnSync('sync', ['-f', dir]);
  const stats = fs.statfsSync(dir);
  return stats.bfree * stats.bsize;
}

describe.each(reflinkFileSystems)('clones on a real $name loop mount', ({ name, mkfs: [mkfsTool, ...mkfsArgs] }) => {
  const missing = reflinkMissing(mkfsTool!);
  describe.skipIf(missing.length > 0)(titleWithSkipReason(`share extents on ${name}`, missing), () => {
    let work: string;
    let mount: string;
    let mounted = false;

    beforeAll(() => {
      work = makeTempDir('ubdcow-reflink-');
      const image = path.join(work, 'x.img');
      mount = path.join(work, 'mnt');
      fs.mkdirSync(mount);
      fs.closeSync(fs.openSync(image, 'w'));
      fs.truncateSync(image, 512 * MiB);
      const mkfs = spawnSync(mkfsTool!, [...mkfsArgs, image], { encoding: 'utf8' });
      if (mkfs.status !== 0) throw new Error(`${mkfsTool} failed: ${mkfs.stderr}`);
      const result = spawnSync('mount', ['-o', 'loop', image, mount], { encoding: 'utf8' });
      if (result.status !== 0) throw new Error(`mount -o loop failed: ${result.stderr}`);
      mounted = true;
    });

    afterAll(() => {
      if (mounted) {
        const result = spawnSync('umount', [mount], { encoding: 'utf8' });
        if (result.status !== 0) spawnSync('umount', ['-l', mount]);
      }
      if (work) removeTempDir(work);
    });

    it('cloneFile shares the whole base (no new space), cloneRange shares COW extents, copies differ only where written', async () => {
      const base = path.join(mount, 'base.img');
      const cow = path.join(mount, 'cow.data');
      const out = path.join(mount, 'merged.img');
      writeFile(base, 128 * MiB, [[0, randomBytes(128 * MiB)]]);
      writeFile(cow, 8 * MiB, [[0, randomBytes(8 * MiB)]]);
      writeFile(out, 0);
      const free0 = freeBytes(mount);
      await withHandles([[base, 'r'], [cow, 'r'], [out, 'r+']], async (src, cowFile, dst) => {
        expect(await cloneFile(dst, src)).toEqual({ cloned: true });
        expect(freeBytes(mount)).toBeGreaterThan(free0 - MiB);
        // The COW's extents over the clone: block-aligned pieces at scattered places.
        for (const [from, length, to] of [[0, MiB, 4 * MiB], [2 * MiB, 4096, 100 * MiB + 8192], [4 * MiB, 3 * MiB, 64 * MiB]] as const) {
          expect(await cloneRange(dst, cowFile, { sourceOffset: from, length, targetOffset: to })).toEqual({ cloned: true });
        }
        // copyRange takes the clone path by itself when aligned.
        const report = await copyRange(dst, cowFile, { sourceOffset: 7 * MiB, length: MiB, targetOffset: 120 * MiB });
        expect(report).toEqual({ cloned: MiB, copiedInKernel: 0, copied: 0, skipped: 0 });
        // Unaligned: FICLONERANGE refuses with EINVAL, which is "not supported here".
        const refused = await cloneRange(dst, cowFile, { sourceOffset: 512, length: 4096, targetOffset: 0 });
        expect(refused).toEqual({ cloned: false, reason: 'EINVAL from ioctl' });
      });
      // Everything was shared: the merged image took (almost) no new space.
      expect(freeBytes(mount)).toBeGreaterThan(free0 - MiB);
      const merged = fs.readFileSync(out);
      const expected = fs.readFileSync(base);
      const cowBytes = fs.readFileSync(cow);
      cowBytes.copy(expected, 4 * MiB, 0, MiB);
      cowBytes.copy(expected, 100 * MiB + 8192, 2 * MiB, 2 * MiB + 4096);
      cowBytes.copy(expected, 64 * MiB, 4 * MiB, 7 * MiB);
      cowBytes.copy(expected, 120 * MiB, 7 * MiB, 8 * MiB);
      expect(merged.equals(expected)).toBe(true);
      // Writing to the clone unshares only what is written; the base is untouched.
      const baseSha = sha(base);
      const fd = fs.openSync(out, 'r+');
      fs.writeSync(fd, Buffer.alloc(MiB, 7), 0, MiB, 32 * MiB);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      expect(sha(base)).toBe(baseSha);
      const used = free0 - freeBytes(mount);
      expect(used).toBeGreaterThanOrEqual(MiB - 64 * 1024);
      expect(used).toBeLessThan(3 * MiB);
    });

    it('cloneOrCopyFile clones a whole file; cross-file-system clones are "not supported here" (EXDEV)', async () => {
      const base = path.join(mount, 'base2.img');
      writeFile(base, 32 * MiB, [[0, randomBytes(32 * MiB)]]);
      const out = path.join(mount, 'copy.img');
      writeFile(out, 0);
      const free0 = freeBytes(mount);
      await withHandles([[base, 'r'], [out, 'r+']], async (src, dst) => {
        const report = await cloneOrCopyFile(dst, src);
        expect(report.wholeFileClone).toBe(true);
      });
      expect(freeBytes(mount)).toBeGreaterThan(free0 - MiB);
      expect(sha(out)).toBe(sha(base));

      const elsewhere = path.join(os.tmpdir(), `ubdcow-xdev-${process.pid}`);
      writeFile(elsewhere, 0);
      try {
        await withHandles([[base, 'r'], [elsewhere, 'r+']], async (src, dst) => {
          expect(await cloneFile(dst, src)).toEqual({ cloned: false, reason: 'EXDEV from ioctl' });
          // copy_file_range crosses file systems (Linux 5.19+) or falls back; the bytes arrive.
          await dst.truncate(32 * MiB);
          await copyRange(dst, src, { sourceOffset: 0, length: 32 * MiB, targetOffset: 0 });
        });
        expect(sha(elsewhere)).toBe(sha(base));
      } finally {
        fs.rmSync(elsewhere, { force: true });
      }
    });
  });
});
