/**
 * Bitmap slices go to disk with a blocking pwrite on the calling thread when the file has one
 * (BitmapWriter: one thread-pool trip per write instead of two). On real files: the data still
 * goes through the async write first, the bits land, and a failing blocking write fails only its
 * request, with the file and errno named and the bits cleared again.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import type { FileHandleLike, FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { UbdcowError } from '../../src/errors.js';
import { useTempDir } from '../helpers/tmp.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

interface Call {
  kind: 'write' | 'writeSync';
  position: number;
  length: number;
}

/** nodeFileSystem with the COW's writes recorded, and its blocking writes failing while `fail` says so. */
function recordingFs(cow: string, calls: Call[], fail: { at?: (position: number) => boolean }): FileSystem {
  return {
    ...nodeFileSystem,
    async open(file, mode) {
      const handle = await nodeFileSystem.open(file, mode);
      if (path.resolve(file) !== path.resolve(cow)) return handle;
      return wrapHandle(handle, {
        readSync: handle.readSync?.bind(handle),
        write(buffer, offset, length, position) {
          calls.push({ kind: 'write', position, length });
          return handle.write(buffer, offset, length, position);
        },
        writeSync(buffer, offset, length, position) {
          calls.push({ kind: 'writeSync', position, length });
          if (fail.at?.(position)) throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', errno: -5, syscall: 'write' });
          handle.writeSync!(buffer, offset, length, position);
        },
      } satisfies Partial<FileHandleLike>);
    },
  };
}

/** The write at sector 64 failed with EIO naming the COW; the other one succeeded. */
function expectOnlyBadFailed(cow: string, bad: PromiseSettledResult<void>, good: PromiseSettledResult<void>): void {
  expect(good.status).toBe('fulfilled');
  expect(bad.status).toBe('rejected');
  const err = (bad as PromiseRejectedResult).reason;
  expect(err).toBeInstanceOf(UbdcowError);
  expect(err.message).toContain(cow);
  expect(err.message).toMatch(/EIO/);
}

describe('bitmap slices written with a blocking pwrite', () => {
  const tmp = useTempDir();

  async function setup() {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(1 << 20, 0x11));
    const cow = path.join(tmp.path, 'vm.cow');
    const { geometry } = await createCow(cow, base);
    return { cow, geometry };
  }

  it('a whole data page, then the bitmap slice, both on the calling thread; the bits are on disk', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, {}) });
    await dev.write(8192, Buffer.alloc(4096, 0x22));
    await dev.close();
    expect(calls.filter((c) => c.position >= geometry.bitmapOffset)).toEqual([
      { kind: 'writeSync', position: geometry.dataOffset + 8192, length: 4096 },
      { kind: 'writeSync', position: geometry.bitmapOffset + 2, length: 1 },
    ]);
    const again = await openCow(cow, { readOnly: true });
    expect([again.isAllocated(15), again.isAllocated(16), again.isAllocated(23), again.isAllocated(24)]).toEqual([false, true, true, false]);
    expect(Buffer.from(await again.read(8192, 4096)).equals(Buffer.alloc(4096, 0x22))).toBe(true);
    await again.close();
  });

  it('data that is not whole pages (sector allocation) or over 64 KiB goes through the async write, before its slice', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, {}), allocationUnit: 512 });
    await dev.write(8192 + 512, Buffer.alloc(1024, 0x22));
    await dev.write(65536, Buffer.alloc(128 << 10, 0x23));
    await dev.close();
    expect(calls.filter((c) => c.position >= geometry.bitmapOffset)).toEqual([
      { kind: 'write', position: geometry.dataOffset + 8192 + 512, length: 1024 },
      { kind: 'writeSync', position: geometry.bitmapOffset + 2, length: 1 },
      { kind: 'write', position: geometry.dataOffset + 65536, length: 128 << 10 },
      { kind: 'writeSync', position: geometry.bitmapOffset + 16, length: 32 },
    ]);
  });

  it('writes finishing in one turn share one slice write over the bytes between them, after all their data', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, {}) });
    const offsets = [0, 65536, 131072, 196608 + 8192]; // bitmap bytes 0, 16, 32 and 50
    await Promise.all(offsets.map((offset) => dev.write(offset, Buffer.alloc(4096, 0x66))));
    await dev.close();
    expect(calls.filter((c) => c.position >= geometry.bitmapOffset)).toEqual([
      ...offsets.map((offset) => ({ kind: 'writeSync', position: geometry.dataOffset + offset, length: 4096 })),
      { kind: 'writeSync', position: geometry.bitmapOffset, length: 51 },
    ]);
    const bitmap = Buffer.alloc(51);
    fs.readSync(fs.openSync(cow, 'r'), bitmap, 0, 51, geometry.bitmapOffset);
    const expected = Buffer.alloc(51);
    for (const offset of offsets) expected[offset / 4096] = 0xff;
    expect(bitmap.equals(expected)).toBe(true);
  });

  it('updates in different bitmap slices of the cache are not coalesced (the bytes between may not be in memory)', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, {}), bitmapSliceBytes: 16, maxBitmapCacheBytes: 16 });
    await Promise.all([0, 131072].map((offset) => dev.write(offset, Buffer.alloc(4096, 0x66))));
    await dev.close();
    // Two writes, whatever their order (each slice loads on its own).
    const sliceWrites = calls.filter((c) => c.position >= geometry.bitmapOffset && c.position < geometry.dataOffset);
    expect(sliceWrites.sort((a, b) => a.position - b.position)).toEqual([
      { kind: 'writeSync', position: geometry.bitmapOffset, length: 1 },
      { kind: 'writeSync', position: geometry.bitmapOffset + 32, length: 1 },
    ]);
  });

  it('a failing blocking data write fails only its request, naming the file and EIO, and sets no bit', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, { at: (position) => position === geometry.dataOffset + 32768 }) });
    const [bad, good] = await Promise.allSettled([dev.write(32768, Buffer.alloc(4096, 0x33)), dev.write(0, Buffer.alloc(4096, 0x44))]);
    expectOnlyBadFailed(cow, bad, good);
    expect(dev.isAllocated(64)).toBe(false);
    expect(dev.isAllocated(0)).toBe(true);
    await dev.close();
  });

  it('a failing blocking slice write fails only its request, naming the file and EIO; its bits are cleared, later writes land', async () => {
    const { cow, geometry } = await setup();
    const calls: Call[] = [];
    const fail: { at?: (position: number) => boolean } = { at: (position) => position === geometry.bitmapOffset + 8 };
    const dev = await openCow(cow, { fs: recordingFs(cow, calls, fail) });
    // One after the other: writes finishing in one turn share a slice write, and its failure.
    const [bad] = await Promise.allSettled([dev.write(32768, Buffer.alloc(4096, 0x33))]);
    const [good] = await Promise.allSettled([dev.write(0, Buffer.alloc(4096, 0x44))]);
    expectOnlyBadFailed(cow, bad, good);
    expect(dev.isAllocated(64)).toBe(false);
    fail.at = undefined;
    await dev.write(32768 + 512, Buffer.alloc(512, 0x55));
    await dev.close();
    const again = await openCow(cow, { readOnly: true });
    expect(again.isAllocated(0)).toBe(true);
    expect(again.isAllocated(64)).toBe(true);
    const page = Buffer.alloc(4096, 0x11);
    page.fill(0x55, 512, 1024);
    expect(Buffer.from(await again.read(32768, 4096)).equals(page)).toBe(true);
    await again.close();
  });
});
