import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { SectorBitmap } from '../../src/format/bitmap.js';
import { planRead } from '../../src/format/read-plan.js';

/** The rule, byte by byte: from the COW where the sector is covered and its bit set, else the backing. */
function naive(bits: boolean[], sectorSize: number, covered: number, offset: number, end: number): boolean[] {
  const out: boolean[] = [];
  for (let byte = offset; byte < end; byte++) {
    const sector = Math.floor(byte / sectorSize);
    out.push(sector < covered && bits[sector]);
  }
  return out;
}

function bitmapOf(bits: boolean[], covered: number, firstSector = 0, count = covered - firstSector): SectorBitmap {
  const bitmap = SectorBitmap.empty(count);
  for (let sector = firstSector; sector < firstSector + count; sector++) if (bits[sector]) bitmap.set(sector - firstSector);
  return new SectorBitmap(bitmap.bytes, count, firstSector);
}

describe('planRead (the one read rule of the engine and the virtual disk)', () => {
  it('plans every byte where the naive per-sector rule says, in order, with neighbours merged', () => {
    fc.assert(
      fc.property(
        fc.array(fc.boolean(), { minLength: 1, maxLength: 80 }),
        fc.integer({ min: 0, max: 8 }),
        fc.constantFrom(4, 8, 512),
        fc.nat(),
        fc.nat(),
        (bits, uncovered, sectorSize, a, b) => {
          const sectors = bits.length;
          const covered = Math.max(0, sectors - uncovered);
          const size = sectors * sectorSize - (a % sectorSize);
          const offset = a % (size + 1);
          const end = offset + (b % (size - offset + 1));
          const plan = planRead(bitmapOf(bits, covered), sectorSize, covered, offset, end);
          expect(plan.end).toBe(end);
          const planned: boolean[] = [];
          let at = offset;
          for (const [index, span] of plan.spans.entries()) {
            expect(span.diskOffset).toBe(at);
            expect(span.length).toBeGreaterThan(0);
            if (index > 0) expect(span.fromCow).not.toBe(plan.spans[index - 1].fromCow);
            for (let i = 0; i < span.length; i++) planned.push(span.fromCow);
            at += span.length;
          }
          expect(planned).toEqual(naive(bits, sectorSize, covered, offset, end));
        },
      ),
      { numRuns: 500 },
    );
  });

  it('stops where a bitmap window ends, so a windowed reader continues from `end`', () => {
    const bits = [true, true, false, false, true, true, true, false];
    const window = bitmapOf(bits, 8, 0, 4);
    const first = planRead(window, 512, 8, 100, 8 * 512);
    expect(first.end).toBe(4 * 512);
    expect(first.spans).toEqual([
      { fromCow: true, diskOffset: 100, length: 2 * 512 - 100 },
      { fromCow: false, diskOffset: 2 * 512, length: 2 * 512 },
    ]);
    const rest = planRead(bitmapOf(bits, 8, 4, 4), 512, 8, first.end, 8 * 512);
    expect(rest).toEqual({
      end: 8 * 512,
      spans: [
        { fromCow: true, diskOffset: 4 * 512, length: 3 * 512 },
        { fromCow: false, diskOffset: 7 * 512, length: 512 },
      ],
    });
  });

  it('refuses a window that does not hold the first sector (a caller bug, not a disk problem)', () => {
    expect(() => planRead(bitmapOf([true, true, true, true], 4, 2, 2), 512, 4, 0, 512)).toThrow(RangeError);
  });
});
