import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ExtentList } from '../../src/format/extent-list.js';

/** Unit by unit: which label each position [0, size) got (the last add wins, as only sorted adds are made). */
function paint(adds: Array<{ start: number; end: number; label: number }>, size: number): Array<number | undefined> {
  const cells: Array<number | undefined> = new Array(size).fill(undefined);
  for (const { start, end, label } of adds) for (let i = start; i < end; i++) cells[i] = label;
  return cells;
}

describe('ExtentList (the one add-and-coalesce builder)', () => {
  it('merges touching or overlapping ranges of one label and keeps others apart, however the adds come in order', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ gap: fc.integer({ min: -3, max: 3 }), length: fc.integer({ min: 0, max: 5 }), label: fc.integer({ min: 0, max: 1 }) }), { maxLength: 30 }),
        (steps) => {
          const list = new ExtentList<number>();
          const adds: Array<{ start: number; end: number; label: number }> = [];
          let at = 0;
          let streamed: Array<{ start: number; end: number; label: number }> = [];
          for (const { gap, length, label } of steps) {
            // Sorted starts; a negative gap overlaps the previous range only with the same label.
            const previous = adds[adds.length - 1];
            const start = Math.max(previous && previous.label !== label ? at : 0, at + gap, previous?.start ?? 0);
            list.add(start, start + length, label);
            if (length > 0) adds.push({ start, end: start + length, label });
            at = Math.max(at, start + length);
            streamed = streamed.concat(list.takeFinished());
          }
          const extents = streamed.concat(list.takeAll());
          const size = Math.max(0, ...adds.map((add) => add.end));
          expect(paint(extents, size)).toEqual(paint(adds, size));
          for (let i = 1; i < extents.length; i++) {
            const [a, b] = [extents[i - 1]!, extents[i]!];
            expect(b.start).toBeGreaterThanOrEqual(a.end);
            // Neighbours that touch differ in label: nothing left unmerged.
            if (b.start === a.end) expect(b.label).not.toBe(a.label);
          }
          expect(extents.every((extent) => extent.end > extent.start)).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('joinsLast tells whether an add would grow the last extent (what a bounded answer checks first)', () => {
    const list = new ExtentList<number>();
    expect(list.joinsLast(0, 0)).toBe(false);
    list.add(0, 10, 0);
    expect(list.joinsLast(10, 0)).toBe(true);
    expect(list.joinsLast(10, 1)).toBe(false);
    expect(list.joinsLast(11, 0)).toBe(false);
    list.add(10, 20, 0);
    list.add(20, 20, 1);
    expect(list.extents).toEqual([{ start: 0, end: 20, label: 0 }]);
  });
});
