import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { isAllZero, isAllZeroAt } from '../../src/format/zero-bytes.js';

/* isAllZero decides which blocks become holes; isAllZeroAt asks it of a part in place. */
describe('isAllZero / isAllZeroAt', () => {
  it('agrees with a byte-by-byte check on any part of any buffer, across 64 KiB pieces', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 200_000 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 3 }),
        fc.nat(),
        fc.nat(),
        (size, marks, a, b) => {
          const bytes = new Uint8Array(size);
          for (const [at, value] of marks) if (size > 0) bytes[at % size] = value;
          const start = size === 0 ? 0 : a % (size + 1);
          const end = start + (size - start === 0 ? 0 : b % (size - start + 1));
          const naive = bytes.subarray(start, end).every((byte) => byte === 0);
          expect(isAllZeroAt(bytes, start, end)).toBe(naive);
          expect(isAllZero(bytes.subarray(start, end))).toBe(naive);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('sees a single set byte at either edge of a part, and nothing outside it', () => {
    const bytes = new Uint8Array(3 * 65536 + 10);
    bytes[65536 + 4096] = 1;
    expect(isAllZeroAt(bytes, 65536, 65536 + 4096)).toBe(true);
    expect(isAllZeroAt(bytes, 65536 + 4096, 65536 + 8192)).toBe(false);
    expect(isAllZeroAt(bytes, 65536 + 4097, bytes.length)).toBe(true);
    expect(isAllZeroAt(bytes, 0, bytes.length)).toBe(false);
    expect(isAllZeroAt(bytes, 10, 10)).toBe(true);
  });
});
