/**
 * Whole-bitmap scans of a LazyBitmap that skip what the file holds as holes (SEEK_DATA): a nearly
 * empty 10 TiB COW costs what its allocated part costs. Each slice is visited through a view
 * pinned only while it is visited, so a scan never holds more than one slice in memory of its own.
 */
import type { SectorBitmap, SectorRun } from '../../format/bitmap.js';
import type { BitmapView } from './bitmap-view.js';
import { dataExtents, type FileHandleLike } from '../file/index.js';
import { ExtentList } from '../../format/extent-list.js';

/**
 * What a scan needs of a sliced bitmap (LazyBitmap in bitmap-cache.ts is one): its slices, where
 * they lie in the file, which are in memory, and pinned views of them. Stated here so the scans
 * and the cache that calls them do not import each other.
 */
export interface ScannableBitmap {
  readonly sliceBytes: number;
  readonly sliceSectors: number;
  readonly coveredSectors: number;
  readonly stats: { holesSkipped: number };
  /** The file the bitmap lives in, and its bytes there. */
  readonly region: { file: FileHandleLike; offset: number; length: number };
  /** Where slice `index` lies in the file, and whether it is in memory or on its way there. */
  sliceInFile(index: number): { start: number; end: number; known: boolean };
  /** The first slice from index `from` on that is in memory or on its way there, if any. */
  nextKnownSlice(from: number): number | undefined;
  /** A view of sectors [start, end) (within one slice), pinned until released. */
  acquire(start: number, end: number): Promise<BitmapView>;
}

/** Sectors set in [start, end) (a range the caller checked). */
export async function countSetSkippingHoles(bitmap: ScannableBitmap, start: number, end: number): Promise<number> {
  let count = 0;
  for await (const _ of scanSlices(bitmap, start, end, (view, from, to) => {
    count += view.countSet(from, to);
  })) {
    // Each step has visited one slice.
  }
  return count;
}

/** Runs of set sectors in [start, end), joined across slices (a range the caller checked). */
export async function* allocatedRunsSkippingHoles(bitmap: ScannableBitmap, start: number, end: number): AsyncGenerator<SectorRun> {
  const runs = new ExtentList();
  // Runs are gathered slice by slice and handed out between slices.
  for await (const _ of scanSlices(bitmap, start, end, (view, from, to) => {
    let sector = view.nextSet(from, to);
    while (sector < to) {
      const runEnd = view.nextClear(sector, to);
      runs.add(sector, runEnd);
      sector = view.nextSet(runEnd, to);
    }
  })) {
    for (const run of runs.takeFinished()) yield { start: run.start, end: run.end, allocated: true };
  }
  for (const run of runs.takeAll()) yield { start: run.start, end: run.end, allocated: true };
}

/**
 * The slices of the whole bitmap that the file holds data for, in order (a slice wholly in a hole
 * of the file has no bit set and is skipped). Each is yielded after its view is released; it stays
 * valid as long as the caller keeps it, since an evicted slice's bytes are never reused.
 */
export async function* slicesSkippingHoles(bitmap: ScannableBitmap): AsyncGenerator<SectorBitmap> {
  let visited: SectorBitmap | undefined;
  for await (const _ of scanSlices(bitmap, 0, bitmap.coveredSectors, (view, from) => {
    visited = view.sliceBits(from);
  })) {
    yield visited!;
  }
}

/**
 * Visits the slices of [start, end) in order; slices not cached that lie wholly in holes of the
 * file are skipped unread.
 */
async function* scanSlices(
  bitmap: ScannableBitmap,
  start: number,
  end: number,
  visit: (view: BitmapView, from: number, to: number) => void,
): AsyncGenerator<void> {
  if (end <= start) return;
  const { sliceSectors, sliceBytes } = bitmap;
  const { file, offset, length } = bitmap.region;
  const first = Math.floor(start / sliceSectors);
  const last = Math.floor((end - 1) / sliceSectors);
  const extents = dataExtents(file, offset + first * sliceBytes, offset + Math.min(length, (last + 1) * sliceBytes));
  let extent = await extents.next();
  try {
    for (let index = first; index <= last; ) {
      const slice = bitmap.sliceInFile(index);
      while (!extent.done && extent.value.end <= slice.start) extent = await extents.next();
      const holds = !extent.done && extent.value.start < slice.end;
      if (!holds && !slice.known) {
        // Jump over the hole at once: to the slice of the next data, or the next one in memory
        // (whose bits may not be written yet), whichever comes first.
        const dataIndex = extent.done ? last + 1 : Math.floor((extent.value.start - offset) / sliceBytes);
        const next = Math.max(index + 1, Math.min(dataIndex, bitmap.nextKnownSlice(index + 1) ?? last + 1, last + 1));
        bitmap.stats.holesSkipped += next - index;
        index = next;
        continue;
      }
      const from = Math.max(start, index * sliceSectors);
      const to = Math.min(end, (index + 1) * sliceSectors);
      const view = await bitmap.acquire(from, to);
      try {
        visit(view, from, to);
      } finally {
        view.release();
      }
      index++;
      yield;
    }
  } finally {
    await extents.return(undefined);
  }
}
