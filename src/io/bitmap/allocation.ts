import { SectorBitmap } from '../../format/bitmap.js';
import { lazyBitmapOf } from './bitmap-cache.js';
import { slicesSkippingHoles } from './bitmap-scan.js';
import type { CowImage } from '../image/index.js';
import type { Extent } from '../../format/extent-list.js';

/*
 * Reading a COW's allocation from its bitmap on disk, as streams (slices, extents in sectors,
 * runs grouped by copy window) for commands that hold an opened image rather than an engine. They
 * are views over the one bitmap reader, LazyBitmap, and its SEEK_DATA-skipping scans
 * (bitmap-scan.ts): parts of the bitmap that are holes in the file (a nearly empty multi-TiB COW:
 * gigabytes of them) are skipped instead of read as zeros, and memory stays at one chunk however
 * large the disk (the scan's LazyBitmap keeps nothing cached).
 */

/** 1 MiB of bitmap covers 4 GiB of disk: big enough to be fast, small enough for any image. */
export const BITMAP_CHUNK_BYTES = 64 << 10;

/** A LazyBitmap for one pass over the bitmap: `chunkBytes` slices, none kept once visited. */
function scanningBitmap(image: CowImage, chunkBytes: number) {
  return lazyBitmapOf(image, { sliceBytes: Math.max(1, Math.min(chunkBytes, 1 << 24)), maxCachedBytes: 0 });
}

/**
 * Streams the bitmap a chunk at a time, skipping the parts that are holes in the file (all bits
 * clear there); each slice's sector numbers are relative to `slice.firstSector`. Slices are in
 * order but need not be contiguous. Without SEEK_DATA, every chunk is read.
 */
export async function* bitmapSlices(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorBitmap> {
  yield* slicesSkippingHoles(scanningBitmap(image, chunkBytes));
}

/** Reads the whole bitmap into memory (tests compare the lazy reader with it). */
export async function readWholeBitmap(image: CowImage): Promise<SectorBitmap> {
  const { bitmapLength, coveredSectors } = image.geometry;
  const bytes = new Uint8Array(bitmapLength);
  for await (const slice of bitmapSlices(image)) bytes.set(slice.bytes, slice.firstSector / 8);
  return new SectorBitmap(bytes, coveredSectors, 0);
}

/** An allocated extent in sectors: [start, end) of the virtual disk. */
export type SectorExtent = Extent;

/** Allocated extents of the whole disk, merged across chunk boundaries. */
export async function* allocatedExtents(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorExtent> {
  for await (const run of scanningBitmap(image, chunkBytes).allocatedRuns()) yield { start: run.start, end: run.end };
}

/** A byte range of the virtual disk: [start, end). */
export type ByteRun = Extent;

/** A sector extent in bytes of the virtual disk, clipped to its size (the last sector may be partial). */
export function extentBytes(extent: SectorExtent, image: Pick<CowImage, 'header'>): ByteRun {
  const { sectorSize, size } = image.header;
  return { start: extent.start * sectorSize, end: Math.min(extent.end * sectorSize, size) };
}

/** Allocated byte ranges of the disk that fall in one window [start, start + window size). */
export interface WindowRuns {
  start: number;
  runs: ByteRun[];
}

/**
 * The allocated byte ranges, split at window boundaries and grouped by window, for the windows
 * that have any (the extent-window planner). Working a window at a time turns thousands of small
 * extents into one read of the COW's data area per window (holes read back as zeros, cheaply).
 * Runs are found slice by slice with synchronous scans and merged across slice boundaries: no
 * promise per extent (a commit of a scattered COW walks ~10,000 of them before its code is warm;
 * three levels of async generators per extent cost ~15 ms and most of its garbage).
 */
export async function* allocatedWindows(image: CowImage, windowBytes: number): AsyncGenerator<WindowRuns> {
  const { sectorSize, size } = image.header;
  let current: WindowRuns | undefined;
  for await (const slice of bitmapSlices(image)) {
    const { bitCount, firstSector } = slice;
    for (let sector = slice.nextSet(0, bitCount); sector < bitCount; ) {
      const runEnd = slice.nextClear(sector, bitCount);
      const end = Math.min((firstSector + runEnd) * sectorSize, size);
      for (let at = (firstSector + sector) * sectorSize; at < end; ) {
        const windowStart = Math.floor(at / windowBytes) * windowBytes;
        const pieceEnd = Math.min(end, windowStart + windowBytes);
        if (current && current.start !== windowStart) {
          yield current;
          current = undefined;
        }
        current ??= { start: windowStart, runs: [] };
        const last = current.runs[current.runs.length - 1];
        // A run that went on past the previous slice continues here.
        if (last !== undefined && last.end === at) last.end = pieceEnd;
        else current.runs.push({ start: at, end: pieceEnd });
        at = pieceEnd;
      }
      sector = slice.nextSet(runEnd, bitCount);
    }
  }
  if (current) yield current;
}

/**
 * A copy of bitmap bytes [firstByte, firstByte + length) as a SectorBitmap of the sectors they
 * cover (sector numbers from firstByte * 8, covered sectors only), for a caller that changes bits
 * and writes them back itself (sparsify's windows). Read through LazyBitmap like every scan.
 */
export async function readBitmapBytes(image: CowImage, firstByte: number, length: number): Promise<SectorBitmap> {
  const firstSector = firstByte * 8;
  const bitCount = Math.max(0, Math.min(length * 8, image.geometry.coveredSectors - firstSector));
  const bitmap = scanningBitmap(image, BITMAP_CHUNK_BYTES);
  const view = await bitmap.acquire(firstSector, firstSector + bitCount);
  try {
    return new SectorBitmap(bitmap.copyBytes(firstByte, firstByte + length), bitCount, firstSector);
  } finally {
    view.release();
  }
}
