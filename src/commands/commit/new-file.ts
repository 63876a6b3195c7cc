import { UbdcowError, fileEndsEarly, fromSystemError } from '../../errors.js';
import { type WindowRuns, allocatedExtents, allocatedWindows, extentBytes } from '../../io/bitmap/index.js';
import {
  cloneFile,
  copyRange,
  dataExtents,
  existsError,
  fileIdentityOrUndefined,
  type FileHandleLike,
  type FileSystem,
  ImageWriter,
  readExactly,
  syncRange,
  writeAll,
  writeAllSync,
  writeNewFile,
} from '../../io/file/index.js';
import {
  checkBacking,
  type CowImage,
  openBacking,
  type OpenedFile,
  withImage,
} from '../../io/image/index.js';
import { interruptedCommitError, readCommitJournal } from '../../io/journal/index.js';
import { type CommitOptions, HOLE_BLOCK_BYTES, type NewFileCommitResult, judgeBacking, readCowRun, readCowRunSync, roundChunk, summarizeAllocation } from './shared.js';
import { isAllZeroAt } from '../../format/zero-bytes.js';

/*
 * Commit to a new image file (what `uml_moo COW OUT` makes): the merged disk is assembled a window
 * at a time from the backing file and the COW's allocated runs, all-zero blocks are left as holes,
 * and the file appears atomically (writeNewFile). Neither the COW nor the backing file is written.
 *
 * The write path follows the shape of the data: long runs (a dense image) go direct (O_DIRECT,
 * see ImageWriter), short scattered runs (a COW's 4 KiB blocks over a sparse backing) go through
 * the page cache with blocking pwrites, writeback started window by window (sync_file_range) and
 * one fsync at the end: direct 4 KiB writes each wait for the disk (~77 us), buffered ones do not.
 * Holes of the backing file are skipped (SEEK_DATA) rather than read as zeros.
 */

/** Refuses to write the merged image over the COW file it is made from; true when `output` exists. */
async function refuseOutputOverCow(fs: FileSystem, cowPath: string, output: string): Promise<boolean> {
  // By identity, as the kernel tells files apart: a hard link to the COW is the COW.
  const [cow, existing] = await Promise.all([fileIdentityOrUndefined(fs, cowPath), fileIdentityOrUndefined(fs, output)]);
  if (existing !== undefined && existing === cow) {
    throw new UbdcowError('output-is-cow', `${output}: is the COW file itself; write the merged image to another file`, { file: output });
  }
  return existing !== undefined;
}

export async function commitToNewFile(cowPath: string, output: string, options: CommitOptions & { fs: FileSystem }): Promise<NewFileCommitResult> {
  const started = Date.now();
  const { fs } = options;
  const force = options.force ?? false;
  const chunkBytes = roundChunk(options.chunkBytes);
  const outputExists = await refuseOutputOverCow(fs, cowPath, output);
  if (outputExists && !force) {
    throw existsError(output);
  }
  // A read lock suffices: it conflicts with the write lock a running UML holds or would take.
  return withImage(cowPath, { fs, mode: 'r', lock: 'read' }, async (image) => {
    if (await readCommitJournal(fs, cowPath)) throw interruptedCommitError(cowPath);
    const report = await checkBacking(image.header, options.backing, fs);
    const overridden = judgeBacking(cowPath, report, force);
    const summary = await summarizeAllocation(image);
    const backing = await openBacking(fs, report.path, 'r');
    let writtenBytes = 0;
    try {
      await writeNewFile(fs, output, force, async (out, temporaryPath) => {
        const reflinked = await writeByReflink(image, backing, out, output);
        if (reflinked !== undefined) {
          writtenBytes = reflinked;
          options.onProgress?.(image.header.size, image.header.size);
          return;
        }
        const writer = await ImageWriter.open(fs, out, temporaryPath);
        try {
          writtenBytes = await writeMergedImage(image, backing, { file: out, writer, path: output }, chunkBytes, options.onProgress);
        } finally {
          await writer.close();
        }
      });
    } finally {
      await backing.handle.close().catch(() => undefined);
    }
    return {
      mode: 'new-file',
      cow: cowPath,
      output,
      backing: report.path,
      size: image.header.size,
      allocatedBytes: summary.allocatedBytes,
      extents: summary.extents,
      writtenBytes,
      emptied: false,
      resumed: false,
      overridden,
      durationMs: Date.now() - started,
      warnings: [...image.warnings],
    };
  });
}

/**
 * Where the output's file system shares extents (XFS reflink=1, btrfs): the new file becomes a
 * clone of the backing file (FICLONE, no new space), then the COW's allocated extents, adjacent
 * ones coalesced, are cloned over it where block-aligned (FICLONERANGE) or copied. The bytes are
 * the same as the windowed merge writes. Undefined when the clone is not possible here (the
 * caller then merges window by window; nothing was written). Returns the bytes moved.
 */
async function writeByReflink(image: CowImage, backing: OpenedFile, out: FileHandleLike, outputPath: string): Promise<number | undefined> {
  const { size } = image.header;
  // A shorter backing (only with --force) would need zeros past its end: leave that to the merge.
  if (backing.size < size) return undefined;
  const outcome = await cloneFile(out, backing.handle);
  if (!outcome.cloned) return undefined;
  const blockSize = Math.max(4096, (await out.stat().catch(() => undefined))?.blockSize ?? 4096);
  let moved = 0;
  try {
    for await (const extent of allocatedExtents(image)) {
      const bytes = extentBytes(extent, image);
      const report = await copyRange(out, image.handle, { sourceOffset: image.geometry.dataOffset + bytes.start, length: bytes.end - bytes.start, targetOffset: bytes.start }, { blockSize });
      moved += report.cloned + report.copiedInKernel + report.copied;
    }
    // The clone has the backing's length; the disk may be shorter (a backing larger than the disk).
    await out.truncate(size);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESHORT') throw fileEndsEarly(image.path, image.geometry.dataOffset, 0, image.geometry.dataOffset + size, 'the data area');
    throw fromSystemError(err, outputPath, 'write');
  }
  return moved;
}

/**
 * A separate read costs about as much as copying this many bytes of holes (a thread-pool round
 * trip against memcpy of zero pages), so a span reads run by run only when its runs are fewer.
 */
const BYTES_PER_SEPARATE_READ = 256 * 1024;
/**
 * A blocking pread of page-cached data costs about as much as copying this many bytes (measured:
 * a 512 MiB commit with 8 % of 4 KiB blocks rewritten merged in 0.14-0.19 s with a pread per run
 * against 0.21-0.23 s with a 4 MiB read per window; cold cache, the same 0.35 s either way).
 */
const BYTES_PER_BLOCKING_READ = 16 * 1024;
/** Runs read with blocking preads average at most this (longer ones go to the thread pool). */
const MAX_BLOCKING_RUN_BYTES = 64 * 1024;
const WINDOWS_IN_FLIGHT = 3;
/** Runs at least this long go direct; shorter ones through the page cache. */
const DIRECT_RUN_BYTES = 256 * 1024;
/** Buffered bytes after which write-back of them is started, so the final fsync has little left. */
const WRITEBACK_START_BYTES = 8 << 20;

/** The new image being written: its descriptor, the writer in front of it, the name to report. */
interface MergedImageOutput {
  file: FileHandleLike;
  writer: ImageWriter;
  path: string;
}

/**
 * Assembles the merged disk a window at a time (the backing's bytes, then the COW's allocated
 * runs over them) and writes only the blocks that are not all zeros, so zero regions stay holes.
 * Returns the bytes written.
 */
async function writeMergedImage(
  image: CowImage,
  backing: OpenedFile,
  output: MergedImageOutput,
  windowBytes: number,
  onProgress: CommitOptions['onProgress'],
): Promise<number> {
  const { size } = image.header;
  const windows = allocatedWindows(image, windowBytes);
  let next = await windows.next();
  let written = 0;
  let done = 0;
  onProgress?.(0, size);
  // A few windows in flight keep the disk and the thread pool busy; each has its own buffers.
  const idle = Array.from({ length: WINDOWS_IN_FLIGHT }, () => ({ window: output.writer.allocate(windowBytes), cowData: new Uint8Array(windowBytes) }));
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  let backgroundSync: Promise<void> | undefined;
  let buffered = 0;
  for (let windowStart = 0; windowStart < size && failure === undefined; windowStart += windowBytes) {
    const length = Math.min(windowBytes, size - windowStart);
    let runs: WindowRuns['runs'] = [];
    if (!next.done && next.value.start === windowStart) {
      runs = next.value.runs;
      next = await windows.next();
    }
    while (idle.length === 0) await Promise.race(inFlight);
    const buffers = idle.pop()!;
    const task = mergeWindow(image, backing, output, buffers, windowStart, length, runs).then(
      (bytes) => {
        written += bytes.total;
        buffered += bytes.buffered;
        done += length;
        onProgress?.(done, size);
        if (buffered >= WRITEBACK_START_BYTES && backgroundSync === undefined) {
          // Start write-back of what is in the page cache while the copy goes on (no wait).
          buffered = 0;
          backgroundSync = syncRange(output.file, 0, 0).then(
            () => undefined,
            () => undefined,
          ).finally(() => (backgroundSync = undefined));
        }
      },
      (err: unknown) => {
        failure ??= err;
      },
    );
    const tracked = task.finally(() => {
      inFlight.delete(tracked);
      idle.push(buffers);
    });
    inFlight.add(tracked);
  }
  await Promise.all(inFlight);
  await backgroundSync?.catch(() => undefined);
  if (failure !== undefined) throw failure;
  try {
    await output.file.truncate(size);
  } catch (err) {
    throw fromSystemError(err, output.path, 'set the length of');
  }
  return written;
}

/**
 * One window of the merged disk: the backing's bytes, the COW's runs over them, non-zero blocks
 * out. Only the parts that can hold data (the backing's data extents and the COW's runs, widened
 * to whole hole blocks) are filled, read and scanned; the rest is zeros by construction and stays
 * a hole untouched, so a sparse backing costs what its data and the COW's runs cost.
 */
async function mergeWindow(
  image: CowImage,
  backing: OpenedFile,
  output: MergedImageOutput,
  buffers: { window: Uint8Array; cowData: Uint8Array },
  windowStart: number,
  length: number,
  runs: WindowRuns['runs'],
): Promise<WrittenBytes> {
  const { window, cowData } = buffers;
  // A shorter backing file (only with --force) reads as zeros past its end; short of that is truncation.
  const fromBacking = Math.max(0, Math.min(length, backing.size - windowStart));
  const backingData: Span[] = [];
  for await (const extent of dataExtents(backing.handle, windowStart, windowStart + fromBacking)) {
    backingData.push({ start: extent.start - windowStart, end: extent.end - windowStart });
  }
  const cowRuns = runs.map((run) => ({ start: run.start - windowStart, end: run.end - windowStart }));
  const live = liveSpans(backingData, cowRuns, length);
  // Zeros where a live span is not backing data (holes under the COW's runs, block edges).
  let extent = 0;
  for (const span of live) {
    let at = span.start;
    while (extent < backingData.length && backingData[extent].end <= at) extent++;
    for (let e = extent; e < backingData.length && backingData[e].start < span.end; e++) {
      if (backingData[e].start > at) window.fill(0, at, backingData[e].start);
      at = Math.max(at, backingData[e].end);
    }
    if (at < span.end) window.fill(0, at, span.end);
  }
  for (const data of backingData) {
    const target = { buffer: window, offset: data.start, length: data.end - data.start, position: windowStart + data.start };
    await readExactly(backing.handle, backing.path, 'read', target, (got) =>
      fileEndsEarly(backing.path, target.position, got, target.position + target.length, 'the backing file'),
    );
  }
  if (runs.length > 0) {
    const spanStart = runs[0].start;
    const spanEnd = runs[runs.length - 1].end;
    const runBytes = runs.reduce((sum, run) => sum + run.end - run.start, 0);
    const holeBytes = spanEnd - spanStart - runBytes;
    if (image.handle.readSync && runBytes <= runs.length * MAX_BLOCKING_RUN_BYTES && holeBytes > runs.length * BYTES_PER_BLOCKING_READ) {
      // Small scattered runs (a guest's 4 KiB writes): a blocking pread each, straight into place,
      // costs less than one read of the span that copies all its holes as zero pages.
      const cow = image.handle as Required<Pick<FileHandleLike, 'readSync'>>;
      for (const run of runs) readCowRunSync(image, cow, window, run.start - windowStart, run.start, run.end);
    } else if (runs.length * BYTES_PER_SEPARATE_READ < spanEnd - spanStart) {
      // Few runs in a wide span: read each straight into place rather than the span's holes.
      await Promise.all(runs.map((run) => readCowRun(image, window, run.start - windowStart, run.start, run.end)));
    } else {
      await readCowRun(image, cowData, 0, spanStart, spanEnd);
      for (const run of runs) window.set(cowData.subarray(run.start - spanStart, run.end - spanStart), run.start - windowStart);
    }
  }
  const written: WrittenBytes = { total: 0, buffered: 0 };
  const pending: Span[] = [];
  for (const span of live) writeNonZeroBlocks(output, window, span, windowStart, written, pending);
  for (const run of pending) {
    const target = { buffer: window, offset: run.start, length: run.end - run.start, position: windowStart + run.start };
    if (target.length >= DIRECT_RUN_BYTES) {
      await writeAll(output.writer, output.path, 'write', target);
    } else {
      await writeAll(output.file, output.path, 'write', target);
      written.buffered += target.length;
    }
    written.total += target.length;
  }
  return written;
}

/** A byte range [start, end) of a window. */
interface Span {
  start: number;
  end: number;
}

/**
 * The union of two sorted lists of spans, each widened to whole HOLE_BLOCK_BYTES blocks (window
 * starts are block-aligned) and clipped to `length`, merged where they touch. A merge of the two
 * lists in one pass (not a sort of both: the copy calls this for every window while its code is
 * still cold, where ~80 comparator calls a window added up to ~15 ms).
 */
export function liveSpans(a: Span[], b: Span[], length: number): Span[] {
  const out: Span[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    const span = j >= b.length || (i < a.length && a[i].start <= b[j].start) ? a[i++] : b[j++];
    const start = Math.floor(span.start / HOLE_BLOCK_BYTES) * HOLE_BLOCK_BYTES;
    const end = Math.min(length, Math.ceil(span.end / HOLE_BLOCK_BYTES) * HOLE_BLOCK_BYTES);
    if (end <= start) continue;
    const last = out[out.length - 1];
    if (last !== undefined && start <= last.end) {
      if (end > last.end) last.end = end;
    } else {
      out.push({ start, end });
    }
  }
  return out;
}

interface WrittenBytes {
  total: number;
  /** Of which through the page cache. */
  buffered: number;
}

/**
 * Writes the non-zero blocks of window[span] (file offset windowStart + index), coalescing
 * neighbours: runs of DIRECT_RUN_BYTES or more through the writer (direct), shorter ones buffered,
 * with blocking writes where the handle has them (thousands of 4 KiB pwrites into the page cache
 * cost less than their thread-pool round trips). The blocking writes are made here, with no
 * promise or view per span or block (a scattered COW has ~10,000 of each: they were most of the
 * commit's garbage); runs to write asynchronously are added to `pending` for the caller.
 */
function writeNonZeroBlocks(output: MergedImageOutput, window: Uint8Array, span: Span, windowStart: number, written: WrittenBytes, pending: Span[]): void {
  let runStart = -1;
  for (let block = span.start; block < span.end; block += HOLE_BLOCK_BYTES) {
    if (!isAllZeroAt(window, block, Math.min(block + HOLE_BLOCK_BYTES, span.end))) {
      if (runStart < 0) runStart = block;
    } else if (runStart >= 0) {
      writeRun(output, window, runStart, block, windowStart, written, pending);
      runStart = -1;
    }
  }
  if (runStart >= 0) writeRun(output, window, runStart, span.end, windowStart, written, pending);
}

/** One run of non-zero blocks, window[start, end): written now when short and blocking writes are possible. */
function writeRun(output: MergedImageOutput, window: Uint8Array, start: number, end: number, windowStart: number, written: WrittenBytes, pending: Span[]): void {
  const file = output.file;
  const length = end - start;
  if (length >= DIRECT_RUN_BYTES || !file.writeSync) {
    pending.push({ start, end });
    return;
  }
  writeAllSync(file as Required<Pick<FileHandleLike, 'writeSync'>>, output.path, 'write', { buffer: window, offset: start, length, position: windowStart + start });
  written.buffered += length;
  written.total += length;
}
