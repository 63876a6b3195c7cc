import { CowFormatError, fileEndsEarly } from '../../errors.js';
import { allocatedExtents, bitmapSlices, extentBytes } from '../../io/bitmap/index.js';
import { backingError, type BackingReport, type CowImage } from '../../io/image/index.js';
import { type FileHandleLike, type FileSystem, readExactly, readExactlySync } from '../../io/file/index.js';

/*
 * What both commit paths share: options and result, the checks made before anything is written
 * (backing file, allocation past the end of the file), chunk sizes, and reading the COW's data.
 */

/** Copies work in runs of this many bytes: big enough to stream, small enough to keep memory flat. */
export const COMMIT_CHUNK_BYTES = 4 << 20;
/** Zero runs at least this long, on this alignment, are left as holes in a new image. */
export const HOLE_BLOCK_BYTES = 4096;

export interface CommitOptions {
  /** Write the merged image to this new file instead of merging into the backing file. */
  output?: string;
  /** Use this backing file instead of the one the header names (uml_moo -b). */
  backing?: string;
  /** In-place only: leave the COW file as it is after merging (what uml_moo -d does). */
  keep?: boolean;
  /** Commit although the backing file's size or mtime do not match; replace an existing output. */
  force?: boolean;
  /**
   * In place: folders to search for other COW files over the same backing file (always searched:
   * the COW's folder and the folders of the backing's path and real path; files are matched by
   * device and inode). Finding any refuses the commit unless forced.
   */
  checkSiblings?: string[];
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  fs?: FileSystem;
  /** Copy buffer size (tests make it small to exercise the run splitting). */
  chunkBytes?: number;
}

interface CommitResultBase {
  cow: string;
  /** Where the merged image now is: the new file, or the backing file for in-place. */
  output: string;
  /** The backing file read (and, in place, written). */
  backing: string;
  /** Virtual disk size in bytes. */
  size: number;
  /** Bytes taken from the COW's data area. */
  allocatedBytes: number;
  extents: number;
  /** Bytes written to the output (a new image leaves all-zero blocks as holes). */
  writtenBytes: number;
  /** Backing file checks that --force overrode. */
  overridden: string[];
  durationMs: number;
  warnings: string[];
}

/** A merge into a new image file: the COW and the backing file are left as they were. */
export interface NewFileCommitResult extends CommitResultBase {
  mode: 'new-file';
  emptied: false;
  resumed: false;
}

/** A merge into the backing file itself. */
export interface InPlaceCommitResult extends CommitResultBase {
  mode: 'in-place';
  /** The COW file was emptied and re-pointed at the merged backing file (not with `keep`). */
  emptied: boolean;
  /** An interrupted in-place commit was found (its journal) and completed. */
  resumed: boolean;
}

export type CommitResult = NewFileCommitResult | InPlaceCommitResult;

export function roundChunk(chunkBytes = COMMIT_CHUNK_BYTES): number {
  return Math.max(HOLE_BLOCK_BYTES, Math.ceil(chunkBytes / HOLE_BLOCK_BYTES) * HOLE_BLOCK_BYTES);
}

export interface AllocationSummary {
  extents: number;
  allocatedBytes: number;
  /** Where in the COW file the last allocated sector's data ends. */
  dataEnd: number;
}

/** Set bits in each byte value. */
const BITS_SET = Uint8Array.from({ length: 256 }, (_, byte) => {
  let count = 0;
  for (let value = byte; value !== 0; value >>= 1) count += value & 1;
  return count;
});

/**
 * First pass over the bitmap: totals for progress, and a refusal if data lies past the file's end.
 * Counted a byte at a time over the bitmap's slices (runs start where a set bit follows a clear
 * one), with no object per extent: this pass meets the code cold, before the copy, and walking
 * ~10,000 extents one by one took 15-40 ms of a 0.5 s commit. Where the last sector is partial,
 * the extent walk gives the exact byte counts.
 */
export async function summarizeAllocation(image: CowImage): Promise<AllocationSummary> {
  const { sectorSize, size } = image.header;
  let extents = 0;
  let setSectors = 0;
  let lastSet = -1;
  let nextSector = 0;
  let carry = 0;
  for await (const slice of bitmapSlices(image)) {
    const { bytes, bitCount, firstSector } = slice;
    // A run continues across slices only where they are contiguous (scans skip holes of the file).
    if (firstSector !== nextSector) carry = 0;
    const wholeBytes = bitCount >>> 3;
    // The last byte may hold bits of fewer sectors than 8: those past bitCount are not counted.
    const byteCount = wholeBytes + ((bitCount & 7) === 0 ? 0 : 1);
    for (let index = 0; index < byteCount; index++) {
      let byte = bytes[index];
      if (index === wholeBytes) byte &= (1 << (bitCount & 7)) - 1;
      if (byte === 0) {
        carry = 0;
        continue;
      }
      extents += BITS_SET[byte & ~((byte << 1) | carry) & 0xff];
      setSectors += BITS_SET[byte];
      carry = byte >>> 7;
      lastSet = firstSector + index * 8 + 31 - Math.clz32(byte);
    }
    nextSector = firstSector + bitCount;
  }
  if ((lastSet + 1) * sectorSize > size) return summarizeByExtents(image);
  const summary: AllocationSummary = { extents, allocatedBytes: setSectors * sectorSize, dataEnd: lastSet < 0 ? 0 : image.geometry.dataOffset + (lastSet + 1) * sectorSize };
  return refuseDataPastEnd(image, summary);
}

/** summarizeAllocation extent by extent (byte counts clipped to the disk's size). */
export async function summarizeByExtents(image: CowImage): Promise<AllocationSummary> {
  const summary: AllocationSummary = { extents: 0, allocatedBytes: 0, dataEnd: 0 };
  for await (const extent of allocatedExtents(image)) {
    const bytes = extentBytes(extent, image);
    summary.extents++;
    summary.allocatedBytes += bytes.end - bytes.start;
    summary.dataEnd = image.geometry.dataOffset + bytes.end;
  }
  return refuseDataPastEnd(image, summary);
}

function refuseDataPastEnd(image: CowImage, summary: AllocationSummary): AllocationSummary {
  if (summary.dataEnd > image.fileSize) {
    throw new CowFormatError(
      'truncated',
      'file length',
      image.fileSize,
      `at least ${summary.dataEnd} bytes: allocated sectors lie past the end of the file (see ubdcow check)`,
      image.path,
    );
  }
  return summary;
}

/** Refuses backing files that are absent, or changed since the COW was made unless forced; returns what force let through. */
export function judgeBacking(cowPath: string, report: BackingReport, force: boolean): string[] {
  if (report.state === 'ok') return [];
  if ((report.state === 'size-mismatch' || report.state === 'mtime-mismatch') && force) {
    return [`${cowPath}: ${report.problem}`];
  }
  throw backingError(cowPath, report, 'the backing file changed since the COW was made (use --force to commit anyway)');
}

/** The COW file ended `got` bytes into the data behind [start, end) of the disk. */
export function dataAreaEndsEarly(image: CowImage, start: number, end: number, got: number): CowFormatError {
  const { dataOffset } = image.geometry;
  return fileEndsEarly(image.path, dataOffset + start, got, dataOffset + end, 'the data area');
}

/** Reads the COW data area behind [start, end) of the disk into `buffer` at `offset`; a short read means truncation. */
export async function readCowRun(image: CowImage, buffer: Uint8Array, offset: number, start: number, end: number): Promise<void> {
  const target = { buffer, offset, length: end - start, position: image.geometry.dataOffset + start };
  await readExactly(image.handle, image.path, 'read', target, (got) => dataAreaEndsEarly(image, start, end, got));
}

/** readCowRun with a blocking read on the calling thread (for many small runs; see FileHandleLike.readSync). */
export function readCowRunSync(image: CowImage, cow: Required<Pick<FileHandleLike, 'readSync'>>, buffer: Uint8Array, offset: number, start: number, end: number): void {
  const target = { buffer, offset, length: end - start, position: image.geometry.dataOffset + start };
  readExactlySync(cow, image.path, 'read', target, (got) => dataAreaEndsEarly(image, start, end, got));
}
