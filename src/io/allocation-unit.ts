/*
 * The allocation unit: what a write allocates in a COW at once. Debian's UML 6.1 kernel misreads
 * a 4 KiB page that mixes backing and COW sectors (docs/nbd.md), so by default a write allocating
 * any sector of a 4 KiB page allocates the whole page, copying up its other sectors' current
 * bytes. Invariant kept by every ubdcow writer: each allocated unit is whole. A unit of one sector
 * keeps the kernel's own sector granularity. Units are aligned on the virtual disk; the last one
 * ends with the bitmap's cover.
 */
import { UbdcowError } from '../errors.js';

export const DEFAULT_ALLOCATION_UNIT = 4096;

/** Sectors per allocation unit for a COW of `sectorSize`-byte sectors; refuses a unit no kernel page can be. */
export function sectorsPerUnit(cowPath: string, requested: number | undefined, sectorSize: number): number {
  if (requested === undefined) {
    return sectorSize < DEFAULT_ALLOCATION_UNIT && DEFAULT_ALLOCATION_UNIT % sectorSize === 0 ? DEFAULT_ALLOCATION_UNIT / sectorSize : 1;
  }
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

/** The whole units holding sectors [first, end), as sectors, clipped to the bitmap's cover. */
export function unitRange(first: number, end: number, unitSectors: number, coveredSectors: number): [number, number] {
  return [first - (first % unitSectors), Math.min(Math.ceil(end / unitSectors) * unitSectors, coveredSectors)];
}
