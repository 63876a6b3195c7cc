import { notACow, usageError } from '../errors.js';
import type { FileSystem } from '../io/file/index.js';
import { type CowDisk, type VirtualDisk, allocatedByteExtents, openVirtualDisk, sameBaseFile } from '../io/engine/index.js';
import { ExtentList } from '../format/extent-list.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** A byte range of the virtual disk: [offset, offset + length). */
export interface ByteRange {
  offset: number;
  length: number;
}

/**
 * How the comparison was made:
 * - `cow-vs-backing`: one COW against its backing, reading only its allocated sectors;
 * - `allocation`: one COW's allocated sectors, listed without reading data;
 * - `same-backing`: two images over the same backing file, reading only sectors allocated in either;
 * - `full`: two images compared byte for byte over their whole length.
 */
export type DiffMode = 'cow-vs-backing' | 'allocation' | 'same-backing' | 'full';

export interface DiffOptions {
  /** One COW only: list its allocated sectors instead of comparing contents with the backing. */
  allocated?: boolean;
  /** Backing file of `a` (and, with one image, of the COW) instead of the one its header names. */
  backingA?: string;
  backingB?: string;
  fs?: FileSystem;
  /** Bytes compared per read (rounded to whole sectors). */
  chunkBytes?: number;
  /** Bitmap bytes each COW keeps in memory at a time. */
  bitmapWindowBytes?: number;
  /**
   * `byte` (default): ranges are exactly the bytes that differ. `sector`: every sector holding a
   * differing byte counts whole (what the disk's sectors say; `--sectors` on the command line).
   */
  granularity?: 'byte' | 'sector';
}

export interface DiffResult {
  identical: boolean;
  /** Differing ranges, merged, in order: exact bytes, or whole sectors with granularity `sector`. */
  ranges: ByteRange[];
  differingBytes: number;
  /** Number of ranges. */
  extents: number;
  mode: DiffMode;
  /** The sector size of the disks (the unit of `granularity: 'sector'` and of allocation). */
  sectorSize: number;
  granularity: 'byte' | 'sector';
  sizeA: number;
  sizeB: number;
  warnings: string[];
}

export const DIFF_CHUNK_BYTES = 1 << 20;

const diffImagesOptionKeys: OptionKeys<DiffOptions> = { allocated: true, backingA: true, backingB: true, fs: true, chunkBytes: true, bitmapWindowBytes: true, granularity: true };

/**
 * Compares virtual disks.
 *
 * With one image (`b` omitted), `a` must be a COW file: the result lists the sectors whose COW
 * contents differ from the backing file (a sector that was written with the bytes the backing
 * already has is not a difference), or with `allocated` every allocated sector.
 *
 * With two images, each a raw file or a COW seen through its backing, the result lists the byte
 * ranges where the two disks differ. When the sizes differ, everything from the start of the
 * sector that holds the end of the smaller disk to the end of the larger one counts as different.
 * Two COWs over the same backing file (same resolved path, header size and mtime), or a COW and
 * its own backing file, are compared only where either COW has allocated sectors.
 */
export async function diffImages(a: string, b?: string, options: DiffOptions = {}): Promise<DiffResult> {
  checkOptions('diffImages', options, diffImagesOptionKeys);
  const fs = options.fs;
  const chunkBytes = options.chunkBytes ?? DIFF_CHUNK_BYTES;
  const exact = (options.granularity ?? 'byte') === 'byte';
  if (b === undefined) {
    if (options.backingB !== undefined) {
      throw usageError(`a backing file for a second image (${options.backingB}) needs a second image`);
    }
    const disk = await openVirtualDisk(a, {
      fs,
      backing: options.backingA,
      openBacking: !options.allocated,
      bitmapWindowBytes: options.bitmapWindowBytes,
    });
    try {
      if (disk.kind !== 'cow') {
        throw notACow(a, '; give a second image to compare it with');
      }
      return options.allocated ? await listAllocation(disk) : await diffCowWithBacking(disk, chunkBytes, exact);
    } finally {
      await disk.close();
    }
  }
  if (options.allocated) {
    throw usageError('listing allocated sectors (--allocated) takes one COW file, not two images');
  }
  const diskA = await openVirtualDisk(a, { fs, backing: options.backingA, bitmapWindowBytes: options.bitmapWindowBytes });
  try {
    const diskB = await openVirtualDisk(b, { fs, backing: options.backingB, bitmapWindowBytes: options.bitmapWindowBytes });
    try {
      return await diffTwoDisks(diskA, diskB, chunkBytes, exact);
    } finally {
      await diskB.close();
    }
  } finally {
    await diskA.close();
  }
}

/** Collects differing ranges in order, merging each with the previous when they touch. */
class RangeCollector {
  private readonly extents = new ExtentList();
  differingBytes = 0;

  add(offset: number, length: number): void {
    if (length <= 0) return;
    this.differingBytes += length;
    this.extents.add(offset, offset + length);
  }

  get ranges(): ByteRange[] {
    return this.extents.extents.map((extent) => ({ offset: extent.start, length: extent.end - extent.start }));
  }
}

function resultOf(
  collector: RangeCollector,
  mode: DiffMode,
  sectorSize: number,
  sizeA: number,
  sizeB: number,
  warnings: string[],
  exact: boolean,
): DiffResult {
  const ranges = collector.ranges;
  return {
    identical: ranges.length === 0,
    ranges,
    differingBytes: collector.differingBytes,
    extents: ranges.length,
    mode,
    sectorSize,
    granularity: exact ? 'byte' : 'sector',
    sizeA,
    sizeB,
    warnings,
  };
}

async function listAllocation(disk: VirtualDisk): Promise<DiffResult> {
  const collector = new RangeCollector();
  for await (const extent of allocatedByteExtents(disk)) collector.add(extent.start, extent.end - extent.start);
  return resultOf(collector, 'allocation', disk.sectorSize, disk.size, disk.size, disk.warnings, false);
}

async function diffCowWithBacking(disk: CowDisk, chunkBytes: number, exact: boolean): Promise<DiffResult> {
  const before: Readable = { read: disk.readBacking };
  const comparer = new ChunkComparer(disk.sectorSize, chunkBytes, exact);
  const collector = new RangeCollector();
  for await (const extent of allocatedByteExtents(disk)) {
    await comparer.compare(disk, before, extent.start, extent.end, collector);
  }
  return resultOf(collector, 'cow-vs-backing', disk.sectorSize, disk.size, disk.base.size, disk.warnings, exact);
}

function sameBase(a: VirtualDisk, b: VirtualDisk): boolean {
  if (a.size !== b.size) return false;
  const { size, mtime } = a.base;
  if (!sameBaseFile(a.base, b.base) || size !== b.base.size || mtime !== b.base.mtime) return false;
  // Only the view through the backing matters, but a COW whose header disagrees with its backing
  // may have been made over another file at that path: compare it in full to be safe.
  return [a, b].every((disk) => disk.kind === 'raw' || (disk.cow.header.size === size && disk.cow.header.mtime === mtime));
}

async function diffTwoDisks(a: VirtualDisk, b: VirtualDisk, chunkBytes: number, exact: boolean): Promise<DiffResult> {
  const sectorSize = Math.max(a.sectorSize, b.sectorSize);
  const comparer = new ChunkComparer(sectorSize, chunkBytes, exact);
  const collector = new RangeCollector();
  // Each warning names its image (the backing policy's already do).
  const named = (disk: VirtualDisk) => disk.warnings.map((w) => (w.startsWith(`${disk.path}: `) ? w : `${disk.path}: ${w}`));
  const warnings = [...named(a), ...named(b)];
  if (sameBase(a, b)) {
    for await (const extent of unionOfAllocation(a, b, sectorSize)) {
      await comparer.compare(a, b, extent.start, extent.end, collector);
    }
    return resultOf(collector, 'same-backing', sectorSize, a.size, b.size, warnings, exact);
  }
  const smaller = Math.min(a.size, b.size);
  const larger = Math.max(a.size, b.size);
  // Past the end of the smaller disk, bytes exist on one side only: they differ (in sector
  // units, so does the whole sector holding that end).
  const comparedEnd = a.size === b.size || exact ? smaller : Math.floor(smaller / sectorSize) * sectorSize;
  await comparer.compare(a, b, 0, comparedEnd, collector);
  collector.add(comparedEnd, larger - comparedEnd);
  return resultOf(collector, 'full', sectorSize, a.size, b.size, warnings, exact);
}

/** Byte extents allocated in either disk, merged, widened to whole `sectorSize` units. */
async function* unionOfAllocation(a: VirtualDisk, b: VirtualDisk, sectorSize: number): AsyncGenerator<{ start: number; end: number }> {
  const left = allocatedByteExtents(a)[Symbol.asyncIterator]();
  const right = allocatedByteExtents(b)[Symbol.asyncIterator]();
  let nextLeft = await left.next();
  let nextRight = await right.next();
  const union = new ExtentList();
  while (!nextLeft.done || !nextRight.done) {
    let extent: { start: number; end: number };
    if (nextRight.done || (!nextLeft.done && nextLeft.value.start <= nextRight.value.start)) {
      extent = nextLeft.value as { start: number; end: number };
      nextLeft = await left.next();
    } else {
      extent = nextRight.value;
      nextRight = await right.next();
    }
    const start = Math.floor(extent.start / sectorSize) * sectorSize;
    const end = Math.min(Math.ceil(extent.end / sectorSize) * sectorSize, a.size);
    union.add(start, end);
    yield* union.takeFinished();
  }
  yield* union.takeAll();
}

/** What the comparer needs of a disk. */
type Readable = Pick<VirtualDisk, 'read'>;

/**
 * Compares two disks over a byte range a big chunk at a time; only chunks that differ are
 * examined sector by sector. Buffers are reused, so memory stays at two chunks.
 */
class ChunkComparer {
  private readonly bufferA: Buffer;
  private readonly bufferB: Buffer;

  constructor(
    private readonly sectorSize: number,
    chunkBytes: number,
    /** Report the differing bytes themselves rather than whole sectors. */
    private readonly exact: boolean,
  ) {
    const bytes = Math.max(sectorSize, Math.floor(chunkBytes / sectorSize) * sectorSize);
    this.bufferA = Buffer.alloc(bytes);
    this.bufferB = Buffer.alloc(bytes);
  }

  /** `start` must be sector-aligned; `end` is a sector boundary or the end of both disks. */
  async compare(a: Readable, b: Readable, start: number, end: number, collector: RangeCollector): Promise<void> {
    const { sectorSize, bufferA, bufferB } = this;
    for (let offset = start; offset < end; offset += bufferA.length) {
      const length = Math.min(bufferA.length, end - offset);
      const [chunkA, chunkB] = await Promise.all([a.read(offset, length, bufferA), b.read(offset, length, bufferB)]);
      if (Buffer.compare(chunkA, chunkB) === 0) continue;
      for (let at = 0; at < length; at += sectorSize) {
        const sectorEnd = Math.min(at + sectorSize, length);
        if (bufferA.compare(bufferB, at, sectorEnd, at, sectorEnd) === 0) continue;
        if (!this.exact) {
          collector.add(offset + at, sectorEnd - at);
          continue;
        }
        for (let byte = at; byte < sectorEnd; byte++) {
          if (bufferA[byte] === bufferB[byte]) continue;
          const runStart = byte;
          while (byte < sectorEnd && bufferA[byte] !== bufferB[byte]) byte++;
          collector.add(offset + runStart, byte - runStart);
        }
      }
    }
  }
}
