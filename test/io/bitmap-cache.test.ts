import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CowFormatError, UbdcowError } from '../../src/errors.js';
import { SectorBitmap, type SectorRun } from '../../src/format/bitmap.js';
import { LazyBitmap, lazyBitmapOf } from '../../src/io/bitmap/bitmap-cache.js';
import { openImage } from '../../src/io/image/image.js';
import { readWholeBitmap } from '../../src/io/bitmap/allocation.js';
import { createCow } from '../../src/commands/create.js';
import { writeCowSectors } from '../helpers/cow-writes.js';
import { type FileHandleLike } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { useTempDir } from '../helpers/tmp.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const OFFSET = 1536; // a v3 header padded to 512: the bitmap is not page-aligned in real files

/** A file with `bitmap` at OFFSET (sparse: only non-zero 4 KiB pieces are written) and `extra` bytes after. */
function bitmapFile(file: string, bitmapLength: number, writes: [number, Uint8Array][] = []): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, OFFSET + bitmapLength + 4096);
    fs.writeSync(fd, Buffer.alloc(OFFSET, 0x5a), 0, OFFSET, 0);
    for (const [at, bytes] of writes) fs.writeSync(fd, bytes, 0, bytes.length, OFFSET + at);
  } finally {
    fs.closeSync(fd);
  }
}

function readByte(file: string, position: number): number {
  const fd = fs.openSync(file, 'r');
  try {
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, position);
    return byte[0]!;
  } finally {
    fs.closeSync(fd);
  }
}

async function collect(runs: AsyncIterable<SectorRun>): Promise<[number, number][]> {
  const found: [number, number][] = [];
  for await (const run of runs) found.push([run.start, run.end]);
  return found;
}

async function opened<T>(file: string, run: (handle: FileHandleLike) => Promise<T>): Promise<T> {
  const handle = await nodeFileSystem.open(file, 'r+');
  try {
    return await run(handle);
  } finally {
    await handle.close();
  }
}

/**
 * What the bitmap's writer does (the engine's BitmapWriter): write the changed bytes of the dirty
 * slices holding sectors [start, end) (default: all) where they go, then say so (markWritten).
 */
async function writeDirty(lazy: LazyBitmap, handle: FileHandleLike, start = 0, end?: number): Promise<void> {
  const sliceBytes = lazy.sliceInFile(0).end - lazy.sliceInFile(0).start;
  const sliceSectors = sliceBytes * 8;
  const last = end === undefined ? Infinity : Math.floor((end - 1) / sliceSectors);
  const first = Math.floor(start / sliceSectors);
  const covered = lazy.coveredSectors;
  for (const dirty of [...lazy.dirtySlices()]) {
    if (dirty.index < first || dirty.index > last) continue;
    await handle.write(dirty.bytes, 0, dirty.bytes.length, dirty.position);
    lazy.markWritten(dirty.index * sliceSectors, Math.min(covered, (dirty.index + 1) * sliceSectors));
  }
}

describe('LazyBitmap', () => {
  const tmp = useTempDir();

  it('matches a whole in-memory SectorBitmap under random sets, clears, write-backs and scans, with slices evicted under pressure', async () => {
    const bitmapLength = 203; // not a multiple of the slice size
    const covered = bitmapLength * 8 - 5;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.record({ op: fc.constant('set' as const), start: fc.nat(covered - 1), length: fc.integer({ min: 1, max: 300 }), value: fc.boolean() }),
            fc.record({ op: fc.constant('writeBack' as const), start: fc.nat(covered - 1), length: fc.integer({ min: 1, max: 800 }) }),
            fc.record({ op: fc.constant('get' as const), sector: fc.nat(covered - 1) }),
            fc.record({ op: fc.constant('scan' as const), start: fc.nat(covered - 1), length: fc.integer({ min: 0, max: 1600 }) }),
          ),
          { maxLength: 40 },
        ),
        fc.uint8Array({ minLength: bitmapLength, maxLength: bitmapLength }),
        async (ops, initial) => {
          const file = path.join(tmp.path, 'model.cow');
          bitmapFile(file, bitmapLength, [[0, initial]]);
          const model = new SectorBitmap(Uint8Array.from(initial), covered);
          const onDisk = Uint8Array.from(initial);
          await opened(file, async (handle) => {
            const lazy = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: covered, sliceBytes: 16, maxCachedBytes: 40 });
            for (const step of ops) {
              if (step.op === 'set') {
                const end = Math.min(covered, step.start + step.length);
                await lazy.setRange(step.start, end, step.value);
                model.setRange(step.start, end, step.value);
              } else if (step.op === 'writeBack') {
                const end = Math.min(covered, step.start + step.length);
                await writeDirty(lazy, handle, step.start, end);
                // Every slice touching [start, end) now has its changes on disk.
                const first = Math.floor(step.start / 128) * 16;
                const last = Math.min(bitmapLength, Math.ceil(end / 128) * 16);
                onDisk.set(model.bytes.subarray(first, last), first);
              } else if (step.op === 'get') {
                expect(await lazy.get(step.sector)).toBe(model.get(step.sector));
              } else {
                const end = Math.min(covered, step.start + step.length);
                expect(await lazy.countSet(step.start, end)).toBe(model.countSet(step.start, end));
                expect(await collect(lazy.allocatedRuns(step.start, end))).toEqual([...model.allocatedRuns(step.start, end)].map((r) => [r.start, r.end]));
              }
              // Dirty slices stay; clean ones go once over the bound.
              const dirty = [...lazy.dirtySlices()].length;
              expect(lazy.cachedBytes).toBeLessThanOrEqual(Math.max(40, dirty * 16 + 16));
            }
            // Unwritten changes are still all there, evictions notwithstanding.
            expect(await lazy.countSet()).toBe(model.countSet());
            // The file holds exactly what was written back, and after a full write-back, everything.
            const fd = fs.openSync(file, 'r');
            const disk = Buffer.alloc(bitmapLength);
            fs.readSync(fd, disk, 0, bitmapLength, OFFSET);
            expect([...disk]).toEqual([...onDisk]);
            await writeDirty(lazy, handle);
            fs.readSync(fd, disk, 0, bitmapLength, OFFSET);
            fs.closeSync(fd);
            expect([...disk]).toEqual([...model.bytes]);
            expect([...lazy.dirtySlices()]).toEqual([]);
          });
        },
      ),
      { numRuns: 60 },
    );
  });

  it('keeps memory bounded while scanning, never evicts dirty or pinned slices, and evicts them once written', async () => {
    const file = path.join(tmp.path, 'pressure.cow');
    const bitmapLength = 64 * 1024;
    bitmapFile(file, bitmapLength, [[0, new Uint8Array(bitmapLength).fill(0x11)]]);
    await opened(file, async (handle) => {
      const lazy = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: bitmapLength * 8, sliceBytes: 1024, maxCachedBytes: 4096 });
      expect(await lazy.countSet()).toBe(bitmapLength * 2);
      expect(lazy.cachedBytes).toBeLessThanOrEqual(4096);
      expect(lazy.stats.loads).toBe(64);
      expect(lazy.stats.evictions).toBe(60);
      // A pinned slice survives a scan that would evict it.
      const pinned = await lazy.acquire(0, 10);
      await lazy.countSet();
      expect(lazy.peek(0)).toBe(true);
      pinned.release();
      // Dirty slices stay beyond the bound until written.
      for (let slice = 0; slice < 12; slice++) await lazy.setRange(slice * 8192 + 1, slice * 8192 + 2);
      await lazy.countSet();
      expect(lazy.cachedBytes).toBeGreaterThanOrEqual(12 * 1024);
      expect(lazy.overBudget).toBe(true);
      expect([...lazy.dirtySlices()].map((d) => [d.index, d.position, d.bytes.length])).toEqual(
        Array.from({ length: 12 }, (_, index) => [index, OFFSET + index * 1024, 1]),
      );
      await writeDirty(lazy, handle);
      expect(lazy.overBudget).toBe(false);
      expect(readByte(file, OFFSET + 11 * 1024)).toBe(0x13);
    });
  });

  it('scans skip the holes of a sparse 1 GiB bitmap (an 8 Ti-sector disk) and read only its data', async () => {
    const file = path.join(tmp.path, 'sparse.cow');
    const bitmapLength = 1 << 30;
    bitmapFile(file, bitmapLength, [[5 << 20, new Uint8Array([0x0f])], [700 << 20, new Uint8Array(4096).fill(0xff)]]);
    await opened(file, async (handle) => {
      const lazy = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: bitmapLength * 8 });
      expect(await lazy.countSet()).toBe(4 + 4096 * 8);
      // The file's 4 KiB blocks holding data: the header's (bitmap bytes 0-2559, slice 0) and the
      // blocks of the two writes, each straddling a slice boundary (the bitmap starts at 1536).
      expect(lazy.stats.loads).toBe(5);
      expect(lazy.stats.holesSkipped).toBeGreaterThan(16_000);
      expect(await collect(lazy.allocatedRuns())).toEqual([
        [(5 << 20) * 8, (5 << 20) * 8 + 4],
        [(700 << 20) * 8, (700 << 20) * 8 + 4096 * 8],
      ]);
    });
  });

  it('without SEEK_DATA (a handle lacking it) the same scan reads every slice and gets the same answer', async () => {
    const file = path.join(tmp.path, 'sparse-small.cow');
    const bitmapLength = 4 << 20;
    bitmapFile(file, bitmapLength, [[3 << 20, new Uint8Array([0x80])]]);
    await opened(file, async (handle) => {
      const lazy = new LazyBitmap({ file: wrapHandle(handle, {}), path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: bitmapLength * 8, maxCachedBytes: 256 * 1024 });
      expect(await collect(lazy.allocatedRuns())).toEqual([[(3 << 20) * 8 + 7, (3 << 20) * 8 + 8]]);
      expect(lazy.stats.loads).toBe(64);
      expect(lazy.stats.holesSkipped).toBe(0);
      expect(lazy.cachedBytes).toBeLessThanOrEqual(256 * 1024);
    });
  });

  it('handles the 2^31-sector and 2^32-byte edges of a >= 4 GiB bitmap (a 16 TiB disk) in a sparse file', async () => {
    const file = path.join(tmp.path, 'edge.cow');
    const bitmapLength = 2 ** 32 + 8192;
    const covered = bitmapLength * 8 - 3;
    bitmapFile(file, bitmapLength);
    const sectors = [0, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 35 - 1, 2 ** 35, 2 ** 35 + 9, covered - 1];
    await opened(file, async (handle) => {
      const lazy = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: covered });
      for (const sector of sectors) await lazy.setRange(sector, sector + 1);
      // A run across the slice boundary at 2^31 sectors.
      await lazy.setRange(2 ** 31 - 20, 2 ** 31 + 20);
      await writeDirty(lazy, handle);
      for (const sector of sectors) {
        expect(readByte(file, OFFSET + Math.floor(sector / 8)) & (1 << (sector % 8)), `sector ${sector}`).not.toBe(0);
      }
      expect(() => lazy.peek(covered)).toThrow(RangeError);
      // A fresh cache sees them from the file, scanning 65,537 slices mostly as holes.
      const again = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength, coveredSectors: covered });
      expect(await again.get(2 ** 35 + 9)).toBe(true);
      expect(await again.get(2 ** 35 + 8)).toBe(false);
      expect(await collect(again.allocatedRuns())).toEqual([
        [0, 1],
        [2 ** 31 - 20, 2 ** 31 + 20],
        [2 ** 32 - 1, 2 ** 32 + 1],
        [2 ** 35 - 1, 2 ** 35 + 1],
        [2 ** 35 + 9, 2 ** 35 + 10],
        [covered - 1, covered],
      ]);
      expect(await again.countSet()).toBe(1 + 40 + 2 + 2 + 1 + 1);
      expect(again.stats.loads).toBeLessThanOrEqual(12);
    });
  });

  it('names the file when the bitmap is cut short or cannot be read', async () => {
    const file = path.join(tmp.path, 'short.cow');
    fs.writeFileSync(file, Buffer.alloc(OFFSET + 1024 + 100));
    await opened(file, async (handle) => {
      const lazy = new LazyBitmap({ file: handle, path: file, bitmapOffset: OFFSET, bitmapLength: 4096, coveredSectors: 4096 * 8, sliceBytes: 1024 });
      expect(await lazy.get(0)).toBe(false);
      const err = await lazy.get(1024 * 8).then(() => undefined, (e: unknown) => e);
      expect(err).toBeInstanceOf(CowFormatError);
      expect((err as CowFormatError).code).toBe('truncated-bitmap');
      expect((err as CowFormatError).message).toBe(`${file}: bitmap is cut off at byte 1124, expected 4096 bytes`);
      const failing = wrapHandle(handle, { read: async () => Promise.reject(Object.assign(new Error('EIO (injected)'), { code: 'EIO' })) });
      const broken = new LazyBitmap({ file: failing, path: file, bitmapOffset: OFFSET, bitmapLength: 4096, coveredSectors: 4096 * 8 });
      const ioErr = await broken.get(5).then(() => undefined, (e: unknown) => e);
      expect(ioErr).toBeInstanceOf(UbdcowError);
      expect((ioErr as UbdcowError).message).toBe(`${file}: cannot read the bitmap of: input/output error (EIO)`);
    });
  });

  it('lazyBitmapOf reads the bitmap of a real COW made by createCow, as the whole-bitmap reader does', async () => {
    const backing = path.join(tmp.path, 'base.img');
    fs.writeFileSync(backing, Buffer.alloc(64 << 20));
    const cowPath = path.join(tmp.path, 'vm.cow');
    await createCow(cowPath, backing);
    await writeCowSectors(cowPath, [{ sector: 3, data: new Uint8Array(512) }, { sector: 100_000, data: new Uint8Array(4096) }]);
    const image = await openImage(cowPath, { mode: 'r' });
    try {
      const whole = await readWholeBitmap(image);
      const lazy = lazyBitmapOf(image, { sliceBytes: 1024 });
      expect(lazy.coveredSectors).toBe(whole.bitCount);
      expect(await collect(lazy.allocatedRuns())).toEqual([...whole.allocatedRuns()].map((r) => [r.start, r.end]));
      expect(await collect(lazy.allocatedRuns())).toEqual([[3, 4], [100_000, 100_008]]);
    } finally {
      await image.file.close();
    }
  });
});
