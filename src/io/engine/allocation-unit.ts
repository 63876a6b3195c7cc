/*
 * The allocation unit: what a write allocates in a COW at once. Debian's UML 6.1 kernel misreads
 * a 4 KiB page that mixes backing and COW sectors (docs/nbd.md), so by default a write allocating
 * any sector of a 4 KiB page allocates the whole page, copying up its other sectors' current
 * bytes. Invariant kept by every ubdcow writer: each allocated unit is whole. A unit of one sector
 * keeps the kernel's own sector granularity. Units are aligned on the virtual disk; the last one
 * ends with the bitmap's cover.
 */
import { UbdcowError } from '../../errors.js';

export const DEFAULT_ALLOCATION_UNIT = 4096;

/** Sectors per default unit (a 4 KiB page): 8 for 512-byte sectors; 1 where a sector is a page or more, or does not divide one. */
export function defaultUnitSectors(sectorSize: number): number {
  return sectorSize < DEFAULT_ALLOCATION_UNIT && DEFAULT_ALLOCATION_UNIT % sectorSize === 0 ? DEFAULT_ALLOCATION_UNIT / sectorSize : 1;
}

/** Sectors per allocation unit for a COW of `sectorSize`-byte sectors; refuses a unit no kernel page can be. */
export function sectorsPerUnit(cowPath: string, requested: number | undefined, sectorSize: number): number {
  if (requested === undefined) return defaultUnitSectors(sectorSize);
  const sectors = requested / sectorSize;
  const powerOfTwo = Number.isSafeInteger(requested) && requested > 0 && (requested & (requested - 1)) === 0;
  if (!Number.isInteger(sectors) || sectors < 1 || (!powerOfTwo && requested !== sectorSize)) {
    throw new UbdcowError(
      'usage',
      `${cowPath}: allocation unit ${requested} is not a power of two multiple of its ${sectorSize}-byte sectors (use ${DEFAULT_ALLOCATION_UNIT}, the default, or ${sectorSize} for sector granularity)`,
      { file: cowPath },
    );
  }
  return sectors;
}

export interface UnitLayout {
  sectorSize: number;
  unitSectors: number;
  /** Sectors with a bitmap bit; units end there. */
  coveredSectors: number;
  /** The disk's size in bytes (its last sector may be partial). */
  size: number;
}

/** The whole units holding sectors [first, end), as sectors, clipped to the bitmap's cover. */
export function unitRange(first: number, end: number, { unitSectors, coveredSectors }: UnitLayout): [number, number] {
  return [first - (first % unitSectors), Math.min(Math.ceil(end / unitSectors) * unitSectors, coveredSectors)];
}

/**
 * What a write stores: sectors [first, end) at bytes [start, stop) of the disk; the bytes around
 * the new ones are copied up from one read of the first `headBytes` (a sector, or a whole unit)
 * and one read from `tailStart` (the last sector or unit).
 */
export interface WriteSpan {
  first: number;
  end: number;
  start: number;
  stop: number;
  headBytes: number;
  tailStart: number;
}

/**
 * The span a write of sectors [first, end) stores: an edge unit with
 * sectors still in the backing is widened to the whole unit; one wholly in the COW (already whole)
 * only to whole sectors, so rewrites of allocated pages copy nothing up.
 */
export function writeSpan(first: number, end: number, layout: UnitLayout, bits: { allSet(start: number, end: number): boolean }): WriteSpan {
  const { sectorSize, unitSectors, size } = layout;
  const [unitFirst, unitEnd] = unitRange(first, end, layout);
  const widenHead = unitFirst < first && !bits.allSet(unitFirst, first);
  const widenTail = end < unitEnd && !bits.allSet(end, unitEnd);
  const spanFirst = widenHead ? unitFirst : first;
  const spanEnd = widenTail ? unitEnd : end;
  const start = spanFirst * sectorSize;
  const lastUnit = unitEnd - 1 - ((unitEnd - 1) % unitSectors);
  // A write within one unit widened at its tail only still reads that unit once, from its start.
  const wholeHeadUnit = widenHead || (widenTail && lastUnit === unitFirst);
  return {
    first: spanFirst,
    end: spanEnd,
    start,
    stop: Math.min(spanEnd * sectorSize, size),
    headBytes: wholeHeadUnit ? unitSectors * sectorSize : sectorSize,
    tailStart: widenTail ? Math.max(start, lastUnit * sectorSize) : (end - 1) * sectorSize,
  };
}
