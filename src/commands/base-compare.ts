import { fileEndsEarly } from '../errors.js';
import type { OpenedFile } from '../io/backing.js';
import { type DataExtent, dataExtents } from '../io/extents.js';
import { type FileHandleLike, readExactlySync } from '../io/file.js';
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

/** Walks a file's data extents front to back: is there data in [start, end)? */
class ExtentCursor {
  private readonly extents: AsyncGenerator<DataExtent>;
  private current: DataExtent | undefined;
  private done = false;

  constructor(handle: FileHandleLike, size: number) {
    this.extents = dataExtents(handle, 0, size);
  }

  /** True unless [start, end) is all hole. Calls come with non-decreasing `start`. */
  async hasData(start: number, end: number): Promise<boolean> {
    while (!this.done && (this.current === undefined || this.current.end <= start)) {
      const next = await this.extents.next();
      if (next.done) this.done = true;
      else this.current = next.value;
    }
    return this.current !== undefined && this.current.end > start && this.current.start < end;
  }
}

interface Source {
  file: OpenedFile;
  extents: ExtentCursor;
  scratch: Buffer;
  window: Buffer;
}

export class BaseComparer {
  private readonly fresh: Source;
  private readonly olds: Source[];
  /** CHUNK_BYTES rounded up to whole pages. */
  readonly chunkBytes: number;
  private readonly zeros: Buffer;

  /**
   * `windowBytes` a multiple of `pageBytes` (itself dividing CHUNK_BYTES, or a multiple of it);
   * `keepAll`: fill the window buffers everywhere (--sparse looks at every page the COW holds).
   */
  constructor(fresh: OpenedFile, olds: OpenedFile[], private readonly size: number, private readonly windowBytes: number, private readonly pageBytes: number, private readonly keepAll: boolean) {
    this.chunkBytes = Math.ceil(CHUNK_BYTES / pageBytes) * pageBytes;
    this.zeros = Buffer.alloc(this.chunkBytes);
    const source = (file: OpenedFile): Source => ({ file, extents: new ExtentCursor(file.handle, size), scratch: Buffer.allocUnsafeSlow(this.chunkBytes), window: Buffer.allocUnsafeSlow(windowBytes) });
    this.fresh = source(fresh);
    this.olds = olds.map(source);
  }

  /** Compares [start, start + windowBytes) (cut at the disk's end); windows come in order. */
  async compare(start: number): Promise<ComparedWindow> {
    const end = Math.min(this.size, start + this.windowBytes);
    const chunk = this.chunkBytes;
    const result: ComparedWindow = { start, end, fresh: this.fresh.window, old: new Map(this.olds.map((o) => [o.file, { data: o.window, differs: [] }])) };
    for (let at = start; at < end; at += chunk) {
      const to = Math.min(end, at + chunk);
      const length = to - at;
      const offset = at - start;
      const fresh = await this.load(this.fresh, at, to, this.keepAll);
      let anyDiffers = false;
      for (const old of this.olds) {
        const differs = result.old.get(old.file)!.differs;
        if (!fresh.hasData && !(await old.extents.hasData(at, to))) {
          // Hole against hole: equal, nothing read.
          if (this.keepAll) old.window.fill(0, offset, offset + length);
          continue;
        }
        const data = await this.load(old, at, to, this.keepAll);
        if (fresh.buffer.compare(data.buffer, data.at, data.at + length, fresh.at, fresh.at + length) === 0) continue;
        for (let page = 0; page < length; page += this.pageBytes) {
          const pageEnd = Math.min(length, page + this.pageBytes);
          if (fresh.buffer.compare(data.buffer, data.at + page, data.at + pageEnd, fresh.at + page, fresh.at + pageEnd) !== 0) differs.push(offset + page);
        }
        if (!this.keepAll) data.buffer.copy(old.window, offset, data.at, data.at + length);
        anyDiffers = true;
      }
      if (anyDiffers && !this.keepAll) fresh.buffer.copy(this.fresh.window, offset, fresh.at, fresh.at + length);
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
   * [from, to) of one file, as a buffer and offset: the scratch buffer (or, `intoWindow`, the
   * window buffer) after a read, or zeros for a hole (zeros written into the window `intoWindow`).
   * Calls for one file come in order.
   */
  private async load(source: Source, from: number, to: number, intoWindow: boolean): Promise<{ buffer: Buffer; at: number; hasData: boolean }> {
    const length = to - from;
    const windowOffset = from % this.windowBytes;
    const hasData = await source.extents.hasData(from, to);
    if (!hasData) {
      if (!intoWindow) return { buffer: this.zeros, at: 0, hasData };
      source.window.fill(0, windowOffset, windowOffset + length);
      return { buffer: source.window, at: windowOffset, hasData };
    }
    const buffer = intoWindow ? source.window : source.scratch;
    const at = intoWindow ? windowOffset : 0;
    const { handle, path } = source.file;
    if (handle.readSync) {
      readExactlySync(handle as Required<Pick<FileHandleLike, 'readSync'>>, path, 'read', { buffer, offset: at, length, position: from }, (got) => fileEndsEarly(path, from, got, to, 'the backing file'));
    } else {
      await readBase(source.file, buffer, at, length, from);
    }
    return { buffer, at, hasData };
  }
}
