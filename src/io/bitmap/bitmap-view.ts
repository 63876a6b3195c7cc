/**
 * Synchronous access to the bitmap slices a LazyBitmap pinned for one sector range: reads and
 * changes of single bits, ranges and runs across slice boundaries. A change marks the bytes it
 * touched dirty, so its writer knows what to write (dirtySlices); release()
 * unpins the slices, after which the view refuses every call.
 */
import type { SectorBitmap, SectorRun } from '../../format/bitmap.js';

/** One cached slice of the bitmap (owned by LazyBitmap; views change its bits and dirty range). */
export interface Slice {
  readonly index: number;
  readonly bitmap: SectorBitmap;
  pins: number;
  /** Bytes changed since the file last had them: [dirtyStart, dirtyEnd) within the slice; empty when clean. */
  dirtyStart: number;
  dirtyEnd: number;
}

/** Sync access to the slices covering an acquired sector range; release() unpins them. */
export interface BitmapView {
  readonly start: number;
  readonly end: number;
  get(sector: number): boolean;
  set(sector: number, value?: boolean): void;
  setRange(start: number, end: number, value?: boolean): void;
  allSet(start: number, end: number): boolean;
  noneSet(start: number, end: number): boolean;
  /** First set sector in [from, end), or `end`. */
  nextSet(from: number, end: number): number;
  /** First clear sector in [from, end), or `end`. */
  nextClear(from: number, end: number): number;
  countSet(start: number, end: number): number;
  /** Runs of equal state over [start, end), joined across slice boundaries. */
  runs(start: number, end: number): Generator<SectorRun>;
  /**
   * The slice holding `sector`, as a SectorBitmap whose sector numbers are disk sectors from
   * `firstSector` (the window form planRead takes); valid until release().
   */
  sliceBits(sector: number): SectorBitmap;
  release(): void;
}

export function sliceView(start: number, end: number, pinned: Slice[], first: number, sliceSectors: number, onRelease: () => void): BitmapView {
  let released = false;
  const sliceOf = (sector: number): Slice => {
    if (released) throw new Error('bitmap view used after release()');
    if (!(sector >= start && sector < end)) throw new RangeError(`sector ${sector} outside the acquired range [${start}, ${end})`);
    return pinned[Math.floor(sector / sliceSectors) - first]!;
  };
  const check = (from: number, to: number) => {
    if (released) throw new Error('bitmap view used after release()');
    if (!(from >= start && to <= end && from <= to)) throw new RangeError(`sector range [${from}, ${to}) outside the acquired range [${start}, ${end})`);
  };
  /** Calls fn per slice piece of [from, to) with slice-local bounds; stops when it returns a number. */
  const each = (from: number, to: number, fn: (slice: Slice, localFrom: number, localTo: number, base: number) => number | undefined): number | undefined => {
    check(from, to);
    let sector = from;
    while (sector < to) {
      const slice = pinned[Math.floor(sector / sliceSectors) - first]!;
      const base = slice.index * sliceSectors;
      const pieceEnd = Math.min(to, base + sliceSectors);
      const result = fn(slice, sector - base, pieceEnd - base, base);
      if (result !== undefined) return result;
      sector = pieceEnd;
    }
    return undefined;
  };
  const touch = (slice: Slice, localFrom: number, localTo: number) => {
    const byteFrom = Math.floor(localFrom / 8);
    const byteTo = Math.ceil(localTo / 8);
    if (slice.dirtyEnd > slice.dirtyStart) {
      slice.dirtyStart = Math.min(slice.dirtyStart, byteFrom);
      slice.dirtyEnd = Math.max(slice.dirtyEnd, byteTo);
    } else {
      slice.dirtyStart = byteFrom;
      slice.dirtyEnd = byteTo;
    }
  };
  const view: BitmapView = {
    start,
    end,
    get: (sector) => {
      const slice = sliceOf(sector);
      return slice.bitmap.get(sector - slice.index * sliceSectors);
    },
    set: (sector, value = true) => {
      const slice = sliceOf(sector);
      const local = sector - slice.index * sliceSectors;
      if (slice.bitmap.get(local) === value) return;
      slice.bitmap.set(local, value);
      touch(slice, local, local + 1);
    },
    setRange: (from, to, value = true) => {
      each(from, to, (slice, localFrom, localTo) => {
        const already = value ? slice.bitmap.allSet(localFrom, localTo) : slice.bitmap.noneSet(localFrom, localTo);
        if (!already) {
          slice.bitmap.setRange(localFrom, localTo, value);
          touch(slice, localFrom, localTo);
        }
        return undefined;
      });
    },
    allSet: (from, to) => view.nextClear(from, to) === to,
    noneSet: (from, to) => view.nextSet(from, to) === to,
    nextSet: (from, to) => each(from, to, (slice, a, b, base) => {
      const found = slice.bitmap.nextSet(a, b);
      return found < b ? base + found : undefined;
    }) ?? to,
    nextClear: (from, to) => each(from, to, (slice, a, b, base) => {
      const found = slice.bitmap.nextClear(a, b);
      return found < b ? base + found : undefined;
    }) ?? to,
    countSet: (from, to) => {
      let count = 0;
      each(from, to, (slice, a, b) => {
        count += slice.bitmap.countSet(a, b);
        return undefined;
      });
      return count;
    },
    *runs(from, to) {
      check(from, to);
      let sector = from;
      while (sector < to) {
        const allocated = view.get(sector);
        const runEnd = allocated ? view.nextClear(sector, to) : view.nextSet(sector, to);
        yield { start: sector, end: runEnd, allocated };
        sector = runEnd;
      }
    },
    sliceBits: (sector) => sliceOf(sector).bitmap,
    release: () => {
      if (released) return;
      released = true;
      for (const slice of pinned) slice.pins--;
      onRelease();
    },
  };
  return view;
}
