import type { BitmapView, LazyBitmap } from './bitmap-cache.js';
import type { FileHandleLike } from '../file/index.js';

/** One request to record sectors [sectorStart, sectorEnd) as living in the COW file. */
interface BitmapUpdate {
  sectorStart: number;
  sectorEnd: number;
  byteStart: number;
  byteEnd: number;
  /** The caller's view of the sectors, pinned until the update settles. */
  view: BitmapView;
  done: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** A bitmap slice write on disk, carrying one or more coalesced updates. */
interface SliceWrite {
  byteStart: number;
  byteEnd: number;
  updates: BitmapUpdate[];
}

export interface BitmapWriterOptions {
  bitmap: LazyBitmap;
  file: FileHandleLike;
  bitmapOffset: number;
  /** Called after a slice is written and before its updates resolve (fdatasync in sync mode). */
  afterSliceWrite?: () => Promise<void>;
}

/**
 * The largest slice written with a blocking pwrite on the calling thread. A slice is a few bytes
 * of a bitmap page the engine has just read or written, so the page is in the page cache and the
 * call copies bytes: a few microseconds, against a thread-pool round trip of tens (the engine's
 * second per write; docs/engine.md). Files without writeSync (the in-memory test file system) use
 * the async write.
 */
const BLOCKING_SLICE_MAX = 4096;

/** The widest slice write that coalescing builds from updates that do not touch (a page of bitmap). */
const COALESCE_MAX = BLOCKING_SLICE_MAX;

function overlaps(aStart: number, aEnd: number, bStart: number, bEnd: number): boolean {
  return aStart < bEnd && bStart < aEnd;
}

/**
 * Writes bitmap slices in place from the live bitmap, the way the UML driver's COW path was
 * designed: a slice write overlapping one in flight (pending) waits (waiting list) and starts when
 * it completes. Bits are set in memory only just before their slice is written, and never while an
 * overlapping slice is in flight, so the bytes being written are never modified under the write.
 * The bitmap is a LazyBitmap: each caller pins the slices of its sectors (a view) until its update
 * settles, so every byte a write covers is in memory; a written slice is marked clean, and can be
 * evicted once no caller pins it (then memory and file agree, as no write to it is in flight).
 */
export class BitmapWriter {
  private readonly pending = new Set<SliceWrite>();
  private readonly waiting: BitmapUpdate[] = [];

  constructor(private readonly options: BitmapWriterOptions) {}

  /**
   * Records [sectorStart, sectorEnd) as allocated on disk. Call only after the sectors' data is
   * written, holding `view` (acquired over [sectorStart, sectorEnd)) until this resolves or
   * rejects. Resolves once the bitmap slice holding their bits is written.
   */
  async commit(sectorStart: number, sectorEnd: number, view: BitmapView): Promise<void> {
    // Bits already set need no write, but they may belong to a slice still in flight.
    while (view.allSet(sectorStart, sectorEnd)) {
      const inFlight = this.pendingUpdatesOverlapping(sectorStart, sectorEnd);
      if (inFlight.length === 0) return;
      await Promise.allSettled(inFlight.map((update) => update.done));
    }
    let resolve!: () => void;
    let reject!: (err: unknown) => void;
    const done = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const update: BitmapUpdate = {
      sectorStart,
      sectorEnd,
      byteStart: Math.floor(sectorStart / 8),
      byteEnd: Math.ceil(sectorEnd / 8),
      view,
      done,
      resolve,
      reject,
    };
    this.waiting.push(update);
    this.schedulePump();
    return done;
  }

  /**
   * Starts the waiting updates once this turn of the event loop is over, so the updates of every
   * write that finished its data in the turn (an NBD server handles a whole socket read of
   * requests in one) share slice writes: one pwrite per bitmap stretch instead of one per write.
   */
  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pumpScheduled = false;

  /**
   * Updates (waiting or in flight) whose sectors overlap [sectorStart, sectorEnd): a read of those
   * sectors that finds a clear bit must wait for them, or it could miss data already written.
   */
  updatesOverlapping(sectorStart: number, sectorEnd: number): Promise<void>[] {
    const found: Promise<void>[] = [];
    for (const update of this.waiting) {
      if (overlaps(update.sectorStart, update.sectorEnd, sectorStart, sectorEnd)) found.push(update.done);
    }
    for (const update of this.pendingUpdatesOverlapping(sectorStart, sectorEnd)) found.push(update.done);
    return found;
  }

  private pendingUpdatesOverlapping(sectorStart: number, sectorEnd: number): BitmapUpdate[] {
    const found: BitmapUpdate[] = [];
    for (const slice of this.pending) {
      for (const update of slice.updates) {
        if (overlaps(update.sectorStart, update.sectorEnd, sectorStart, sectorEnd)) found.push(update);
      }
    }
    return found;
  }

  private overlapsPending(byteStart: number, byteEnd: number): boolean {
    for (const slice of this.pending) {
      if (overlaps(slice.byteStart, slice.byteEnd, byteStart, byteEnd)) return true;
    }
    return false;
  }

  /** Starts every waiting update that overlaps nothing in flight; at least one starts when any can. */
  private pump(): void {
    let index = 0;
    while (index < this.waiting.length) {
      const first = this.waiting[index];
      if (this.overlapsPending(first.byteStart, first.byteEnd)) {
        index++;
        continue;
      }
      this.start(this.takeCoalesced(index));
    }
  }

  /**
   * Removes the update at `index` from the waiting list together with the waiting updates that can
   * share its write: those whose bytes lie in the same bitmap slice of the LazyBitmap (pinned by
   * the first update's view, so every byte between is in memory) within COALESCE_MAX bytes, and
   * where the combined range overlaps nothing in flight. The bytes between them are written too,
   * unchanged: a bit is set in memory only after its data is written and is on disk once its own
   * slice write completed, and no write in flight covers them, so memory holds what the file does.
   */
  private takeCoalesced(index: number): SliceWrite {
    const [first] = this.waiting.splice(index, 1);
    const slice: SliceWrite = { byteStart: first.byteStart, byteEnd: first.byteEnd, updates: [first] };
    const { sliceBytes } = this.options.bitmap;
    const sliceIndex = Math.floor(first.byteStart / sliceBytes);
    const sameSlice = (start: number, end: number) => Math.floor(start / sliceBytes) === sliceIndex && Math.floor((end - 1) / sliceBytes) === sliceIndex;
    let grew = true;
    while (grew) {
      grew = false;
      for (let i = index; i < this.waiting.length; i++) {
        const candidate = this.waiting[i];
        const start = Math.min(slice.byteStart, candidate.byteStart);
        const end = Math.max(slice.byteEnd, candidate.byteEnd);
        const touches = candidate.byteStart <= slice.byteEnd && slice.byteStart <= candidate.byteEnd;
        const near = sameSlice(start, end) && end - start <= COALESCE_MAX;
        if (!(touches || near) || this.overlapsPending(start, end)) continue;
        this.waiting.splice(i, 1);
        slice.updates.push(candidate);
        slice.byteStart = Math.min(slice.byteStart, candidate.byteStart);
        slice.byteEnd = Math.max(slice.byteEnd, candidate.byteEnd);
        grew = true;
        break;
      }
    }
    return slice;
  }

  private start(slice: SliceWrite): void {
    const { bitmap, file, bitmapOffset, afterSliceWrite } = this.options;
    // Kept to undo only this slice's bits if its write fails.
    const before = bitmap.copyBytes(slice.byteStart, slice.byteEnd);
    for (const update of slice.updates) update.view.setRange(update.sectorStart, update.sectorEnd);
    this.pending.add(slice);
    // A copy: bits set later (by writes not overlapping this one) never change it mid-write.
    const bytes = bitmap.copyBytes(slice.byteStart, slice.byteEnd);
    const written = this.writeSlice(file, bytes, bitmapOffset + slice.byteStart).then(() => afterSliceWrite?.());
    written.then(
      () => {
        for (const update of slice.updates) bitmap.markWritten(update.sectorStart, update.sectorEnd);
        this.finish(slice, undefined);
      },
      (err: unknown) => {
        this.undo(slice, before);
        this.finish(slice, err);
      },
    );
  }

  private writeSlice(file: FileHandleLike, bytes: Uint8Array, position: number): Promise<void> {
    if (!file.writeSync || bytes.length > BLOCKING_SLICE_MAX) return file.write(bytes, 0, bytes.length, position);
    try {
      file.writeSync(bytes, 0, bytes.length, position);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** Clears the bits this slice set, leaving bits that were set before it. */
  private undo(slice: SliceWrite, before: Uint8Array): void {
    for (const update of slice.updates) {
      for (let sector = update.sectorStart; sector < update.sectorEnd; sector++) {
        const byte = Math.floor(sector / 8) - slice.byteStart;
        if ((before[byte] & (1 << (sector & 7))) === 0) update.view.set(sector, false);
      }
    }
  }

  private finish(slice: SliceWrite, err: unknown): void {
    this.pending.delete(slice);
    for (const update of slice.updates) {
      if (err === undefined) update.resolve();
      else update.reject(err);
    }
    this.pump();
  }
}
