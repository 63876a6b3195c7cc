import { fileEndsEarly } from '../errors.js';
import { type FileHandleLike, dataExtents, readExactlySync } from '../io/file/index.js';
import type { OpenedFile } from '../io/image/index.js';
import type { WindowAnswer } from './compare-worker.js';
import { readBase } from './disk-pages.js';

/*
 * The bases of `rebase --rewrite`, compared window by window. Invariant: each byte of each base
 * is read at most once, front to back, and a window's result names every whole page where an
 * old base differs from the new one; the window's buffers hold valid bytes at least in those pages
 * (with `keepAll`, everywhere).
 *
 * Why small chunks: reading both bases costs a copy of every byte out of the page cache, and that
 * copy is cheapest when the buffer it lands in stays in the CPU's caches. Reading 2 x 2 GiB here
 * took 0.40-0.47 s of system time in 64 KiB reads into one 64 KiB buffer, 0.75-0.80 s into 1 MiB
 * windows (same 64 KiB reads) and 0.72-0.76 s in 2 MiB reads. So each base is read a 64 KiB chunk
 * at a time into a small scratch buffer and compared at once while it is hot; only chunks that
 * differ are copied into the window's buffers for the per-COW work. The reads are blocking
 * (readSync) where the handle has it: a thread-pool round trip per chunk would cost more than the
 * read itself, and one 64 KiB read is a short stretch (the caller yields to the event loop between
 * windows). Where both bases have a hole, nothing is read: hole against hole is equal.
 */

/** Bytes read and compared at a time (see above). */
export const CHUNK_BYTES = 64 << 10;

/** One window's comparison. */
export interface ComparedWindow {
  start: number;
  end: number;
  /** The new base's bytes of the window (valid where some old base differs, or everywhere with keepAll). */
  fresh: Uint8Array;
  /** Per old base: its bytes (valid where it differs, or everywhere) and the window offsets of the pages that differ. */
  old: Map<OpenedFile, { data: Uint8Array; differs: number[] }>;
}

/** Bytes [start, end) of a file that may hold data (as dataExtents yields them). */
interface DataExtent {
  start: number;
  end: number;
}

/** Walks a file's data extents front to back, a window at a time: is there data in [start, end)? */
class ExtentCursor {
  private readonly extents: AsyncGenerator<DataExtent>;
  /** The extent read last and not yet passed (it may reach into later windows). */
  private pending: DataExtent | undefined;
  private done = false;
  /** The extents overlapping the current window, and the first one not passed yet. */
  private inWindow: DataExtent[] = [];
  private at = 0;

  constructor(handle: FileHandleLike, size: number) {
    this.extents = dataExtents(handle, 0, size);
  }

  /** Loads the extents overlapping [start, end); windows come in order. */
  async cover(start: number, end: number): Promise<void> {
    this.inWindow = [];
    this.at = 0;
    for (let from = start; ; ) {
      if (this.pending === undefined || this.pending.end <= from) {
        if (this.done) return;
        const next = await this.extents.next();
        if (next.done) {
          this.done = true;
          this.pending = undefined;
          return;
        }
        this.pending = next.value;
        continue;
      }
      if (this.pending.start >= end) return;
      this.inWindow.push(this.pending);
      if (this.pending.end >= end) return;
      from = this.pending.end;
    }
  }

  /** True unless [start, end) (inside the covered window; calls in order) is all hole. */
  hasData(start: number, end: number): boolean {
    while (this.at < this.inWindow.length && this.inWindow[this.at]!.end <= start) this.at++;
    return this.at < this.inWindow.length && this.inWindow[this.at]!.start < end;
  }
}

interface Source {
  file: OpenedFile;
  extents: ExtentCursor;
  scratch: Buffer;
  window: Buffer;
  /** The handle has no blocking read: the window was read whole (asynchronously) before comparing. */
  prefilled: boolean;
}

export class BaseComparer {
  private readonly fresh: Source;
  private readonly olds: Source[];
  /** CHUNK_BYTES rounded up to whole pages. */
  readonly chunkBytes: number;
  private readonly zeros: Buffer;
  /** Where the last load put its bytes (fields rather than an object per chunk). */
  private loadedBuffer!: Buffer;
  private loadedAt = 0;

  /**
   * `windowBytes` a multiple of `pageBytes` (itself dividing CHUNK_BYTES, or a multiple of it);
   * `keepAll`: fill the window buffers everywhere (--sparse looks at every page the COW holds).
   */
  constructor(fresh: OpenedFile, olds: OpenedFile[], private readonly size: number, private readonly windowBytes: number, private readonly pageBytes: number, private readonly keepAll: boolean) {
    this.chunkBytes = Math.ceil(CHUNK_BYTES / pageBytes) * pageBytes;
    this.zeros = Buffer.alloc(this.chunkBytes);
    const source = (file: OpenedFile): Source => ({ file, extents: new ExtentCursor(file.handle, size), scratch: Buffer.allocUnsafeSlow(this.chunkBytes), window: Buffer.allocUnsafeSlow(windowBytes), prefilled: false });
    this.fresh = source(fresh);
    this.olds = olds.map(source);
  }

  /** Compares [start, start + windowBytes) (cut at the disk's end); windows come in order. */
  async compare(start: number): Promise<ComparedWindow> {
    const end = Math.min(this.size, start + this.windowBytes);
    for (const source of [this.fresh, ...this.olds]) {
      await source.extents.cover(start, end);
      // Handles without a blocking read (injected file systems) get the window in one read.
      source.prefilled = !source.file.handle.readSync;
      if (source.prefilled) {
        if (source.extents.hasData(start, end)) await readBase(source.file, source.window, 0, end - start, start);
        else source.window.fill(0, 0, end - start);
      }
    }
    // From here on everything is synchronous: no promise per chunk.
    const chunk = this.chunkBytes;
    const result: ComparedWindow = { start, end, fresh: this.fresh.window, old: new Map(this.olds.map((o) => [o.file, { data: o.window, differs: [] }])) };
    for (let at = start; at < end; at += chunk) {
      const to = Math.min(end, at + chunk);
      const length = to - at;
      const offset = at - start;
      const freshHasData = this.load(this.fresh, start, at, to);
      const freshBuffer = this.loadedBuffer;
      const freshAt = this.loadedAt;
      let anyDiffers = false;
      for (const old of this.olds) {
        const differs = result.old.get(old.file)!.differs;
        if (!freshHasData && !old.extents.hasData(at, to)) {
          // Hole against hole: equal, nothing read.
          if (this.keepAll) old.window.fill(0, offset, offset + length);
          continue;
        }
        this.load(old, start, at, to);
        const data = this.loadedBuffer;
        const dataAt = this.loadedAt;
        if (freshBuffer.compare(data, dataAt, dataAt + length, freshAt, freshAt + length) === 0) continue;
        for (let page = 0; page < length; page += this.pageBytes) {
          const pageEnd = Math.min(length, page + this.pageBytes);
          if (freshBuffer.compare(data, dataAt + page, dataAt + pageEnd, freshAt + page, freshAt + pageEnd) !== 0) differs.push(offset + page);
        }
        if (data !== old.window) data.copy(old.window, offset, dataAt, dataAt + length);
        anyDiffers = true;
      }
      if (anyDiffers && freshBuffer !== this.fresh.window) freshBuffer.copy(this.fresh.window, offset, freshAt, freshAt + length);
    }
    return result;
  }

  /**
   * The window at `start` from an answer found elsewhere (another thread's compare, with the same
   * chunks and pages): the differing page offsets per old base, and the bytes of the chunks
   * holding them, placed into the window buffers (not with keepAll, which needs every byte).
   */
  fromAnswer(answer: WindowAnswer): ComparedWindow {
    const { start, differs, chunks } = answer;
    const end = Math.min(this.size, start + this.windowBytes);
    for (const chunk of chunks) {
      this.fresh.window.set(chunk.fresh, chunk.at);
      for (const [index, bytes] of chunk.old.entries()) if (bytes) this.olds[index]!.window.set(bytes, chunk.at);
    }
    return { start, end, fresh: this.fresh.window, old: new Map(this.olds.map((o, i) => [o.file, { data: o.window, differs: differs[i]! }])) };
  }

  /**
   * Disk bytes [from, to) of one file (window at `windowStart`) into loadedBuffer at loadedAt: the
   * window buffer where it was read whole or with keepAll (zeros written there for a hole), else
   * the scratch buffer after a blocking read, or shared zeros for a hole. Returns whether the file
   * has data there.
   */
  private load(source: Source, windowStart: number, from: number, to: number): boolean {
    const length = to - from;
    const offset = from - windowStart;
    const hasData = source.extents.hasData(from, to);
    if (source.prefilled) {
      this.loadedBuffer = source.window;
      this.loadedAt = offset;
      return hasData;
    }
    if (!hasData && !this.keepAll) {
      this.loadedBuffer = this.zeros;
      this.loadedAt = 0;
      return false;
    }
    this.loadedBuffer = this.keepAll ? source.window : source.scratch;
    this.loadedAt = this.keepAll ? offset : 0;
    if (!hasData) {
      source.window.fill(0, offset, offset + length);
      return false;
    }
    const { handle, path } = source.file;
    readExactlySync(handle as Required<Pick<FileHandleLike, 'readSync'>>, path, 'read', { buffer: this.loadedBuffer, offset: this.loadedAt, length, position: from }, (got) => fileEndsEarly(path, from, got, to, 'the backing file'));
    return true;
  }
}
