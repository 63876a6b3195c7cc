/*
 * The engine itself: one COW file and its backing file as an async block device. Invariants:
 * data is written before the bitmap bytes that claim it; overlapping bitmap writes are queued
 * (BitmapWriter); a read that finds a clear bit with an update pending waits for it. The bitmap
 * is a LazyBitmap: slices loaded on demand and evicted when clean, so opening costs the same for
 * any disk size (a 15 TiB COW has a 3.75 GiB bitmap). A write pins its slices from before its
 * data is written until its bits are. Opening (locks, backing policy) is engine.ts's.
 */
import { UbdcowError, checkByteRange, fileEndsEarly, fileTooShort, fromSystemError } from '../../errors.js';
import { SectorBitmap } from '../../format/bitmap.js';
import type { CowGeometry } from '../../format/geometry.js';
import type { CowHeader } from '../../format/header.js';
import type { CowImage, OpenedFile } from '../image/index.js';
import { type BitmapView, BitmapWriter, type LazyBitmap } from '../bitmap/index.js';
import { type FileHandleLike, readExactly, readExactlySync } from '../file/index.js';
import { GroupSync } from './group-sync.js';
import { type ReadSpan, planRead, planReadInto, readSpans } from '../../format/read-plan.js';
import { ExtentList } from '../../format/extent-list.js';
import { RangeLock } from './range-lock.js';
import { type UnitLayout, type WriteSpan, unitRange, writeSpan } from './allocation-unit.js';
import type { AllocatedRun, CowDevice, FileRange } from './cow-device.js';

/** No bits: plans the sectors past the bitmap's cover, which always read from the backing file. */
const NO_BITS = new SectorBitmap(new Uint8Array(0), 0, 0);

/** The largest read `blockingReads` does on the calling thread. */
const BLOCKING_READ_MAX = 64 << 10;
/** The largest span tried from the page cache first (FileHandleLike.readCached). */
const CACHED_READ_MAX = 64 << 10;
/** The largest data write done with a blocking pwrite on the calling thread (see writeData). */
const BLOCKING_WRITE_MAX = 64 << 10;
/** The page-cache page: a write of whole, aligned pages never reads the file first. */
const PAGE_BYTES = 4096;

export interface EngineOptions {
  readOnly: boolean;
  sync: boolean;
  blockingReads: boolean;
  warnings: string[];
  /** Sectors per allocation unit (allocation-unit.ts). */
  unitSectors: number;
}

export class Engine implements CowDevice {
  readonly size: number;
  readonly sectorSize: number;
  readonly header: CowHeader;
  readonly geometry: CowGeometry;
  readonly readOnly: boolean;
  readonly warnings: string[];
  private readonly cow: FileHandleLike;
  private readonly path: string;
  /** Undefined in the reader mode without a backing file (reading an unallocated byte is then `no-backing`). */
  private readonly backing: FileHandleLike | undefined;
  /** The backing file as opened (an override, or the header's path resolved), named in its errors. */
  private readonly backingPath: string;
  private readonly writeLocks = new RangeLock();
  private readonly bitmapWriter: BitmapWriter;
  private readonly cowSync: GroupSync;
  private readonly unitLayout: UnitLayout;
  /** Requests not yet settled; close() waits for them. */
  private active = 0;
  private drained: (() => void) | undefined;
  private closing: Promise<void> | undefined;

  constructor(
    image: CowImage,
    backing: OpenedFile | undefined,
    private readonly bitmap: LazyBitmap,
    private readonly options: EngineOptions,
  ) {
    this.cow = image.handle;
    this.path = image.path;
    this.backing = backing?.handle;
    this.backingPath = backing?.path ?? '';
    this.header = image.header;
    this.geometry = image.geometry;
    this.size = image.header.size;
    this.sectorSize = image.header.sectorSize;
    this.warnings = options.warnings;
    this.readOnly = options.readOnly;
    this.cowSync = new GroupSync(() => this.cow.datasync());
    this.unitLayout = { sectorSize: this.sectorSize, unitSectors: options.unitSectors, coveredSectors: image.geometry.coveredSectors, size: this.size };
    this.bitmapWriter = new BitmapWriter({
      bitmap,
      file: this.cow,
      bitmapOffset: image.geometry.bitmapOffset,
      afterSliceWrite: options.sync ? () => this.cowSync.request() : undefined,
    });
  }

  isAllocated(sector: number): boolean {
    if (!(Number.isSafeInteger(sector) && sector >= 0 && sector < this.geometry.coveredSectors)) return false;
    return this.bitmap.getSync(sector);
  }

  async *allocatedRuns(startSector = 0, endSector = this.geometry.coveredSectors): AsyncGenerator<AllocatedRun> {
    const covered = this.geometry.coveredSectors;
    const start = Math.max(0, Math.min(startSector, covered));
    const end = Math.max(start, Math.min(endSector, covered));
    for await (const run of this.bitmap.allocatedRuns(start, end)) yield { start: run.start, end: run.end };
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    // Every byte is read or the request fails, so the buffer needs no zero-filling.
    return this.readInto(offset, Buffer.allocUnsafe(length));
  }

  readInto(offset: number, buffer: Uint8Array): Promise<Uint8Array> {
    return this.track(() => this.fastRead(offset, buffer) ?? this.doRead(offset, buffer));
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.track(() => this.doWrite(offset, data));
  }

  withFileRanges<T>(offset: number, length: number, use: (ranges: FileRange[]) => Promise<T>): Promise<T> | undefined {
    if (this.cow.fd === undefined || this.backing?.fd === undefined) return undefined;
    return this.track(async () => {
      checkByteRange(this.path, 'read', offset, length, this.size);
      await this.waitForStaleBits(Math.floor(offset / this.sectorSize), Math.ceil((offset + length) / this.sectorSize));
      const spans = await this.planLoaded(offset, offset + length);
      const ranges: FileRange[] = [];
      for (const span of spans) {
        const { handle, name, position, what } = this.spanFile(span);
        // A short file is the read's error, reported before any byte is sent.
        const end = position + span.length;
        if (end > (this.lengths.get(handle) ?? 0) && end > (await this.refreshLength(handle))) {
          throw fileTooShort(name, this.lengths.get(handle)!, end, what);
        }
        ranges.push({ fd: handle.fd!, position, length: span.length });
      }
      return use(ranges);
    });
  }

  /** Lengths of the two files as last seen; they only grow while the engine has them open. */
  private readonly lengths = new Map<FileHandleLike, number>();

  private async refreshLength(file: FileHandleLike): Promise<number> {
    const { size } = await file.stat();
    this.lengths.set(file, size);
    return size;
  }

  flush(): Promise<void> {
    if (this.closing) return Promise.reject(this.closedError('flush'));
    return this.readOnly ? Promise.resolve() : this.syncCow();
  }

  close(): Promise<void> {
    this.closing ??= this.drainAndClose();
    return this.closing;
  }

  /** Makes everything written so far durable (one fdatasync shared by concurrent callers). */
  private syncCow(): Promise<void> {
    return this.cowSync.request().catch((err) => {
      throw fromSystemError(err, this.path, 'flush');
    });
  }

  private async drainAndClose(): Promise<void> {
    if (this.active > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    let failure: unknown;
    if (!this.readOnly) await this.syncCow().catch((err) => (failure = err));
    await this.cow.close().catch((err) => (failure ??= err));
    await this.backing?.close().catch((err) => (failure ??= err));
    if (failure) throw failure;
  }

  private track<T>(operation: () => Promise<T>): Promise<T> {
    if (this.closing) return Promise.reject(this.closedError('use'));
    let promise: Promise<T>;
    try {
      promise = operation();
    } catch (err) {
      return Promise.reject(err);
    }
    this.active++;
    const done = () => {
      if (--this.active === 0) this.drained?.();
    };
    promise.then(done, done);
    return promise;
  }

  private closedError(action: string): UbdcowError {
    return new UbdcowError('closed', `${this.path}: cannot ${action} a device after close()`, { file: this.path });
  }

  /**
   * The read of [offset, end) planned over the live bitmap (see read-plan.ts), slice by slice of
   * `view`, which covers the range's covered sectors (undefined when it has none).
   */
  private plan(view: BitmapView | undefined, offset: number, end: number): ReadSpan[] {
    const { sectorSize } = this;
    const covered = this.geometry.coveredSectors;
    const plan = new ExtentList<boolean>();
    for (let position = offset; position < end; ) {
      const sector = Math.floor(position / sectorSize);
      const bits = sector < covered ? view!.sliceBits(sector) : NO_BITS;
      position = planReadInto(plan, bits, sectorSize, covered, position, end);
    }
    return readSpans(plan);
  }

  /** Covered sectors of [first, end), or undefined when none are. */
  private coveredRange(first: number, end: number): [number, number] | undefined {
    const coveredEnd = Math.min(end, this.geometry.coveredSectors);
    return first < coveredEnd ? [first, coveredEnd] : undefined;
  }

  /** Plans [offset, end) after loading the slices it needs. */
  private async planLoaded(offset: number, end: number): Promise<ReadSpan[]> {
    const range = this.coveredRange(Math.floor(offset / this.sectorSize), Math.ceil(end / this.sectorSize));
    const view = range ? await this.bitmap.acquire(range[0], range[1]) : undefined;
    try {
      return this.plan(view, offset, end);
    } finally {
      view?.release();
    }
  }

  /**
   * The common case in one step: the range lies wholly in the COW (all bits set) or wholly in the
   * backing with no bitmap update that could make a clear bit stale. Undefined: take the slow path.
   */
  private fastRead(offset: number, buffer: Uint8Array): Promise<Uint8Array> | undefined {
    const length = buffer.length;
    checkByteRange(this.path, 'read', offset, length, this.size);
    if (length === 0) return undefined;
    const first = Math.floor(offset / this.sectorSize);
    const end = Math.ceil((offset + length) / this.sectorSize);
    let spans: ReadSpan[];
    const bits = end <= this.geometry.coveredSectors ? this.bitmap.cachedSliceBits(first, end) : undefined;
    if (bits) {
      // The common case: one cached slice, planned without a view.
      spans = planRead(bits, this.sectorSize, this.geometry.coveredSectors, offset, offset + length).spans;
    } else {
      const range = this.coveredRange(first, end);
      // Slices not in memory: the slow path loads them.
      const view = range ? this.bitmap.tryAcquire(range[0], range[1]) : undefined;
      if (range && !view) return undefined;
      try {
        spans = this.plan(view, offset, offset + length);
      } finally {
        view?.release();
      }
    }
    if (spans.length !== 1) return undefined;
    if (!spans[0].fromCow && this.bitmapWriter.updatesOverlapping(first, end).length > 0) return undefined;
    return this.readSpan(spans[0], buffer, offset).then(() => buffer);
  }

  /** The general path; `fastRead` has checked the range already. */
  private async doRead(offset: number, buffer: Uint8Array): Promise<Uint8Array> {
    const length = buffer.length;
    if (length === 0) return buffer;
    const first = Math.floor(offset / this.sectorSize);
    const end = Math.ceil((offset + length) / this.sectorSize);
    await this.waitForStaleBits(first, end);
    await this.fill(buffer, offset);
    return buffer;
  }

  /**
   * A clear bit may be stale: its data is written and its bitmap update is waiting or in flight.
   * Wait for the updates known now (not later ones, so a stream of writes cannot starve reads).
   */
  private async waitForStaleBits(first: number, end: number): Promise<void> {
    const coveredEnd = Math.min(end, this.geometry.coveredSectors);
    if (first >= coveredEnd) return;
    const view = await this.bitmap.acquire(first, coveredEnd);
    let allSet: boolean;
    try {
      allSet = view.allSet(first, coveredEnd);
    } finally {
      view.release();
    }
    if (allSet) return;
    const updates = this.bitmapWriter.updatesOverlapping(first, coveredEnd);
    if (updates.length > 0) await Promise.allSettled(updates);
  }

  /** Fills `buffer` with the disk's bytes from `offset`, span by span of the read plan. */
  private async fill(buffer: Uint8Array, offset: number): Promise<void> {
    const spans = await this.planLoaded(offset, offset + buffer.length);
    await Promise.all(spans.map((span) => this.readSpan(span, buffer, offset)));
  }

  /** The file a span of the read plan lives in: its handle, name, position and what to call it when short. */
  private spanFile({ fromCow, diskOffset }: ReadSpan): { handle: FileHandleLike; name: string; position: number; what: string } {
    if (fromCow) return { handle: this.cow, name: this.path, position: this.geometry.dataOffset + diskOffset, what: 'the data area' };
    if (!this.backing) {
      throw new UbdcowError('no-backing', `${this.path}: byte ${diskOffset} is not in the COW and the backing file was not opened`, { file: this.path });
    }
    return { handle: this.backing, name: this.backingPath, position: diskOffset, what: `the backing file of ${this.path}` };
  }

  /** Reads one span into `buffer`, which holds the disk's bytes from `bufferStart`. */
  private async readSpan(span: ReadSpan, buffer: Uint8Array, bufferStart: number): Promise<void> {
    const { handle, name, position, what } = this.spanFile(span);
    const at = span.diskOffset - bufferStart;
    let done = 0;
    if (handle.readCached && span.length <= CACHED_READ_MAX) {
      // Page-cached bytes on this thread (never waits for the disk); the rest the usual way.
      while (done < span.length) {
        const got = handle.readCached(buffer, at + done, span.length - done, position + done);
        if (!got) break;
        done += got;
      }
      if (done === span.length) return;
    }
    const target = { buffer, offset: at + done, length: span.length - done, position: position + done };
    // Bytes from the page cache count: the file's end is where the whole span's bytes stopped.
    const short = (got: number) => fileEndsEarly(name, position, done + got, position + span.length, what);
    if (this.options.blockingReads && handle.readSync && target.length <= BLOCKING_READ_MAX) {
      readExactlySync(handle as Required<Pick<FileHandleLike, 'readSync'>>, name, 'read', target, short);
      return;
    }
    await readExactly(handle, name, 'read', target, short);
  }

  private async doWrite(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) {
      throw new UbdcowError('read-only', `${this.path}: device is open read-only`, { file: this.path });
    }
    checkByteRange(this.path, 'write', offset, data.length, this.size);
    if (data.length === 0) return;
    const sectorSize = this.sectorSize;
    const first = Math.floor(offset / sectorSize);
    const end = Math.ceil((offset + data.length) / sectorSize);
    if (end > this.geometry.coveredSectors) {
      throw new UbdcowError(
        'uncovered',
        `${this.path}: sector ${this.geometry.coveredSectors} and later have no bitmap bit in this version ${this.header.version} file (the historic rounding), so they cannot be written`,
        { file: this.path },
      );
    }
    // Whole units, serialized against other writes to them, so a copy-up cannot lose a write.
    const [unitFirst, unitEnd] = unitRange(first, end, this.unitLayout);
    const release = await this.writeLocks.acquire(unitFirst, unitEnd);
    let view: BitmapView | undefined;
    try {
      // The bitmap slices of these sectors stay in memory until their bits are written.
      view = this.bitmap.tryAcquire(unitFirst, unitEnd) ?? (await this.bitmap.acquire(unitFirst, unitEnd));
      const span = writeSpan(first, end, this.unitLayout, view);
      const sectors = await this.wholeSpan(offset, data, span);
      try {
        await this.writeData(sectors, this.geometry.dataOffset + span.start);
        if (this.options.sync) await this.cowSync.request();
      } catch (err) {
        throw fromSystemError(err, this.path, 'write data to');
      }
      try {
        await this.bitmapWriter.commit(span.first, span.end, view);
      } catch (err) {
        throw fromSystemError(err, this.path, 'write the bitmap of');
      }
    } finally {
      view?.release();
      release();
    }
  }

  /**
   * Writes data to the COW file. Whole page-cache pages of up to BLOCKING_WRITE_MAX bytes go with
   * a blocking pwrite on this thread: a write that covers whole pages never reads the file first,
   * so the call copies bytes into the page cache (a few microseconds, against a thread-pool round
   * trip of tens and its futex wake-ups; docs/engine.md). Other writes use the thread pool.
   */
  private writeData(bytes: Uint8Array, position: number): Promise<void> {
    const { cow } = this;
    if (!cow.writeSync || bytes.length > BLOCKING_WRITE_MAX || position % PAGE_BYTES !== 0 || bytes.length % PAGE_BYTES !== 0) {
      return cow.write(bytes, 0, bytes.length, position);
    }
    cow.writeSync(bytes, 0, bytes.length, position);
    return Promise.resolve();
  }

  /** The data widened to `span`, the rest copied up from the disk's current contents (see WriteSpan). */
  private async wholeSpan(offset: number, data: Uint8Array, { start, stop, headBytes, tailStart }: WriteSpan): Promise<Uint8Array> {
    if (offset === start && offset + data.length === stop) return data;
    const span = new Uint8Array(stop - start);
    const edges: Promise<void>[] = [];
    let headEnd = start;
    if (offset > start) {
      headEnd = Math.min(start + headBytes, stop);
      edges.push(this.fill(span.subarray(0, headEnd - start), start));
    }
    const tailFrom = Math.max(headEnd, tailStart);
    if (offset + data.length < stop && tailFrom < stop) edges.push(this.fill(span.subarray(tailFrom - start), tailFrom));
    await Promise.all(edges);
    span.set(data, offset - start);
    return span;
  }
}
