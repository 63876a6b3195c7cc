import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { CowFormatError, UbdcowError } from '../../src/errors.js';
import { serializeV1, serializeV2, serializeV3 } from '../../src/format/header.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import { openImage } from '../../src/io/image/image.js';
import { allocatedExtents, bitmapSlices, readWholeBitmap } from '../../src/io/bitmap/allocation.js';
import { useTempDir } from '../helpers/tmp.js';

const tmp = useTempDir();

/** Writes a COW file: header, then `bitmap` at the bitmap offset; returns its geometry. */
function writeCow(file: string, headerBytes: Uint8Array, bitmap: Uint8Array, length?: number) {
  const geometry = computeGeometry(parseHeader(headerBytes).header);
  const fd = fs.openSync(file, 'w');
  try {
    fs.writeSync(fd, headerBytes, 0, headerBytes.length, 0);
    fs.writeSync(fd, bitmap, 0, bitmap.length, geometry.bitmapOffset);
    fs.ftruncateSync(fd, length ?? geometry.fileLength);
  } finally {
    fs.closeSync(fd);
  }
  return geometry;
}

function v3Fields(size: number) {
  return { backingFile: '/nonexistent/base.img', mtime: 1, size, sectorSize: 512, alignment: 4096 };
}

/** Allocated extents of a bitmap, bit by bit, limited to the first `sectors` bits. */
function referenceExtents(bitmap: Uint8Array, sectors: number): Array<{ start: number; end: number }> {
  const extents: Array<{ start: number; end: number }> = [];
  for (let s = 0; s < sectors; s++) {
    if (((bitmap[s >> 3] >> (s & 7)) & 1) === 0) continue;
    const last = extents[extents.length - 1];
    if (last && last.end === s) last.end = s + 1;
    else extents.push({ start: s, end: s + 1 });
  }
  return extents;
}

async function collect<T>(source: AsyncIterable<T>): Promise<T[]> {
  const items: T[] = [];
  for await (const item of source) items.push(item);
  return items;
}

describe('openImage', () => {
  it('reads header, geometry, sizes and nothing truncated for a complete file', async () => {
    const file = path.join(tmp.path, 'a.cow');
    writeCow(file, serializeV3(v3Fields(1 << 20)), new Uint8Array(256));
    const image = await openImage(file);
    try {
      expect(image.header.size).toBe(1 << 20);
      expect(image.geometry).toMatchObject({ bitmapOffset: 8192, bitmapLength: 256, dataOffset: 12288 });
      expect(image.fileSize).toBe(12288 + (1 << 20));
      expect(image.dataAreaTruncated).toBe(false);
      expect(image.warnings).toEqual([]);
    } finally {
      await image.handle.close();
    }
  });

  it("refuses a file shorter than the bitmap's end with 'truncated-bitmap'", async () => {
    const file = path.join(tmp.path, 'short.cow');
    writeCow(file, serializeV3(v3Fields(8 << 20)), new Uint8Array(0), 8192 + 2047);
    const err = await openImage(file).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CowFormatError);
    expect((err as CowFormatError).code).toBe('truncated-bitmap');
    expect((err as CowFormatError).message).toBe(`${file}: file length is 10239, expected at least 10240 bytes (the bitmap ends there)`);
  });

  it('accepts a file that ends exactly at the bitmap end, and says the data area is truncated', async () => {
    const file = path.join(tmp.path, 'bitmap-only.cow');
    writeCow(file, serializeV3(v3Fields(8 << 20)), new Uint8Array(0), 8192 + 2048);
    const image = await openImage(file);
    await image.handle.close();
    expect(image.dataAreaTruncated).toBe(true);
  });

  it('a header alone (shorter than the V3 struct) is a truncated header, named in the file', async () => {
    const file = path.join(tmp.path, 'header-only.cow');
    fs.writeFileSync(file, serializeV3(v3Fields(4096)).subarray(0, 1000));
    const err = (await openImage(file).catch((e: unknown) => e)) as CowFormatError;
    expect(err.code).toBe('truncated-header');
    expect(err.message).toBe(`${file}: header is 1000 bytes long, expected at least 4128 bytes for a v3 header`);
  });

  it("an empty file is 'empty'", async () => {
    const file = path.join(tmp.path, 'empty.cow');
    fs.writeFileSync(file, '');
    const err = (await openImage(file).catch((e: unknown) => e)) as UbdcowError;
    expect(err.code).toBe('empty');
    expect(err.message).toBe(`${file}: file is empty, expected a UML COW file`);
  });

  it('a directory, a FIFO and a missing file are refused before anything is opened', async () => {
    const dirErr = (await openImage(tmp.path).catch((e: unknown) => e)) as UbdcowError;
    expect(dirErr.code).toBe('not-a-file');
    expect(dirErr.message).toBe(`${tmp.path}: is a directory, expected a COW file`);
    const missing = path.join(tmp.path, 'nope.cow');
    const missingErr = (await openImage(missing).catch((e: unknown) => e)) as UbdcowError;
    expect(missingErr.code).toBe('ENOENT');
    expect(missingErr.message).toBe(`${missing}: cannot open COW file: no such file or directory (ENOENT)`);
    const fifo = path.join(tmp.path, 'pipe');
    execFileSync('mkfifo', [fifo]);
    const fifoErr = (await openImage(fifo).catch((e: unknown) => e)) as UbdcowError;
    expect(fifoErr.code).toBe('not-a-file');
    expect(fifoErr.message).toBe(`${fifo}: is a FIFO (named pipe), expected a COW file (a regular file or block device)`);
  });

  it('passes header warnings on', async () => {
    const file = path.join(tmp.path, 'big-sectors.cow');
    writeCow(file, serializeV3({ ...v3Fields(1 << 20), sectorSize: 4096 }), new Uint8Array(32));
    const image = await openImage(file);
    await image.handle.close();
    expect(image.warnings).toEqual(["sector size is 4096; the kernel's ubd driver assumes 512"]);
  });
});

describe('allocatedExtents and bitmapSlices', () => {
  it('match a bit-by-bit reading for any chunk size, merging runs across chunk boundaries', async () => {
    const file = path.join(tmp.path, 'random.cow');
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ minLength: 1, maxLength: 64 }).chain((bytes) =>
          fc.record({
            bytes: fc.constant(bytes),
            sectors: fc.integer({ min: Math.max(1, bytes.length * 8 - 7), max: bytes.length * 8 }),
            chunkBytes: fc.integer({ min: 1, max: 70 }),
          }),
        ),
        async ({ bytes, sectors, chunkBytes }) => {
          writeCow(file, serializeV3(v3Fields(sectors * 512)), bytes);
          const image = await openImage(file);
          try {
            expect(await collect(allocatedExtents(image, chunkBytes))).toEqual(referenceExtents(bytes, sectors));
            const slices = await collect(bitmapSlices(image, chunkBytes));
            expect(slices.length).toBe(Math.ceil(bytes.length / chunkBytes));
            expect(slices.map((s) => s.firstSector)).toEqual(slices.map((_, i) => i * chunkBytes * 8));
            expect(slices.reduce((sum, s) => sum + s.bitCount, 0)).toBe(sectors);
          } finally {
            await image.handle.close();
          }
        },
      ),
      { numRuns: 60 },
    );
  });

  it('one extent spanning every 1-byte chunk comes out whole', async () => {
    const file = path.join(tmp.path, 'full.cow');
    writeCow(file, serializeV3(v3Fields(64 * 512)), new Uint8Array(8).fill(0xff));
    const image = await openImage(file);
    try {
      expect(await collect(allocatedExtents(image, 1))).toEqual([{ start: 0, end: 64 }]);
    } finally {
      await image.handle.close();
    }
  });

  it('ignores set bits past the last sector in the last bitmap byte', async () => {
    const file = path.join(tmp.path, 'tail.cow');
    writeCow(file, serializeV3(v3Fields(11 * 512)), Uint8Array.of(0x00, 0xfc));
    const image = await openImage(file);
    try {
      expect(await collect(allocatedExtents(image))).toEqual([{ start: 10, end: 11 }]);
      expect((await readWholeBitmap(image)).countSet()).toBe(1);
    } finally {
      await image.handle.close();
    }
  });

  it.each([
    ['V1', serializeV1, 280],
    ['V2', serializeV2, 4120],
  ] as const)('%s: only covered sectors are reported (the historic rounding)', async (_name, serialize, bitmapOffset) => {
    const file = path.join(tmp.path, 'old.cow');
    // 20 sectors: a 2-byte bitmap covers 16 of them.
    const geometry = writeCow(file, serialize(v3Fields(20 * 512)), Uint8Array.of(0x80, 0xc0));
    expect(geometry.bitmapOffset).toBe(bitmapOffset);
    const image = await openImage(file);
    try {
      expect(image.geometry.coveredSectors).toBe(16);
      expect(await collect(allocatedExtents(image, 1))).toEqual([
        { start: 7, end: 8 },
        { start: 14, end: 16 },
      ]);
    } finally {
      await image.handle.close();
    }
  });

  it('a V3 disk of size 0 has no bitmap and no extents', async () => {
    const file = path.join(tmp.path, 'zero.cow');
    writeCow(file, serializeV3(v3Fields(0)), new Uint8Array(0));
    const image = await openImage(file);
    try {
      expect(await collect(allocatedExtents(image))).toEqual([]);
      expect(await collect(bitmapSlices(image))).toEqual([]);
      expect((await readWholeBitmap(image)).bitCount).toBe(0);
    } finally {
      await image.handle.close();
    }
  });
});
