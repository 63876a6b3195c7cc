import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { liveSpans } from '../../src/commands/commit/new-file.js';
import { HOLE_BLOCK_BYTES } from '../../src/commands/commit/shared.js';

/** Sorted, non-overlapping spans inside [0, length). */
const spansArb = (length: number) =>
  fc.uniqueArray(fc.integer({ min: 0, max: length }), { maxLength: 12 }).map((points) => {
    const sorted = [...points].sort((a, b) => a - b);
    const spans: { start: number; end: number }[] = [];
    for (let i = 0; i + 1 < sorted.length; i += 2) if (sorted[i] < sorted[i + 1]) spans.push({ start: sorted[i], end: sorted[i + 1] });
    return spans;
  });

describe('liveSpans (the parts of a commit window that can hold data)', () => {
  it('covers every byte of both inputs, only whole hole blocks that touch them, sorted and apart', () => {
    const length = 16 * HOLE_BLOCK_BYTES + 1000;
    fc.assert(
      fc.property(spansArb(length), spansArb(length), (a, b) => {
        const live = liveSpans(a, b, length);
        const inLive = (at: number) => live.some((s) => s.start <= at && at < s.end);
        for (const span of [...a, ...b]) for (let at = span.start; at < span.end; at += 97) expect(inLive(at)).toBe(true);
        for (let i = 0; i < live.length; i++) {
          const span = live[i];
          expect(span.start % HOLE_BLOCK_BYTES).toBe(0);
          expect(span.end === length || span.end % HOLE_BLOCK_BYTES === 0).toBe(true);
          if (i > 0) expect(span.start).toBeGreaterThan(live[i - 1].end);
          // Every block of a live span touches some input byte.
          for (let block = span.start; block < span.end; block += HOLE_BLOCK_BYTES) {
            const blockEnd = Math.min(block + HOLE_BLOCK_BYTES, length);
            expect([...a, ...b].some((s) => s.start < blockEnd && s.end > block)).toBe(true);
          }
        }
      }),
      { numRuns: 300 },
    );
  });
});
