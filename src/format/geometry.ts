import { CowFormatError } from '../errors.js';
import { type CowHeader, headerSize } from './header.js';

/** Where things live in a COW file, in bytes, as the kernel's cow_sizes() computes them. */
export interface CowGeometry {
  /** Size of the header structure (not rounded). */
  headerSize: number;
  bitmapOffset: number;
  bitmapLength: number;
  dataOffset: number;
  /** Sectors in the virtual disk (the last one may be partial). */
  sectors: number;
  /**
   * Sectors the bitmap has bits for. V1 and V2 round the bitmap length down, so the last few
   * sectors of such disks have no bit and always read from the backing file.
   */
  coveredSectors: number;
  /** The length the file has when created: data area end. */
  fileLength: number;
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

export function computeGeometry(header: CowHeader): CowGeometry {
  const { size, sectorSize, alignment } = header;
  const structSize = headerSize(header.layout);
  const sectors = Math.ceil(size / sectorSize);
  let bitmapOffset: number;
  let bitmapLength: number;
  let dataOffset: number;
  if (header.version < 3) {
    bitmapOffset = structSize;
    // Integer division, not a ceiling: the historic bug the kernel keeps for old files.
    bitmapLength = Math.floor((size + sectorSize - 1) / (8 * sectorSize));
    dataOffset = roundUp(bitmapOffset + bitmapLength, sectorSize);
  } else {
    bitmapOffset = roundUp(structSize, alignment);
    bitmapLength = Math.ceil(sectors / 8);
    dataOffset = roundUp(bitmapOffset + bitmapLength, alignment);
  }
  const fileLength = dataOffset + size;
  if (!Number.isSafeInteger(fileLength)) {
    throw new CowFormatError(
      'too-large',
      'size',
      size,
      `a size whose data area ends below 2^53 bytes (it would end at ${fileLength})`,
    );
  }
  return {
    headerSize: structSize,
    bitmapOffset,
    bitmapLength,
    dataOffset,
    sectors,
    coveredSectors: Math.min(sectors, bitmapLength * 8),
    fileLength,
  };
}
