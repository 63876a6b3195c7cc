import * as path from 'node:path';
import { CowFormatError, UbdcowError, fromSystemError } from '../errors.js';
import { existsError, writeNewFile } from '../io/atomic.js';
import { type FileHandleLike, type FileSystem, nodeFileSystem, readExactly } from '../io/file.js';
import { ImageWriter } from '../io/image-writer.js';
import { type BackingReport, type CowImage, type SectorExtent, allocatedExtents, checkBacking, openImage, openImageFile, statImageFile } from '../io/image.js';
import { lockCowFile } from '../io/lock.js';
import { clearNonZeroBytes } from '../io/bitmap-clear.js';
import { findSiblingCows } from './siblings.js';
import { rewriteHeader } from './rebase.js';

/*
 * Crash safety of the in-place commit
 * -----------------------------------
 * The merge writes the COW's allocated sectors into the backing file, which changes the backing
 * file's mtime. From then on the COW header no longer matches its backing file, and a plain re-run
 * after a crash would be refused ("mtime mismatch") although finishing the merge is exactly right:
 * copying the same sectors again is idempotent as long as the COW still holds them.
 *
 * So before the backing file is touched, a small journal `COW.ubdcow-commit` is written (atomically,
 * synced) recording the backing path, the header's size and the header's ORIGINAL mtime. The steps:
 *   1. lock the COW; check the backing (size, mtime) against the header;
 *   2. write the journal;
 *   3. copy the allocated sectors into the backing; fsync the backing;
 *   4. (unless --keep) zero the bitmap and rewrite the header with the backing's new mtime; fsync;
 *   5. (unless --keep) drop the data area (truncate to data_offset and back); fsync;
 *   6. remove the journal.
 * A re-run that finds the journal, and finds the header still recording the journal's backing path,
 * size and original mtime, accepts the changed backing mtime and completes the merge. The bitmap is
 * durably cleared (4) before any COW data is dropped (5), so at no point can a re-run see a set bit
 * whose data is gone. A stale journal whose record does not match the header is ignored.
 */

/** Copies work in runs of this many bytes: big enough to stream, small enough to keep memory flat. */
export const COMMIT_CHUNK_BYTES = 4 << 20;
/** Zero runs at least this long, on this alignment, are left as holes in a new image. */
const HOLE_BLOCK_BYTES = 4096;

export interface CommitOptions {
  /** Write the merged image to this new file instead of merging into the backing file. */
  output?: string;
  /** Use this backing file instead of the one the header names (uml_moo -b). */
  backing?: string;
  /** In-place only: leave the COW file as it is after merging (what uml_moo -d does). */
  keep?: boolean;
  /** Commit although the backing file's size or mtime do not match; replace an existing output. */
  force?: boolean;
  /**
   * In place: folders to search for other COW files over the same backing file (always searched:
   * the COW's folder and the folders of the backing's path and real path; files are matched by
   * device and inode). Finding any refuses the commit unless forced.
   */
  checkSiblings?: string[];
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  fs?: FileSystem;
  /** Copy buffer size (tests make it small to exercise the run splitting). */
  chunkBytes?: number;
}

export interface CommitResult {
  mode: 'new-file' | 'in-place';
  cow: string;
  /** Where the merged image now is: the new file, or the backing file for in-place. */
  output: string;
  /** The backing file read (and, in place, written). */
  backing: string;
  /** Virtual disk size in bytes. */
  size: number;
  /** Bytes taken from the COW's data area. */
  allocatedBytes: number;
  extents: number;
  /** Bytes written to the output (a new image leaves all-zero blocks as holes). */
  writtenBytes: number;
  /** The COW file was emptied and re-pointed at the merged backing file. */
  emptied: boolean;
  /** An interrupted in-place commit was found (its journal) and completed. */
  resumed: boolean;
  /** Backing file checks that --force overrode. */
  overridden: string[];
  durationMs: number;
  warnings: string[];
}

/** What the journal records: enough to recognise "this COW, this backing, before the merge". */
export interface CommitJournal {
  format: 'ubdcow-commit-journal';
  version: 1;
  backing: string;
  size: number;
  /** The header's mtime before the merge changed the backing file. */
  mtime: number;
  started: string;
}

export function commitJournalPath(cowPath: string): string {
  return `${cowPath}.ubdcow-commit`;
}

/** What to tell the user when the journal of an interrupted in-place commit of `cowPath` is there. */
export function interruptedCommitMessage(cowPath: string, suffix = ''): string {
  return `${cowPath}: an in-place commit was interrupted (${commitJournalPath(cowPath)} exists); run \`ubdcow commit ${cowPath}\` again to finish it${suffix}`;
}

/** The journal of an interrupted in-place commit of `cowPath`, if there is one. */
export async function readCommitJournal(fs: FileSystem, cowPath: string): Promise<CommitJournal | undefined> {
  const journalPath = commitJournalPath(cowPath);
  let file: FileHandleLike;
  try {
    file = await fs.open(journalPath, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromSystemError(err, journalPath, 'read commit journal');
  }
  let text: string;
  try {
    const { size } = await file.stat();
    const bytes = new Uint8Array(Math.min(size, 1 << 16));
    const got = await file.read(bytes, 0, bytes.length, 0);
    text = Buffer.from(bytes.subarray(0, got)).toString('utf8');
  } catch (err) {
    throw fromSystemError(err, journalPath, 'read commit journal');
  } finally {
    await file.close().catch(() => undefined);
  }
  let journal: CommitJournal;
  try {
    journal = JSON.parse(text) as CommitJournal;
  } catch {
    throw new UbdcowError('bad-journal', `${journalPath}: not a ubdcow commit journal (invalid JSON); remove it if no commit was running`, {
      file: journalPath,
    });
  }
  if (journal?.format !== 'ubdcow-commit-journal' || typeof journal.backing !== 'string' || typeof journal.mtime !== 'number') {
    throw new UbdcowError('bad-journal', `${journalPath}: not a ubdcow commit journal (format field missing); remove it if no commit was running`, {
      file: journalPath,
    });
  }
  return journal;
}

async function writeCommitJournal(fs: FileSystem, cowPath: string, journal: CommitJournal): Promise<void> {
  const bytes = Buffer.from(`${JSON.stringify(journal, null, 2)}\n`);
  await writeNewFile(fs, commitJournalPath(cowPath), true, (file) => file.write(bytes, 0, bytes.length, 0));
}

async function removeCommitJournal(fs: FileSystem, cowPath: string): Promise<void> {
  const journalPath = commitJournalPath(cowPath);
  try {
    await fs.unlink(journalPath);
    await fs.syncDirectory(path.dirname(journalPath));
  } catch (err) {
    throw fromSystemError(err, journalPath, 'remove commit journal');
  }
}

/** True when the journal describes the state this COW's header still records. */
function journalMatches(journal: CommitJournal | undefined, image: CowImage, backing: BackingReport): boolean {
  return (
    journal !== undefined &&
    journal.backing === backing.path &&
    journal.size === image.header.size &&
    journal.mtime === image.header.mtime
  );
}

interface AllocationSummary {
  extents: number;
  allocatedBytes: number;
  /** Where in the COW file the last allocated sector's data ends. */
  dataEnd: number;
}

function extentBytes(extent: SectorExtent, image: CowImage): { start: number; end: number } {
  const { sectorSize, size } = image.header;
  return { start: extent.start * sectorSize, end: Math.min(extent.end * sectorSize, size) };
}

/** First pass over the bitmap: totals for progress, and a refusal if data lies past the file's end. */
async function summarizeAllocation(image: CowImage): Promise<AllocationSummary> {
  const summary: AllocationSummary = { extents: 0, allocatedBytes: 0, dataEnd: 0 };
  for await (const extent of allocatedExtents(image)) {
    const bytes = extentBytes(extent, image);
    summary.extents++;
    summary.allocatedBytes += bytes.end - bytes.start;
    summary.dataEnd = image.geometry.dataOffset + bytes.end;
  }
  if (summary.dataEnd > image.fileSize) {
    throw new CowFormatError(
      'truncated',
      'file length',
      image.fileSize,
      `at least ${summary.dataEnd} bytes: allocated sectors lie past the end of the file (see ubdcow check)`,
      image.path,
    );
  }
  return summary;
}

/** Refuses backing files that are absent, or changed since the COW was made unless forced. */
function judgeBacking(cowPath: string, report: BackingReport, force: boolean): string[] {
  if (report.state === 'ok') return [];
  const problem = `${cowPath}: ${report.problem ?? `backing file ${report.state}`}`;
  if (report.state === 'size-mismatch' || report.state === 'mtime-mismatch') {
    if (force) return [problem];
    throw new UbdcowError('backing-mismatch', `${problem}; the backing file changed since the COW was made (use --force to commit anyway)`, {
      file: report.path,
    });
  }
  throw new UbdcowError(`backing-${report.state}`, problem, { file: report.path });
}

async function openBacking(fs: FileSystem, backingPath: string, mode: 'r' | 'r+'): Promise<FileHandleLike> {
  const action = mode === 'r' ? 'read backing file' : 'open backing file for writing';
  return (await openImageFile(fs, backingPath, 'backing file', mode, action)).handle;
}

async function readFully(file: FileHandleLike, filePath: string, buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  try {
    return await file.read(buffer, offset, length, position);
  } catch (err) {
    throw fromSystemError(err, filePath, 'read');
  }
}

async function writeAll(file: Pick<FileHandleLike, 'write'>, filePath: string, buffer: Uint8Array, offset: number, length: number, position: number): Promise<void> {
  try {
    await file.write(buffer, offset, length, position);
  } catch (err) {
    throw fromSystemError(err, filePath, 'write');
  }
}

/**
 * Merges a COW file with its backing file: into a new image file (`output`, what `uml_moo COW OUT`
 * makes) or into the backing file itself (what `uml_moo -d COW` does, then empties the COW so the
 * VM can go on using it over the merged base).
 */
export async function commitCow(cowPath: string, options: CommitOptions = {}): Promise<CommitResult> {
  if (options.output !== undefined && options.keep) {
    throw new UbdcowError('usage', `${options.output}: --keep only applies to an in-place commit (no OUT); a new image never changes the COW`);
  }
  return options.output === undefined ? commitInPlace(cowPath, options) : commitToNewFile(cowPath, options.output, options);
}

/** Refuses to write the merged image over the COW file it is made from. */
async function refuseOutputOverCow(fs: FileSystem, cowPath: string, output: string): Promise<boolean> {
  const [cowReal, outputReal] = await Promise.all([
    fs.realpath(cowPath).catch(() => path.resolve(cowPath)),
    fs.realpath(output).catch(() => undefined),
  ]);
  if (outputReal === cowReal) {
    throw new UbdcowError('output-is-cow', `${output}: is the COW file itself; write the merged image to another file`, { file: output });
  }
  return outputReal !== undefined;
}

async function commitToNewFile(cowPath: string, output: string, options: CommitOptions): Promise<CommitResult> {
  const started = Date.now();
  const fs = options.fs ?? nodeFileSystem;
  const force = options.force ?? false;
  const chunkBytes = roundChunk(options.chunkBytes);
  const outputExists = await refuseOutputOverCow(fs, cowPath, output);
  if (outputExists && !force) {
    throw existsError(output);
  }
  // A read lock suffices: it conflicts with the write lock a running UML holds or would take.
  const image = await openImage(cowPath, { fs, mode: 'r' });
  try {
    await lockCowFile(image.file, cowPath, { exclusive: false });
    if (await readCommitJournal(fs, cowPath)) {
      throw new UbdcowError('commit-interrupted', interruptedCommitMessage(cowPath), { file: cowPath });
    }
    const report = await checkBacking(image.header, options.backing, fs);
    const overridden = judgeBacking(cowPath, report, force);
    const summary = await summarizeAllocation(image);
    const backing = await openBacking(fs, report.path, 'r');
    let writtenBytes = 0;
    try {
      await writeNewFile(fs, output, force, async (out, temporaryPath) => {
        const writer = await ImageWriter.open(fs, out, temporaryPath);
        try {
          writtenBytes = await writeMergedImage(image, backing, report.path, { file: out, writer, path: output }, chunkBytes, options.onProgress);
        } finally {
          await writer.close();
        }
      });
    } finally {
      await backing.close().catch(() => undefined);
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
  } finally {
    await image.file.close().catch(() => undefined);
  }
}

function roundChunk(chunkBytes = COMMIT_CHUNK_BYTES): number {
  return Math.max(HOLE_BLOCK_BYTES, Math.ceil(chunkBytes / HOLE_BLOCK_BYTES) * HOLE_BLOCK_BYTES);
}

/** Allocated byte ranges of the disk that fall in one window [start, start + window size). */
interface WindowRuns {
  start: number;
  runs: Array<{ start: number; end: number }>;
}

/**
 * The allocated byte ranges, split at window boundaries and grouped by window, for the windows
 * that have any. Working a window at a time turns thousands of small extents into one read of
 * the COW's data area per window (holes read back as zeros, cheaply).
 */
async function* allocatedWindows(image: CowImage, windowBytes: number): AsyncGenerator<WindowRuns> {
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

/**
 * A separate read costs about as much as copying this many bytes of holes (a thread-pool round
 * trip against memcpy of zero pages), so a span reads run by run only when its runs are fewer.
 */
const BYTES_PER_SEPARATE_READ = 256 * 1024;

/** Reads the COW data area behind [start, end) of the disk into `buffer` at `offset`; a short read means truncation. */
async function readCowRun(image: CowImage, buffer: Uint8Array, offset: number, start: number, end: number): Promise<void> {
  const target = { buffer, offset, length: end - start, position: image.geometry.dataOffset + start };
  await readExactly(image.file, image.path, 'read', target, (got) => dataAreaEndsEarly(image, start, end, got));
}

/** The COW file ended `got` bytes into the data behind [start, end) of the disk. */
function dataAreaEndsEarly(image: CowImage, start: number, end: number, got: number): CowFormatError {
  const { dataOffset } = image.geometry;
  return new CowFormatError('truncated', 'file length', dataOffset + start + got, `at least ${dataOffset + end} bytes`, image.path);
}

/**
 * Assembles the merged disk a window at a time (the backing's bytes, then the COW's allocated
 * runs over them) and writes only the blocks that are not all zeros, so zero regions stay holes.
 * Returns the bytes written.
 */
async function writeMergedImage(
  image: CowImage,
  backing: FileHandleLike,
  backingPath: string,
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
  let syncedUpTo = 0;
  for (let windowStart = 0; windowStart < size && failure === undefined; windowStart += windowBytes) {
    const length = Math.min(windowBytes, size - windowStart);
    let runs: WindowRuns['runs'] = [];
    if (!next.done && next.value.start === windowStart) {
      runs = next.value.runs;
      next = await windows.next();
    }
    while (idle.length === 0) await Promise.race(inFlight);
    const buffers = idle.pop()!;
    const task = mergeWindow(image, backing, backingPath, output, buffers, windowStart, length, runs).then(
      (bytes) => {
        written += bytes;
        done += length;
        onProgress?.(done, size);
        if (!output.writer.isDirect && written - syncedUpTo >= BACKGROUND_SYNC_BYTES && backgroundSync === undefined) {
          // Start write-back while the copy goes on, so the final fsync has little left to do.
          syncedUpTo = written;
          backgroundSync = output.file.datasync().finally(() => (backgroundSync = undefined));
          backgroundSync.catch((err: unknown) => (failure ??= fromSystemError(err, output.path, 'sync')));
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

/** The new image being written: its descriptor, the writer in front of it, the name to report. */
interface MergedImageOutput {
  file: FileHandleLike;
  writer: ImageWriter;
  path: string;
}

const WINDOWS_IN_FLIGHT = 3;
const BACKGROUND_SYNC_BYTES = 64 << 20;

/** One window of the merged disk: the backing's bytes, the COW's runs over them, non-zero blocks out. */
async function mergeWindow(
  image: CowImage,
  backing: FileHandleLike,
  backingPath: string,
  output: MergedImageOutput,
  buffers: { window: Uint8Array; cowData: Uint8Array },
  windowStart: number,
  length: number,
  runs: WindowRuns['runs'],
): Promise<number> {
  const { window, cowData } = buffers;
  const got = await readFully(backing, backingPath, window, 0, length, windowStart);
  // A shorter backing file (only with --force) reads as zeros past its end.
  window.fill(0, got, length);
  if (runs.length > 0) {
    const spanStart = runs[0].start;
    const spanEnd = runs[runs.length - 1].end;
    if (runs.length * BYTES_PER_SEPARATE_READ < spanEnd - spanStart) {
      // Few runs in a wide span: read each straight into place rather than the span's holes.
      await Promise.all(runs.map((run) => readCowRun(image, window, run.start - windowStart, run.start, run.end)));
    } else {
      await readCowRun(image, cowData, 0, spanStart, spanEnd);
      for (const run of runs) window.set(cowData.subarray(run.start - spanStart, run.end - spanStart), run.start - windowStart);
    }
  }
  return writeNonZeroBlocks(output, window.subarray(0, length), windowStart);
}

const zeroBlock = new Uint8Array(HOLE_BLOCK_BYTES);

function isZero(bytes: Uint8Array): boolean {
  return Buffer.compare(bytes, zeroBlock.subarray(0, bytes.length)) === 0;
}

/** Writes the non-zero blocks of `data` (file offset `position`), coalescing neighbours. */
async function writeNonZeroBlocks(output: MergedImageOutput, data: Uint8Array, position: number): Promise<number> {
  let written = 0;
  let runStart = -1;
  const flush = async (end: number) => {
    if (runStart < 0) return;
    await writeAll(output.writer, output.path, data, runStart, end - runStart, position + runStart);
    written += end - runStart;
    runStart = -1;
  };
  for (let block = 0; block < data.length; block += HOLE_BLOCK_BYTES) {
    const end = Math.min(block + HOLE_BLOCK_BYTES, data.length);
    if (isZero(data.subarray(block, end))) await flush(block);
    else if (runStart < 0) runStart = block;
  }
  await flush(data.length);
  return written;
}

/**
 * Other COWs over the same backing file would see their disks change under them. Refused unless
 * forced; with force, returned as warnings naming them.
 */
async function refuseSharedBacking(fs: FileSystem, cowPath: string, backingPath: string, options: CommitOptions): Promise<string[]> {
  const folders = [path.dirname(path.resolve(cowPath)), path.dirname(backingPath), ...(options.checkSiblings ?? [])];
  const { siblings, unreadable } = await findSiblingCows(fs, cowPath, backingPath, folders);
  const risks: string[] = [];
  if (siblings.length > 0) {
    risks.push(
      `${backingPath} is also the backing file of ${siblings.length} other COW file${siblings.length > 1 ? 's' : ''} (${siblings.join(', ')}); merging into it in place changes the disks they see and silently corrupts them`,
    );
  }
  if (unreadable.length > 0) {
    risks.push(`could not tell whether other COW files use ${backingPath}: ${unreadable.map((err) => err.message).join('; ')}`);
  }
  if (risks.length > 0 && !options.force) {
    throw new UbdcowError('shared-backing', `${risks.join('; and ')} (commit to a new file instead, or use --force)`, { file: backingPath });
  }
  return risks;
}

async function commitInPlace(cowPath: string, options: CommitOptions): Promise<CommitResult> {
  const started = Date.now();
  const fs = options.fs ?? nodeFileSystem;
  const chunkBytes = roundChunk(options.chunkBytes);
  const image = await openImage(cowPath, { fs, mode: 'r+' });
  try {
    await lockCowFile(image.file, cowPath, { exclusive: true });
    const report = await checkBacking(image.header, options.backing, fs);
    const journal = await readCommitJournal(fs, cowPath);
    const resumed = report.state === 'mtime-mismatch' && journalMatches(journal, image, report);
    const overridden = resumed ? [] : judgeBacking(cowPath, report, options.force ?? false);
    const siblings = resumed ? [] : await refuseSharedBacking(fs, cowPath, report.path, options);
    const summary = await summarizeAllocation(image);
    const backing = await openBacking(fs, report.path, 'r+');
    try {
      await writeCommitJournal(fs, cowPath, {
        format: 'ubdcow-commit-journal',
        version: 1,
        backing: report.path,
        size: image.header.size,
        mtime: image.header.mtime,
        started: new Date(started).toISOString(),
      });
      await copyAllocatedIntoBacking(image, backing, report.path, chunkBytes, summary.allocatedBytes, options.onProgress);
      try {
        await backing.sync();
      } catch (err) {
        throw fromSystemError(err, report.path, 'sync');
      }
    } finally {
      await backing.close().catch(() => undefined);
    }
    const warnings = [...image.warnings, ...siblings];
    if (options.keep) {
      warnings.push(
        `${cowPath}: kept as it was; its header still records the old backing mtime, so UML will refuse it over the merged ${report.path}`,
      );
    } else {
      const merged = await statImageFile(fs, report.path, 'backing file');
      await emptyCow(image, merged.mtime);
    }
    await removeCommitJournal(fs, cowPath);
    return {
      mode: 'in-place',
      cow: cowPath,
      output: report.path,
      backing: report.path,
      size: image.header.size,
      allocatedBytes: summary.allocatedBytes,
      extents: summary.extents,
      writtenBytes: summary.allocatedBytes,
      emptied: !options.keep,
      resumed,
      overridden,
      durationMs: Date.now() - started,
      warnings,
    };
  } finally {
    await image.file.close().catch(() => undefined);
  }
}

/** Async writes in flight at once (when the files offer no blocking calls). */
const WRITES_IN_FLIGHT = 32;

/** Copies every allocated run from the COW's data area to the same place in the backing file. */
async function copyAllocatedIntoBacking(
  image: CowImage,
  backing: FileHandleLike,
  backingPath: string,
  windowBytes: number,
  totalBytes: number,
  onProgress: CommitOptions['onProgress'],
): Promise<void> {
  const cowData = new Uint8Array(windowBytes);
  const blocking = hasBlockingCalls(image.file) && hasBlockingCalls(backing);
  let done = 0;
  onProgress?.(0, totalBytes);
  for await (const { runs } of allocatedWindows(image, windowBytes)) {
    if (blocking) {
      copyRunsBlocking(image, backing, backingPath, cowData, runs);
      // One window (at most a few milliseconds of system calls) per turn of the event loop.
      await new Promise((resolve) => setImmediate(resolve));
    } else {
      await copyRunsAsync(image, backing, backingPath, cowData, runs);
    }
    for (const run of runs) done += run.end - run.start;
    onProgress?.(done, totalBytes);
  }
}

type BlockingHandle = FileHandleLike & Required<Pick<FileHandleLike, 'readSync' | 'writeSync'>>;

function hasBlockingCalls(file: FileHandleLike): file is BlockingHandle {
  return file.readSync !== undefined && file.writeSync !== undefined;
}

/**
 * One window's runs, each read from the COW and written to the backing file with blocking calls:
 * scattered runs are small, and for small pieces the system call is cheap but the thread-pool
 * round trip is not (see FileHandleLike.readSync).
 */
function copyRunsBlocking(image: CowImage, backing: BlockingHandle, backingPath: string, buffer: Uint8Array, runs: WindowRuns['runs']): void {
  const file = image.file as BlockingHandle;
  for (const run of runs) {
    const length = run.end - run.start;
    let got: number;
    try {
      got = file.readSync(buffer, 0, length, image.geometry.dataOffset + run.start);
    } catch (err) {
      throw fromSystemError(err, image.path, 'read');
    }
    if (got < length) throw dataAreaEndsEarly(image, run.start, run.end, got);
    try {
      backing.writeSync(buffer, 0, length, run.start);
    } catch (err) {
      throw fromSystemError(err, backingPath, 'write');
    }
  }
}

/** One window's runs with async calls: the span read once, the runs written WRITES_IN_FLIGHT at a time. */
async function copyRunsAsync(image: CowImage, backing: FileHandleLike, backingPath: string, buffer: Uint8Array, runs: WindowRuns['runs']): Promise<void> {
  const spanStart = runs[0].start;
  await readCowRun(image, buffer, 0, spanStart, runs[runs.length - 1].end);
  let next = 0;
  const writeRuns = async () => {
    while (next < runs.length) {
      const run = runs[next++];
      await writeAll(backing, backingPath, buffer, run.start - spanStart, run.end - run.start, run.start);
    }
  };
  await Promise.all(Array.from({ length: Math.min(WRITES_IN_FLIGHT, runs.length) }, writeRuns));
}

/**
 * Leaves the COW with no allocated sectors over the merged backing file: bitmap zeroed and header
 * re-stamped first (synced), only then the data area dropped, so no set bit ever points at lost data.
 */
async function emptyCow(image: CowImage, backingMtime: number): Promise<void> {
  const { bitmapOffset, bitmapLength, dataOffset, fileLength } = image.geometry;
  // Only the bytes holding bits: zeros over the whole bitmap would fill its holes (issue 15 item 5).
  await clearNonZeroBytes(image.file, image.path, bitmapOffset, bitmapLength);
  await rewriteHeader(image.file, image.path, { ...image.header, mtime: backingMtime });
  try {
    await image.file.truncate(dataOffset);
    await image.file.truncate(fileLength);
    await image.file.sync();
  } catch (err) {
    throw fromSystemError(err, image.path, 'drop the data area of');
  }
}
