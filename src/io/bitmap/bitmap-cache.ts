/**
 * A COW sector bitmap loaded on demand, a fixed-size slice at a time, with bounded memory: so
 * opening a COW costs the same for 1 GiB and 15 TiB (a 3.75 GiB bitmap), and scans skip the
 * bitmap's holes with SEEK_DATA instead of reading them as zeros.
 *
 * Invariants:
 * - A cached slice holds the bitmap as the file has it, plus the bits set or cleared since (which
 *   make it dirty). A dirty slice is never evicted: it leaves memory only after its writer (the
 *   engine's BitmapWriter) wrote its bytes and said so (markWritten). A slice pinned by a view is
 *   never evicted either. Clean slices are evicted least recently
 *   used first once the cache holds more than `maxCachedBytes`; dirty and pinned slices may keep
 *   it above that bound, which `overBudget` shows.
 * - The cache never writes on its own. The engine's order stays the caller's: data first, then
 *   the bitmap bytes that claim it (BitmapWriter sets bits just before writing their slice, and
 *   keeps the slice pinned until the write is done, so no bit changes under it).
 * - Bits past `coveredSectors` do not exist: views refuse them, as SectorBitmap does.
 *
 * Sector numbers are whole disk sectors (up to 2^35 and beyond for a 16 TiB disk); within a slice
 * they are below 2^31 (slices are at most 2^24 bytes), where SectorBitmap is fastest.
 */
import { CowFormatError, fromSystemError } from '../../errors.js';
import { SectorBitmap, type SectorRun } from '../../format/bitmap.js';
import type { FileHandleLike } from '../file/index.js';
import type { CowImage } from '../image/index.js';
import { type BitmapView, type Slice, sliceView } from './bitmap-view.js';
import { allocatedRunsSkippingHoles, countSetSkippingHoles } from './bitmap-scan.js';

export type { BitmapView };

export interface LazyBitmapOptions {
  file: FileHandleLike;
  /** Named in errors. */
  path: string;
  /** File position of bitmap byte 0. */
  bitmapOffset: number;
  /** Bitmap bytes on disk. */
  bitmapLength: number;
  /** Sectors that have a bit (at most bitmapLength * 8). */
  coveredSectors: number;
  /** Bytes per slice (default 64 KiB: 524,288 sectors, 256 MiB of disk per slice). */
  sliceBytes?: number;
  /** Soft bound on cached slice bytes (default 16 MiB). */
  maxCachedBytes?: number;
}


export interface DirtySlice {
  index: number;
  /** File position of the first changed byte. */
  position: number;
  /** The changed bytes (a live view: copy it before awaiting). */
  bytes: Uint8Array;
}

export interface LazyBitmapStats {
  loads: number;
  evictions: number;
  /** Slices skipped by scans because the file has a hole there. */
  holesSkipped: number;
}


const MAX_SLICE_BYTES = 1 << 24;

/** A LazyBitmap over an opened COW image's bitmap (what openCow would use instead of readWholeBitmap). */
export function lazyBitmapOf(image: CowImage, options: Pick<LazyBitmapOptions, 'sliceBytes' | 'maxCachedBytes'> = {}): LazyBitmap {
  const { bitmapOffset, bitmapLength, coveredSectors } = image.geometry;
  return new LazyBitmap({ file: image.handle, path: image.path, bitmapOffset, bitmapLength, coveredSectors, ...options });
}

export class LazyBitmap {
  readonly sliceBytes: number;
  readonly sliceSectors: number;
  readonly sliceCount: number;
  readonly coveredSectors: number;
  readonly stats: LazyBitmapStats = { loads: 0, evictions: 0, holesSkipped: 0 };
  private readonly maxCachedBytes: number;
  /** Map order is recency: a used slice is moved to the end. */
  private readonly slices = new Map<number, Slice>();
  private readonly loading = new Map<number, Promise<Slice>>();
  private cached = 0;

  constructor(private readonly options: LazyBitmapOptions) {
    this.sliceBytes = options.sliceBytes ?? 64 * 1024;
    if (!Number.isInteger(this.sliceBytes) || this.sliceBytes < 1 || this.sliceBytes > MAX_SLICE_BYTES) {
      throw new RangeError(`slice size ${this.sliceBytes} bytes: expected a whole number from 1 to ${MAX_SLICE_BYTES}`);
    }
    if (options.coveredSectors > options.bitmapLength * 8) {
      throw new RangeError(`a bitmap of ${options.bitmapLength} bytes cannot cover ${options.coveredSectors} sectors`);
    }
    this.sliceSectors = this.sliceBytes * 8;
    this.coveredSectors = options.coveredSectors;
    this.sliceCount = Math.ceil(options.bitmapLength / this.sliceBytes);
    this.maxCachedBytes = options.maxCachedBytes ?? 16 * 1024 * 1024;
  }

  /** Bytes of slices in memory. */
  get cachedBytes(): number {
    return this.cached;
  }

  get cachedSlices(): number {
    return this.slices.size;
  }

  /** True when dirty or pinned slices keep the cache above its bound (time for their writer to write them). */
  get overBudget(): boolean {
    return this.cached > this.maxCachedBytes;
  }

  /** The cached state of `sector`, or undefined when its slice is not in memory. */
  peek(sector: number): boolean | undefined {
    this.checkRange(sector, sector + 1);
    const index = Math.floor(sector / this.sliceSectors);
    const slice = this.slices.get(index);
    return slice ? slice.bitmap.get(sector - index * this.sliceSectors) : undefined;
  }

  async get(sector: number): Promise<boolean> {
    const view = await this.acquire(sector, sector + 1);
    try {
      return view.get(sector);
    } finally {
      view.release();
    }
  }

  async setRange(start: number, end: number, value = true): Promise<void> {
    const view = await this.acquire(start, end);
    try {
      view.setRange(start, end, value);
    } finally {
      view.release();
    }
  }

  /** Loads and pins the slices of [start, end) until the view is released. */
  async acquire(start: number, end: number): Promise<BitmapView> {
    this.checkRange(start, end);
    const first = Math.floor(start / this.sliceSectors);
    const last = end > start ? Math.floor((end - 1) / this.sliceSectors) : first - 1;
    const pinned: Slice[] = [];
    try {
      for (let index = first; index <= last; index++) pinned.push(await this.pin(index));
    } catch (err) {
      for (const slice of pinned) slice.pins--;
      throw err;
    }
    this.evict();
    return sliceView(start, end, pinned, first, this.sliceSectors, () => this.evict());
  }

  /**
   * The cached slice holding all of [start, end), for one synchronous look (no pin, no view: the
   * engine's per-request fast path); undefined when the range spans slices or is not in memory.
   */
  cachedSliceBits(start: number, end: number): SectorBitmap | undefined {
    const index = Math.floor(start / this.sliceSectors);
    if (end > (index + 1) * this.sliceSectors || end > this.coveredSectors || start < 0) return undefined;
    const slice = this.slices.get(index);
    if (!slice) return undefined;
    // Most recently used last (only when not last already: a Map re-insert per request costs).
    if (this.slices.size > 1) {
      this.slices.delete(index);
      this.slices.set(index, slice);
    }
    return slice.bitmap;
  }

  /**
   * The view of [start, end) without waiting, when every slice of it is in memory (pinned like
   * acquire's); undefined otherwise. Lets a caller keep a synchronous fast path for cached slices.
   */
  tryAcquire(start: number, end: number): BitmapView | undefined {
    this.checkRange(start, end);
    const first = Math.floor(start / this.sliceSectors);
    const last = end > start ? Math.floor((end - 1) / this.sliceSectors) : first - 1;
    const pinned: Slice[] = [];
    for (let index = first; index <= last; index++) {
      const slice = this.slices.get(index);
      if (!slice) return undefined;
      pinned.push(slice);
    }
    for (const slice of pinned) {
      slice.pins++;
      // Most recently used last.
      this.slices.delete(slice.index);
      this.slices.set(slice.index, slice);
    }
    return sliceView(start, end, pinned, first, this.sliceSectors, () => this.evict());
  }

  /**
   * The state of `sector` synchronously: from memory, or by loading its slice with a blocking
   * read when the handle has one (for a synchronous API such as CowDevice.isAllocated).
   */
  getSync(sector: number): boolean {
    const cached = this.peek(sector);
    if (cached !== undefined) return cached;
    const index = Math.floor(sector / this.sliceSectors);
    const { file, path, bitmapOffset } = this.options;
    if (!file.readSync) {
      throw new Error(`${path}: the bitmap slice of sector ${sector} is not loaded and this file has no blocking read`);
    }
    const { byteStart, length, bytes } = this.sliceBuffer(index);
    let got = 0;
    try {
      while (got < length) {
        const n = file.readSync(bytes, got, length - got, bitmapOffset + byteStart + got);
        if (n === 0) break;
        got += n;
      }
    } catch (err) {
      throw fromSystemError(err, path, 'read the bitmap of');
    }
    const slice = this.adopt(index, bytes, got);
    this.evict();
    return slice.bitmap.get(sector - index * this.sliceSectors);
  }

  /**
   * A copy of bitmap bytes [byteStart, byteEnd), whose slices must be in memory (pinned by the
   * caller): what a caller that writes bitmap bytes itself (the engine's BitmapWriter) writes.
   */
  copyBytes(byteStart: number, byteEnd: number): Uint8Array {
    const out = new Uint8Array(byteEnd - byteStart);
    for (let byte = byteStart; byte < byteEnd; ) {
      const index = Math.floor(byte / this.sliceBytes);
      const slice = this.slices.get(index);
      if (!slice) throw new Error(`bitmap byte ${byte} is not in memory: acquire its sectors first`);
      const base = index * this.sliceBytes;
      const to = Math.min(byteEnd, base + slice.bitmap.bytes.length);
      out.set(slice.bitmap.bytes.subarray(byte - base, to - base), byte - byteStart);
      byte = to;
    }
    return out;
  }

  /**
   * The caller wrote the bitmap bytes of sectors [start, end) itself, in an order it keeps (the
   * engine: bits set just before their write, overlapping writes queued, slices pinned until
   * written): their slices are marked clean, so they can be evicted once unpinned. A slice with
   * other changes must still be pinned by whoever will write them.
   */
  markWritten(start: number, end: number): void {
    this.checkRange(start, end);
    if (end <= start) return;
    const first = Math.floor(start / this.sliceSectors);
    const last = Math.floor((end - 1) / this.sliceSectors);
    for (let index = first; index <= last; index++) {
      const slice = this.slices.get(index);
      if (!slice) continue;
      slice.dirtyStart = 0;
      slice.dirtyEnd = 0;
    }
    this.evict();
  }

  /** Dirty slices in slice order, each with the changed bytes and where they go. */
  *dirtySlices(): Generator<DirtySlice> {
    const indexes = [...this.slices.values()].filter((slice) => slice.dirtyEnd > slice.dirtyStart).map((slice) => slice.index);
    for (const index of indexes.sort((a, b) => a - b)) {
      const slice = this.slices.get(index)!;
      yield {
        index,
        position: this.options.bitmapOffset + index * this.sliceBytes + slice.dirtyStart,
        bytes: slice.bitmap.bytes.subarray(slice.dirtyStart, slice.dirtyEnd),
      };
    }
  }

  /** Sectors set in [start, end); slices the file has as holes are counted as 0 without reading. */
  countSet(start = 0, end = this.coveredSectors): Promise<number> {
    this.checkRange(start, end);
    return countSetSkippingHoles(this, start, end);
  }

  /** Runs of set sectors in [start, end), joined across slices, skipping the bitmap's holes. */
  allocatedRuns(start = 0, end = this.coveredSectors): AsyncGenerator<SectorRun> {
    this.checkRange(start, end);
    return allocatedRunsSkippingHoles(this, start, end);
  }

  /** Where slice `index` lies in the file, and whether it is in memory or on its way there. */
  sliceInFile(index: number): { start: number; end: number; known: boolean } {
    const start = this.options.bitmapOffset + index * this.sliceBytes;
    return { start, end: start + this.sliceBytes, known: this.slices.has(index) || this.loading.has(index) };
  }

  /** The first slice from index `from` on that is in memory or on its way there, if any. */
  nextKnownSlice(from: number): number | undefined {
    let found: number | undefined;
    for (const index of [...this.slices.keys(), ...this.loading.keys()]) {
      if (index >= from && (found === undefined || index < found)) found = index;
    }
    return found;
  }

  /** The file the bitmap lives in, and its bytes there (for scans that look for holes). */
  get region(): { file: FileHandleLike; offset: number; length: number } {
    return { file: this.options.file, offset: this.options.bitmapOffset, length: this.options.bitmapLength };
  }

  /**
   * Loads and pins slice `index`. Between a load finishing and this continuation running, other
   * code may have evicted the slice (and even loaded, changed and written a new copy), so only
   * the copy the cache holds now is pinned; an evicted one is read again.
   */
  private async pin(index: number): Promise<Slice> {
    for (;;) {
      const slice = await this.load(index);
      if (this.slices.get(index) === slice) {
        slice.pins++;
        return slice;
      }
    }
  }

  private load(index: number): Promise<Slice> {
    const cached = this.slices.get(index);
    if (cached) {
      this.slices.delete(index);
      this.slices.set(index, cached);
      return Promise.resolve(cached);
    }
    let loading = this.loading.get(index);
    if (!loading) {
      loading = this.read(index).finally(() => this.loading.delete(index));
      this.loading.set(index, loading);
    }
    return loading;
  }

  private sliceBuffer(index: number): { byteStart: number; length: number; bytes: Uint8Array } {
    const byteStart = index * this.sliceBytes;
    const length = Math.min(this.sliceBytes, this.options.bitmapLength - byteStart);
    return { byteStart, length, bytes: new Uint8Array(length) };
  }

  private async read(index: number): Promise<Slice> {
    const { file, path, bitmapOffset } = this.options;
    const { byteStart, length, bytes } = this.sliceBuffer(index);
    let got: number;
    try {
      got = await file.read(bytes, 0, length, bitmapOffset + byteStart);
    } catch (err) {
      throw fromSystemError(err, path, 'read the bitmap of');
    }
    return this.adopt(index, bytes, got);
  }

  /** Caches slice `index` read into `bytes` (`got` of them), unless a copy is cached already. */
  private adopt(index: number, bytes: Uint8Array, got: number): Slice {
    const { path, bitmapLength } = this.options;
    const byteStart = index * this.sliceBytes;
    const length = bytes.length;
    // A blocking load (getSync) may have cached this slice while this read was in flight.
    const already = this.slices.get(index);
    if (already) return already;
    if (got < length) {
      throw new CowFormatError('truncated-bitmap', 'bitmap', `cut off at byte ${byteStart + got}`, `${bitmapLength} bytes`, path);
    }
    const firstSector = index * this.sliceSectors;
    const bitCount = Math.max(0, Math.min(this.sliceSectors, this.coveredSectors - firstSector));
    const slice: Slice = { index, bitmap: new SectorBitmap(bytes, bitCount, firstSector), pins: 0, dirtyStart: 0, dirtyEnd: 0 };
    this.stats.loads++;
    this.slices.set(index, slice);
    this.cached += length;
    return slice;
  }

  /** Drops least recently used clean, unpinned slices while over the bound. */
  private evict(): void {
    if (this.cached <= this.maxCachedBytes) return;
    for (const slice of this.slices.values()) {
      if (this.cached <= this.maxCachedBytes) break;
      if (slice.pins > 0 || slice.dirtyEnd > slice.dirtyStart) continue;
      this.slices.delete(slice.index);
      this.cached -= slice.bitmap.bytes.length;
      this.stats.evictions++;
    }
  }

  private checkRange(start: number, end: number): void {
    if (!(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && end <= this.coveredSectors && start <= end)) {
      throw new RangeError(`sector range [${start}, ${end}) outside a bitmap of ${this.coveredSectors} sectors`);
    }
  }
}
