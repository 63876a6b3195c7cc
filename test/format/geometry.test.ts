import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { CowFormatError } from '../../src/errors.js';
import { type CowHeader, type HeaderLayout } from '../../src/format/header.js';
import { computeGeometry } from '../../src/format/geometry.js';

function header(layout: HeaderLayout, size: number, sectorSize = 512, alignment = 4096): CowHeader {
  const version = layout === 'v1' ? 1 : layout === 'v2' ? 2 : 3;
  return {
    version,
    layout,
    littleEndian: layout === 'v1',
    backingFile: '/base.img',
    mtime: 0,
    size,
    sectorSize,
    alignment: version === 3 ? alignment : sectorSize,
    cowFormat: 0,
  };
}

describe('V3 geometry (what uml_mkcow and the kernel create)', () => {
  it('8 MiB backing: bitmap at 8192, 2048 bytes long, data at 12288, file 8400896 bytes', () => {
    expect(computeGeometry(header('v3', 8 * 1024 * 1024))).toEqual({
      headerSize: 4128,
      bitmapOffset: 8192,
      bitmapLength: 2048,
      dataOffset: 12288,
      sectors: 16384,
      coveredSectors: 16384,
      fileLength: 8400896,
    });
  });

  it('empty backing: no bitmap, data at 8192, file 8192 bytes (uml_mkcow makes the same)', () => {
    expect(computeGeometry(header('v3', 0))).toMatchObject({ bitmapLength: 0, dataOffset: 8192, sectors: 0, fileLength: 8192 });
  });

  it('1-byte backing: one partial sector still gets a bit and a bitmap byte', () => {
    expect(computeGeometry(header('v3', 1))).toMatchObject({ bitmapLength: 1, dataOffset: 12288, sectors: 1, coveredSectors: 1, fileLength: 12289 });
  });

  it('a bitmap that crosses into the next alignment unit pushes the data area out', () => {
    // 4096 bitmap bytes cover 32768 sectors; one more sector needs a 4097th byte.
    expect(computeGeometry(header('v3', 32768 * 512)).dataOffset).toBe(8192 + 4096);
    expect(computeGeometry(header('v3', 32769 * 512)).dataOffset).toBe(8192 + 8192);
  });

  it('alignment 512 puts the bitmap right after the rounded-up header', () => {
    expect(computeGeometry(header('v3', 8 * 1024 * 1024, 512, 512))).toMatchObject({ bitmapOffset: 4608, dataOffset: 4608 + 2048 });
  });

  it('broken V3 rounds its 4136-byte header up to the alignment', () => {
    expect(computeGeometry(header('v3-broken', 65536 + 300))).toMatchObject({
      headerSize: 4136,
      bitmapOffset: 8192,
      bitmapLength: 17,
      dataOffset: 12288,
      sectors: 129,
      coveredSectors: 129,
      fileLength: 12288 + 65836,
    });
  });

  it('3 GiB: 768 KiB of bitmap', () => {
    expect(computeGeometry(header('v3', 3 * 2 ** 30))).toMatchObject({ bitmapLength: 786432, dataOffset: 8192 + 786432 });
  });

  it('always covers every sector and aligns both areas (random sizes and alignments)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 2 ** 50 }),
        fc.constantFrom(512, 1024, 4096, 65536),
        fc.constantFrom(512, 4096, 8192, 1 << 20, 3000),
        (size, sectorSize, alignment) => {
          const g = computeGeometry(header('v3', size, sectorSize, alignment));
          expect(g.sectors).toBe(Math.ceil(size / sectorSize));
          expect(g.coveredSectors).toBe(g.sectors);
          expect(g.bitmapLength * 8).toBeGreaterThanOrEqual(g.sectors);
          expect(g.bitmapLength * 8 - g.sectors).toBeLessThan(8);
          expect(g.bitmapOffset % alignment).toBe(0);
          expect(g.bitmapOffset).toBeGreaterThanOrEqual(4128);
          expect(g.dataOffset % alignment).toBe(0);
          expect(g.dataOffset).toBeGreaterThanOrEqual(g.bitmapOffset + g.bitmapLength);
          expect(g.dataOffset - (g.bitmapOffset + g.bitmapLength)).toBeLessThan(alignment);
          expect(g.fileLength).toBe(g.dataOffset + size);
        },
      ),
    );
  });
});

describe('V1 and V2 geometry (historic rounding)', () => {
  it.each([
    ['v1', 280],
    ['v2', 4120],
  ] as const)('%s: bitmap right after the %d-byte header, data at the next sector boundary', (layout, structSize) => {
    const g = computeGeometry(header(layout, 1024 * 1024));
    expect(g.headerSize).toBe(structSize);
    expect(g.bitmapOffset).toBe(structSize);
    expect(g.bitmapLength).toBe(256);
    expect(g.dataOffset).toBe(Math.ceil((structSize + 256) / 512) * 512);
    expect(g.coveredSectors).toBe(2048);
    expect(g.fileLength).toBe(g.dataOffset + 1024 * 1024);
  });

  it('9 sectors: the bitmap is one byte, so sector 8 has no bit (coveredSectors < sectors)', () => {
    const g = computeGeometry(header('v2', 9 * 512));
    expect(g).toMatchObject({ bitmapLength: 1, sectors: 9, coveredSectors: 8 });
  });

  it('7 sectors: the bitmap rounds down to nothing', () => {
    const g = computeGeometry(header('v1', 7 * 512));
    expect(g).toMatchObject({ bitmapLength: 0, sectors: 7, coveredSectors: 0, dataOffset: 512 });
  });

  it('64 KiB + 300 bytes (the tiny fixture): 129 sectors, 128 covered', () => {
    expect(computeGeometry(header('v1', 65836))).toMatchObject({ bitmapOffset: 280, bitmapLength: 16, dataOffset: 512, sectors: 129, coveredSectors: 128, fileLength: 66348 });
    expect(computeGeometry(header('v2', 65836))).toMatchObject({ bitmapOffset: 4120, bitmapLength: 16, dataOffset: 4608, sectors: 129, coveredSectors: 128, fileLength: 70444 });
  });

  it('V3 covers the same disks fully', () => {
    expect(computeGeometry(header('v3', 9 * 512)).coveredSectors).toBe(9);
    expect(computeGeometry(header('v3', 7 * 512)).coveredSectors).toBe(7);
  });

  it('the data offset follows the sector size, not a separate alignment', () => {
    const g = computeGeometry(header('v2', 4096 * 64, 4096));
    expect(g.bitmapLength).toBe(8);
    expect(g.dataOffset).toBe(8192);
  });

  it('leaves at most 7 sectors uncovered, and only when the sector count is not a multiple of 8', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 2 ** 45 }), fc.constantFrom<HeaderLayout>('v1', 'v2'), (size, layout) => {
        const g = computeGeometry(header(layout, size));
        expect(g.bitmapLength).toBe(Math.floor((size + 511) / 4096));
        expect(g.coveredSectors).toBe(g.bitmapLength * 8);
        expect(g.sectors - g.coveredSectors).toBe(g.sectors % 8);
        expect(g.dataOffset % 512).toBe(0);
      }),
    );
  });
});

describe('sizes near the limit', () => {
  it('refuses a size whose data area would end past 2^53', () => {
    let err: unknown;
    try {
      computeGeometry(header('v3', Number.MAX_SAFE_INTEGER));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CowFormatError);
    expect((err as CowFormatError).code).toBe('too-large');
    expect((err as CowFormatError).field).toBe('size');
    expect((err as CowFormatError).message).toContain('below 2^53');
  });

  it('accepts a size whose data area ends just below 2^53', () => {
    const size = 2 ** 53 - 2 ** 42;
    const g = computeGeometry(header('v3', size));
    expect(Number.isSafeInteger(g.fileLength)).toBe(true);
    expect(g.sectors).toBe(size / 512);
  });
});
