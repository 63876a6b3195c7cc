import type { SectorBitmap } from './bitmap.js';
import { ExtentList } from './extent-list.js';

/*
 * The one read rule of a COW disk, as a pure function: a byte comes from the COW's data area where
 * its sector's bit is set, and from the backing file everywhere else (including the sectors a V1/V2
 * bitmap has no bit for). The engine plans every read with this (slice by slice of its LazyBitmap)
 * and only does the I/O itself; QEMU's block/cow.c has the same one path.
 */

/** One piece of a read: `length` bytes of the disk from `diskOffset`, from the COW or the backing file. */
export interface ReadSpan {
  fromCow: boolean;
  diskOffset: number;
  length: number;
}

export interface ReadPlan {
  spans: ReadSpan[];
  /** The plan covers [offset, end): `end` stops short of the range where `bits` stops. */
  end: number;
}

/**
 * Plans the read of disk bytes [offset, end) as far as `bits` (bits for sectors
 * [bits.firstSector, bits.firstSector + bits.bitCount)) tells, merging neighbouring spans from the
 * same file. `offset`'s sector must be in `bits` or at/after `coveredSectors`; a caller holding the
 * whole bitmap gets the whole range in one call, a caller holding a window calls again from `end`.
 */
export function planRead(bits: SectorBitmap, sectorSize: number, coveredSectors: number, offset: number, end: number): ReadPlan {
  const first = Math.floor(offset / sectorSize);
  const lastSector = Math.ceil(end / sectorSize);
  if (lastSector <= coveredSectors && first >= bits.firstSector && lastSector <= bits.firstSector + bits.bitCount && offset < end) {
    // The hot case (a small read inside one run), answered with one word scan and no generator.
    const from = first - bits.firstSector;
    const to = lastSector - bits.firstSector;
    const fromCow = bits.get(from);
    if ((fromCow ? bits.nextClear(from, to) : bits.nextSet(from, to)) === to) return { spans: [{ fromCow, diskOffset: offset, length: end - offset }], end };
  }
  const plan = new ExtentList<boolean>();
  const planned = planReadInto(plan, bits, sectorSize, coveredSectors, offset, end);
  return { spans: readSpans(plan), end: planned };
}

/**
 * planRead's general case, adding to `plan` (labelled "from the COW"): callers planning window
 * after window add to one list, so spans merge across windows. Returns where the plan stops.
 */
export function planReadInto(plan: ExtentList<boolean>, bits: SectorBitmap, sectorSize: number, coveredSectors: number, offset: number, end: number): number {
  const first = Math.floor(offset / sectorSize);
  let position = offset;
  const add = (fromCow: boolean, to: number) => {
    if (to <= position) return;
    plan.add(position, to, fromCow);
    position = to;
  };
  if (first < coveredSectors && offset < end) {
    const sliceEnd = bits.firstSector + bits.bitCount;
    if (first < bits.firstSector || first >= sliceEnd) {
      throw new RangeError(`sector ${first} is not in the bitmap window [${bits.firstSector}, ${sliceEnd})`);
    }
    const last = Math.min(Math.ceil(end / sectorSize), sliceEnd, coveredSectors);
    for (const run of bits.runs(first - bits.firstSector, last - bits.firstSector)) {
      add(run.allocated, Math.min(end, (bits.firstSector + run.end) * sectorSize));
    }
  }
  // Past the last covered sector: always the backing file.
  if (position < end && position >= coveredSectors * sectorSize) add(false, end);
  return position;
}

/** A plan's extents as read spans. */
export function readSpans(plan: ExtentList<boolean>): ReadSpan[] {
  return plan.extents.map((extent) => ({ fromCow: extent.label, diskOffset: extent.start, length: extent.end - extent.start }));
}
