import { CowFormatError } from '../errors.js';
import { SectorBitmap } from '../format/bitmap.js';
import { dataExtents } from './extents.js';
import type { CowImage } from './image.js';
import { readExactly } from './file.js';

/*
 * Reading a COW's allocation from its bitmap on disk: one chunk reader, and the streams built on
 * it (slices, extents in sectors, runs grouped by copy window). Memory stays at one chunk however
 * large the disk. Parts of the bitmap that are holes in the file (a nearly empty multi-TiB COW:
 * gigabytes of them) are skipped with SEEK_DATA instead of read as zeros.
 */

/** 1 MiB of bitmap covers 4 GiB of disk: big enough to be fast, small enough for any image. */
export const BITMAP_CHUNK_BYTES = 1 << 20;

/**
 * Reads `length` bitmap bytes from bitmap byte `firstByte` into `buffer` (the one bitmap-chunk
 * reader): the slice's sector numbers are relative to `firstByte * 8`, and only covered sectors
 * (see CowGeometry) are included. A bitmap cut short by the file's end is `truncated-bitmap`.
 */
export async function readBitmapChunk(image: CowImage, firstByte: number, length: number, buffer: Uint8Array = new Uint8Array(length)): Promise<SectorBitmap> {
  const { bitmapOffset, bitmapLength, coveredSectors } = image.geometry;
  const position = bitmapOffset + firstByte;
  await readExactly(image.handle, image.path, 'read the bitmap of', { buffer, offset: 0, length, position }, (got) =>
    new CowFormatError('truncated-bitmap', 'bitmap', `${position + got - bitmapOffset} bytes long`, `${bitmapLength} bytes from offset ${bitmapOffset}`, image.path),
  );
  const firstSector = firstByte * 8;
  const bits = Math.max(0, Math.min(length * 8, coveredSectors - firstSector));
  return new SectorBitmap(buffer.subarray(0, length), bits, firstSector);
}

/**
 * Streams the bitmap a chunk at a time, skipping the parts that are holes in the file (all bits
 * clear there); each slice's sector numbers are relative to `slice.firstSector`. Slices are in
 * order but need not be contiguous. Without SEEK_DATA, every chunk is read.
 */
export async function* bitmapSlices(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorBitmap> {
  const { bitmapOffset, bitmapLength } = image.geometry;
  const buffer = new Uint8Array(Math.min(chunkBytes, Math.max(bitmapLength, 1)));
  for await (const extent of dataExtents(image.handle, bitmapOffset, bitmapOffset + bitmapLength)) {
    const end = extent.end - bitmapOffset;
    for (let byte = extent.start - bitmapOffset; byte < end; byte += buffer.length) {
      yield await readBitmapChunk(image, byte, Math.min(buffer.length, end - byte), buffer);
    }
  }
}

/** Reads the whole bitmap into memory (the engine keeps it live, as the kernel does). */
export async function readWholeBitmap(image: CowImage): Promise<SectorBitmap> {
  return readBitmapChunk(image, 0, image.geometry.bitmapLength);
}

/** An allocated extent in sectors: [start, end) of the virtual disk. */
export interface SectorExtent {
  start: number;
  end: number;
}

/** Allocated extents of the whole disk, merged across chunk boundaries. */
export async function* allocatedExtents(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorExtent> {
  let pending: SectorExtent | undefined;
  for await (const slice of bitmapSlices(image, chunkBytes)) {
    for (const run of slice.allocatedRuns()) {
      const start = slice.firstSector + run.start;
      const end = slice.firstSector + run.end;
      if (pending && pending.end === start) {
        pending.end = end;
        continue;
      }
      if (pending) yield pending;
      pending = { start, end };
    }
  }
  if (pending) yield pending;
}

/** A byte range of the virtual disk: [start, end). */
export interface ByteRun {
  start: number;
  end: number;
}

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
 */
export async function* allocatedWindows(image: CowImage, windowBytes: number): AsyncGenerator<WindowRuns> {
  let current: WindowRuns | undefined;
  for await (const extent of allocatedExtents(image)) {
    const bytes = extentBytes(extent, image);
    for (let at = bytes.start; at < bytes.end; ) {
      const windowStart = Math.floor(at / windowBytes) * windowBytes;
      const end = Math.min(bytes.end, windowStart + windowBytes);
      if (current && current.start !== windowStart) {
        yield current;
        current = undefined;
      }
      current ??= { start: windowStart, runs: [] };
      current.runs.push({ start: at, end });
      at = end;
    }
  }
  if (current) yield current;
}
