import { UbdcowError, fromSystemError } from '../errors.js';
import type { SectorBitmap } from '../format/bitmap.js';
import type { CowGeometry } from '../format/geometry.js';
import type { CowHeader } from '../format/header.js';
import { BitmapWriter } from './bitmap-writer.js';
import { type FileHandleLike, type FileSystem, nodeFileSystem, readExactly } from './file.js';
import { GroupSync } from './group-sync.js';
import { type CowImage, checkBacking, mtimeMismatchFix, openImage, readWholeBitmap } from './image.js';
import { RangeLock } from './range-lock.js';
import { lockCowFile } from './lock.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface OpenCowOptions {
  /** Backing file to use instead of the header's path (like UML's `ubdN=cow,backing`). */
  backing?: string;
  readOnly?: boolean;
  /**
   * Like UML's `ubdNs`: data is fdatasync'ed before its bitmap slice is written and the slice
   * before the write resolves, so even a power loss never leaves a set bit over unwritten data.
   */
  sync?: boolean;
  fs?: FileSystem;
  /**
   * Take a POSIX record lock on the COW file as the kernel does (write lock, or read lock when
   * read-only), refusing a file a running UML holds. Default true.
   */
  lock?: boolean;
}

/** A block device in user space over a COW file and its backing file. */
export interface CowDevice {
  /** Virtual disk size in bytes. */
  readonly size: number;
  readonly sectorSize: number;
  readonly header: CowHeader;
  readonly geometry: CowGeometry;
  readonly readOnly: boolean;
  /** Worth telling the user, not stopping for (read-only: a backing mtime mismatch). */
  readonly warnings: string[];
  /** Exactly `length` bytes from `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Fills `buffer` with the disk's bytes from `offset` (lets callers reuse buffers, like pread). */
  readInto(offset: number, buffer: Uint8Array): Promise<Uint8Array>;
  /** Resolves once the data and the bitmap bits that point at it are written. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Everything acknowledged so far is durable (fdatasync). */
  flush(): Promise<void>;
  /** Drains the queue, flushes, releases the lock and the files. */
  close(): Promise<void>;
  /** True when sector `sector` lives in the COW file (for tests and tools). */
  isAllocated(sector: number): boolean;
}

const openCowOptionKeys: OptionKeys<OpenCowOptions> = { backing: true, readOnly: true, sync: true, fs: true, lock: true };

export async function openCow(cowPath: string, options: OpenCowOptions = {}): Promise<CowDevice> {
  checkOptions('openCow', options, openCowOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  const readOnly = options.readOnly ?? false;
  const image = await openImage(cowPath, { fs, mode: readOnly ? 'r' : 'r+' });
  const opened: FileHandleLike[] = [image.file];
  try {
    // Held until the COW file is closed.
    if (options.lock ?? true) await lockCowFile(image.file, image.path, { exclusive: !readOnly });
    const backing = await checkBacking(image.header, options.backing, fs);
    const warnings: string[] = [];
    if (backing.state === 'mtime-mismatch') {
      const problem = `${cowPath}: ${backing.problem}`;
      // Reading goes on (the bytes are most likely right); writing refuses, as the kernel does.
      if (!readOnly) throw new UbdcowError('backing-mtime-mismatch', `${problem}; refusing to write (${mtimeMismatchFix(cowPath, backing.path)})`, { file: cowPath });
      warnings.push(`${problem} (the kernel would refuse it; ${mtimeMismatchFix(cowPath, backing.path)})`);
    } else if (backing.state !== 'ok') {
      throw new UbdcowError(`backing-${backing.state}`, `${cowPath}: ${backing.problem ?? `backing file ${backing.path} is ${backing.state}`}`, { file: cowPath });
    }
    let backingFile: FileHandleLike;
    try {
      backingFile = await fs.open(backing.path, 'r');
    } catch (err) {
      throw fromSystemError(err, backing.path, 'open backing file');
    }
    opened.push(backingFile);
    const bitmap = await readWholeBitmap(image);
    return new Engine(image, backingFile, bitmap, { readOnly, sync: options.sync ?? false, warnings });
  } catch (err) {
    for (const file of opened) await file.close().catch(() => undefined);
    throw err;
  }
}

interface EngineOptions {
  readOnly: boolean;
  sync: boolean;
  warnings: string[];
}

class Engine implements CowDevice {
  readonly size: number;
  readonly sectorSize: number;
  readonly header: CowHeader;
  readonly geometry: CowGeometry;
  readonly readOnly: boolean;
  readonly warnings: string[];
  private readonly cow: FileHandleLike;
  private readonly path: string;
  private readonly writeLocks = new RangeLock();
  private readonly bitmapWriter: BitmapWriter;
  private readonly cowSync: GroupSync;
  /** Requests not yet settled; close() waits for them. */
  private active = 0;
  private drained: (() => void) | undefined;
  private closing: Promise<void> | undefined;

  constructor(
    image: CowImage,
    private readonly backing: FileHandleLike,
    private readonly bitmap: SectorBitmap,
    private readonly options: EngineOptions,
  ) {
    this.cow = image.file;
    this.path = image.path;
    this.header = image.header;
    this.geometry = image.geometry;
    this.size = image.header.size;
    this.sectorSize = image.header.sectorSize;
    this.warnings = options.warnings;
    this.readOnly = options.readOnly;
    this.cowSync = new GroupSync(() => this.cow.datasync());
    this.bitmapWriter = new BitmapWriter({
      bitmap,
      file: this.cow,
      bitmapOffset: image.geometry.bitmapOffset,
      afterSliceWrite: options.sync ? () => this.cowSync.request() : undefined,
    });
  }

  isAllocated(sector: number): boolean {
    return sector < this.geometry.coveredSectors && this.bitmap.get(sector);
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
    await this.backing.close().catch((err) => (failure ??= err));
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

  private checkRange(offset: number, length: number, action: string): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new UbdcowError('bad-range', `${this.path}: ${action} at offset ${offset} of ${length} bytes: expected non-negative whole numbers`, { file: this.path });
    }
    if (offset + length > this.size) {
      throw new UbdcowError(
        'out-of-range',
        `${this.path}: ${action} of ${length} bytes at offset ${offset} passes the end of the disk (${this.size} bytes)`,
        { file: this.path },
      );
    }
  }

  /**
   * The common case in one step: the range lies wholly in the COW (all bits set) or wholly in the
   * backing with no bitmap update that could make a clear bit stale. Undefined: take the slow path.
   */
  private fastRead(offset: number, buffer: Uint8Array): Promise<Uint8Array> | undefined {
    const length = buffer.length;
    this.checkRange(offset, length, 'read');
    if (length === 0) return undefined;
    const first = Math.floor(offset / this.sectorSize);
    const end = Math.ceil((offset + length) / this.sectorSize);
    const covered = this.geometry.coveredSectors;
    let fromCow: boolean;
    if (first >= covered) fromCow = false;
    else if (end > covered) return undefined;
    else if (this.bitmap.allSet(first, end)) fromCow = true;
    else if (this.bitmap.noneSet(first, end) && this.bitmapWriter.updatesOverlapping(first, end).length === 0) fromCow = false;
    else return undefined;
    return this.readSpan(fromCow, buffer, 0, length, offset).then(() => buffer);
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
    if (first >= coveredEnd || this.bitmap.allSet(first, coveredEnd)) return;
    const updates = this.bitmapWriter.updatesOverlapping(first, coveredEnd);
    if (updates.length > 0) await Promise.allSettled(updates);
  }

  /** Fills `buffer` with the disk's bytes from `offset`, run by run of the bitmap. */
  private async fill(buffer: Uint8Array, offset: number): Promise<void> {
    const end = offset + buffer.length;
    const sectorSize = this.sectorSize;
    const first = Math.floor(offset / sectorSize);
    const last = Math.ceil(end / sectorSize);
    const covered = Math.min(last, this.geometry.coveredSectors);
    const reads: Promise<void>[] = [];
    const readRun = (fromCow: boolean, runStart: number, runEnd: number) => {
      const from = Math.max(runStart * sectorSize, offset);
      const to = Math.min(runEnd * sectorSize, end);
      if (to > from) reads.push(this.readSpan(fromCow, buffer, from - offset, to - from, from));
    };
    if (first < covered) {
      for (const run of this.bitmap.runs(first, covered)) readRun(run.allocated, run.start, run.end);
    }
    if (last > Math.max(first, covered)) readRun(false, Math.max(first, covered), last);
    await Promise.all(reads);
  }

  private async readSpan(fromCow: boolean, buffer: Uint8Array, bufferOffset: number, length: number, diskOffset: number): Promise<void> {
    const file = fromCow ? this.path : this.header.backingFile;
    const position = fromCow ? this.geometry.dataOffset + diskOffset : diskOffset;
    await readExactly(fromCow ? this.cow : this.backing, file, 'read', { buffer, offset: bufferOffset, length, position }, (got) => {
      const where = fromCow ? `${this.path}: data area` : `${this.header.backingFile}: backing file`;
      return new UbdcowError('truncated', `${where} ends at ${position + got}, expected data up to ${position + length}`, { file });
    });
  }

  private async doWrite(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) {
      throw new UbdcowError('read-only', `${this.path}: device is open read-only`, { file: this.path });
    }
    this.checkRange(offset, data.length, 'write');
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
    // Whole sectors, serialized against other writes to them, so a copy-up cannot lose a write.
    const release = await this.writeLocks.acquire(first, end);
    try {
      const spanStart = first * sectorSize;
      const spanEnd = Math.min(end * sectorSize, this.size);
      const sectors = await this.wholeSectors(offset, data, spanStart, spanEnd);
      try {
        await this.cow.write(sectors, 0, sectors.length, this.geometry.dataOffset + spanStart);
        if (this.options.sync) await this.cowSync.request();
      } catch (err) {
        throw fromSystemError(err, this.path, 'write data to');
      }
      try {
        await this.bitmapWriter.commit(first, end);
      } catch (err) {
        throw fromSystemError(err, this.path, 'write the bitmap of');
      }
    } finally {
      release();
    }
  }

  /** The data widened to whole sectors: edges copied up from the disk's current contents. */
  private async wholeSectors(offset: number, data: Uint8Array, spanStart: number, spanEnd: number): Promise<Uint8Array> {
    if (offset === spanStart && offset + data.length === spanEnd) return data;
    const span = new Uint8Array(spanEnd - spanStart);
    const sectorSize = this.sectorSize;
    const edges: Promise<void>[] = [];
    if (offset > spanStart) {
      edges.push(this.fill(span.subarray(0, Math.min(sectorSize, span.length)), spanStart));
    }
    const tailStart = Math.max(spanStart, spanEnd - (spanEnd % sectorSize || sectorSize));
    if (offset + data.length < spanEnd && (tailStart > spanStart || offset === spanStart)) {
      edges.push(this.fill(span.subarray(tailStart - spanStart), tailStart));
    }
    await Promise.all(edges);
    span.set(data, offset - spanStart);
    return span;
  }
}
