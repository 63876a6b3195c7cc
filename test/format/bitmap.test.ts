import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SectorBitmap, type SectorRun } from '../../src/format/bitmap.js';

/* A naive bit-by-bit model of UML's bitmap: sector N is bit (N & 7) of byte N >> 3, LSB first. */
function refGet(bytes: Uint8Array, sector: number): boolean {
  return ((bytes[Math.floor(sector / 8)] >> sector % 8) & 1) === 1;
}

function refNext(bytes: Uint8Array, from: number, end: number, wanted: boolean): number {
  for (let s = from; s < end; s++) if (refGet(bytes, s) === wanted) return s;
  return end;
}

function refCount(bytes: Uint8Array, start: number, end: number): number {
  let count = 0;
  for (let s = start; s < end; s++) if (refGet(bytes, s)) count++;
  return count;
}

function refRuns(bytes: Uint8Array, start: number, end: number): SectorRun[] {
  const runs: SectorRun[] = [];
  for (let s = start; s < end; s++) {
    const allocated = refGet(bytes, s);
    const last = runs[runs.length - 1];
    if (last && last.allocated === allocated) last.end = s + 1;
    else runs.push({ start: s, end: s + 1, allocated });
  }
  return runs;
}

function refSetRange(bytes: Uint8Array, start: number, end: number, value: boolean): void {
  for (let s = start; s < end; s++) {
    if (value) bytes[Math.floor(s / 8)] |= 1 << s % 8;
    else bytes[Math.floor(s / 8)] &= ~(1 << s % 8);
  }
}

/** Bytes that are mostly all-clear or all-set in runs, so the word-skipping paths get exercised. */
const byteRuns = fc
  .array(
    fc.record({
      value: fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, { weight: 3, arbitrary: fc.constant(0xff) }, { weight: 2, arbitrary: fc.integer({ min: 0, max: 255 }) }),
      repeat: fc.integer({ min: 1, max: 24 }),
    }),
    { maxLength: 12 },
  )
  .map((runs) => Uint8Array.from(runs.flatMap(({ value, repeat }) => Array<number>(repeat).fill(value))));

/**
 * A bitmap over a subarray that starts at a random byte offset of a larger buffer (so its 32-bit
 * words are misaligned), with a random bit count and a random [start, end) inside it.
 */
const scenario = fc
  .record({
    content: fc.oneof(byteRuns, fc.uint8Array({ maxLength: 40 })),
    byteOffset: fc.integer({ min: 0, max: 7 }),
    trailing: fc.integer({ min: 0, max: 5 }),
    bitsCut: fc.integer({ min: 0, max: 7 }),
    a: fc.nat(),
    b: fc.nat(),
    value: fc.boolean(),
  })
  .map(({ content, byteOffset, trailing, bitsCut, a, b, value }) => {
    const buffer = new Uint8Array(byteOffset + content.length + trailing).fill(0xa5);
    buffer.set(content, byteOffset);
    const bytes = buffer.subarray(byteOffset, byteOffset + content.length);
    const bitCount = Math.max(0, content.length * 8 - (content.length > 0 ? bitsCut : 0));
    const x = bitCount === 0 ? 0 : a % (bitCount + 1);
    const y = bitCount === 0 ? 0 : b % (bitCount + 1);
    return { buffer, byteOffset, bytes, bitCount, start: Math.min(x, y), end: Math.max(x, y), value };
  });

const runs = { numRuns: 400 };

describe('SectorBitmap against a bit-by-bit model', () => {
  it('get', () => {
    fc.assert(
      fc.property(scenario, ({ bytes, bitCount }) => {
        const bitmap = new SectorBitmap(bytes, bitCount);
        const sectors = Array.from({ length: bitCount }, (_, s) => s);
        expect(sectors.map((s) => bitmap.get(s))).toEqual(sectors.map((s) => refGet(bytes, s)));
      }),
      runs,
    );
  });

  it('nextSet and nextClear', () => {
    fc.assert(
      fc.property(scenario, ({ bytes, bitCount, start, end }) => {
        const bitmap = new SectorBitmap(bytes, bitCount);
        expect(bitmap.nextSet(start, end)).toBe(refNext(bytes, start, end, true));
        expect(bitmap.nextClear(start, end)).toBe(refNext(bytes, start, end, false));
        expect(bitmap.nextSet(start)).toBe(refNext(bytes, start, bitCount, true));
        expect(bitmap.nextClear(start)).toBe(refNext(bytes, start, bitCount, false));
        expect(bitmap.allSet(start, end)).toBe(refNext(bytes, start, end, false) === end);
        expect(bitmap.noneSet(start, end)).toBe(refNext(bytes, start, end, true) === end);
      }),
      runs,
    );
  });

  it('countSet', () => {
    fc.assert(
      fc.property(scenario, ({ bytes, bitCount, start, end }) => {
        const bitmap = new SectorBitmap(bytes, bitCount);
        expect(bitmap.countSet(start, end)).toBe(refCount(bytes, start, end));
        expect(bitmap.countSet()).toBe(refCount(bytes, 0, bitCount));
      }),
      runs,
    );
  });

  it('runs and allocatedRuns', () => {
    fc.assert(
      fc.property(scenario, ({ bytes, bitCount, start, end }) => {
        const bitmap = new SectorBitmap(bytes, bitCount);
        const expected = refRuns(bytes, start, end);
        expect([...bitmap.runs(start, end)]).toEqual(expected);
        expect([...bitmap.allocatedRuns(start, end)]).toEqual(expected.filter((r) => r.allocated));
        expect([...bitmap.runs()]).toEqual(refRuns(bytes, 0, bitCount));
      }),
      runs,
    );
  });

  it('setRange changes exactly [start, end) and nothing outside the slice', () => {
    fc.assert(
      fc.property(scenario, ({ buffer, byteOffset, bytes, bitCount, start, end, value }) => {
        const expected = Uint8Array.from(buffer);
        refSetRange(expected.subarray(byteOffset, byteOffset + bytes.length), start, end, value);
        new SectorBitmap(bytes, bitCount).setRange(start, end, value);
        expect(buffer).toEqual(expected);
      }),
      runs,
    );
  });

  it('set and get agree bit by bit after a sequence of writes', () => {
    fc.assert(
      fc.property(scenario, fc.array(fc.tuple(fc.nat(), fc.boolean()), { maxLength: 30 }), ({ bytes, bitCount }, writes) => {
        fc.pre(bitCount > 0);
        const model = Uint8Array.from(bytes);
        const bitmap = new SectorBitmap(bytes, bitCount);
        for (const [n, value] of writes) {
          const sector = n % bitCount;
          bitmap.set(sector, value);
          refSetRange(model, sector, sector + 1, value);
        }
        expect(Uint8Array.from(bytes)).toEqual(model);
      }),
      runs,
    );
  });
});

describe('SectorBitmap edge cases', () => {
  it('uses UML bit order: sector 0 is the low bit of byte 0, sector 15 the high bit of byte 1', () => {
    const bitmap = SectorBitmap.empty(16);
    bitmap.set(0);
    bitmap.set(15);
    bitmap.set(9);
    expect([...bitmap.bytes]).toEqual([0x01, 0x82]);
  });

  it('empty() rounds the byte count up', () => {
    const bitmap = SectorBitmap.empty(9);
    expect(bitmap.bytes.length).toBe(2);
    expect(bitmap.bitCount).toBe(9);
  });

  it('ignores bits past bitCount in the last byte', () => {
    const bitmap = new SectorBitmap(Uint8Array.of(0x00, 0xf0), 12);
    expect(bitmap.nextSet(0)).toBe(12);
    expect(bitmap.countSet()).toBe(0);
    expect([...bitmap.runs()]).toEqual([{ start: 0, end: 12, allocated: false }]);
    const full = new SectorBitmap(Uint8Array.of(0xff, 0x0f), 12);
    expect(full.nextClear(0)).toBe(12);
  });

  it('finds a bit after long all-clear and all-set word runs', () => {
    const bytes = new Uint8Array(4096);
    bytes[4000] = 0x10;
    const bitmap = new SectorBitmap(bytes);
    expect(bitmap.nextSet(0)).toBe(4000 * 8 + 4);
    bytes.fill(0xff);
    bytes[4001] = 0xfe;
    expect(bitmap.nextClear(3)).toBe(4001 * 8);
    expect(bitmap.countSet()).toBe(4096 * 8 - 1);
  });

  it('an empty range yields nothing and returns its end', () => {
    const bitmap = new SectorBitmap(Uint8Array.of(0xff));
    expect(bitmap.nextSet(5, 5)).toBe(5);
    expect(bitmap.countSet(3, 3)).toBe(0);
    expect([...bitmap.runs(4, 4)]).toEqual([]);
    expect([...new SectorBitmap(new Uint8Array(0)).runs()]).toEqual([]);
  });

  it('refuses ranges outside the slice and more bits than bytes', () => {
    const bitmap = new SectorBitmap(new Uint8Array(2), 12);
    expect(() => bitmap.get(12)).toThrow(RangeError);
    expect(() => bitmap.get(-1)).toThrow(RangeError);
    expect(() => bitmap.nextSet(0, 13)).toThrow('outside a bitmap of 12 sectors');
    expect(() => bitmap.setRange(5, 4)).toThrow(RangeError);
    expect(() => bitmap.countSet(0, 17)).toThrow(RangeError);
    expect(() => new SectorBitmap(new Uint8Array(2), 17)).toThrow('cannot hold 17 bits');
  });

  it('keeps firstSector for streamed slices', () => {
    expect(new SectorBitmap(new Uint8Array(4), 32, 8192).firstSector).toBe(8192);
  });

  it('sectors at and beyond 2^31 (a 256 MiB bitmap: the bit-index limit of bitfield)', () => {
    const bitCount = 2 ** 31 + 64;
    const bitmap = SectorBitmap.empty(bitCount);
    const high = 2 ** 31 + 9;
    bitmap.set(high);
    bitmap.set(2 ** 31 - 1);
    expect(bitmap.get(high)).toBe(true);
    expect(refGet(bitmap.bytes, high)).toBe(true);
    expect(bitmap.nextSet(0)).toBe(2 ** 31 - 1);
    expect(bitmap.nextSet(2 ** 31)).toBe(high);
    expect(bitmap.countSet()).toBe(2);
    bitmap.set(high, false);
    expect(bitmap.nextSet(2 ** 31)).toBe(bitCount);
  });
});
