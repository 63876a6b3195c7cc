import { UbdcowError, backingMismatch, fromSystemError } from '../errors.js';
import { serializeSameLayout } from '../format/header.js';
import {
  cloneOrCopyFile,
  type FileHandleLike,
  fileIdentity,
  type FileSystem,
  nodeFileSystem,
  punchHole,
  syncRange,
  writeAll,
  writeNewFile,
} from '../io/file/index.js';
import {
  backingError,
  checkBacking,
  type CowImage,
  imageSize,
  openBacking,
  type OpenedFile,
  openLockedImage,
  probeReadable,
  rewriteHeader,
  statImageFile,
} from '../io/image/index.js';
import { commitJournalExists, interruptedCommitError } from '../io/journal/index.js';
import { type OptionKeys, checkOptions } from '../options.js';
import { summarizeAllocation } from './commit/shared.js';
import { BaseComparer } from './base-compare.js';
import { RemoteCompare, canCompareRemotely } from './compare-worker.js';
import { absoluteBackingPath } from './create.js';
import { type BitmapWindow, readBitmapWindow, readDataArea, sectorsPerPage, setWindowBits, writeBitmapWindow } from './disk-pages.js';

/*
 * `rebase --rewrite COW... NEW_BASE` (qemu-img rebase -b without -u): move COWs onto another base
 * while each guest sees exactly the same disk. Where the old and new bases differ and a COW does
 * not hold the whole 4 KiB page, the page as the guest sees it (COW sectors over the old base) is
 * written into the COW and all its bits set; with `sparse`, pages the COW holds that equal the new
 * base are dropped. The header then names NEW_BASE with its mtime (its size must be the disk's:
 * the kernel refuses a backing file of another size, ubd_kern.c backing_file_mismatch()).
 *
 * All or nothing per COW, under kill -9 too: the rewritten COW is built as a new file beside the
 * old one (writeNewFile: hidden temporary, a clone or sparse in-kernel copy of the old COW, the
 * changes, fsync, rename over the old name). Until the rename the old COW is untouched; after it
 * the new one is complete. The old COWs stay write-locked throughout, so no UML starts on them.
 * Many COWs are rewritten together window by window, so each region of the bases is read once.
 */

export interface RebaseRewriteOptions {
  /** Also drop the pages the COW holds that equal the new base. */
  sparse?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  fs?: FileSystem;
  /** Disk bytes compared per step (tests make it small). Default 1 MiB. */
  windowBytes?: number;
  /**
   * Compare the back half of the disk on a second thread (compare-worker.ts). Default: when the
   * disk is at least 256 MiB, without `sparse`, over real files. Tests force it either way.
   */
  compareThread?: boolean;
}

export interface RebasedCow {
  file: string;
  oldBacking: string;
  /** Already over NEW_BASE: nothing to copy (the header's path was brought up to date). */
  unchanged: boolean;
  /** Disk bytes copied into the COW (whole pages where the bases differ). */
  copiedBytes: number;
  /** Disk bytes dropped (`sparse`: pages equal to the new base). */
  droppedBytes: number;
}

export interface RebaseRewriteResult {
  newBacking: string;
  /** The new base's mtime, now in every header. */
  mtime: number;
  size: number;
  /** Disk bytes (whole pages) in which the old base of the first COW and the new base differ. */
  differingBytes: number;
  cows: RebasedCow[];
  durationMs: number;
}

const rebaseRewriteOptionKeys: OptionKeys<RebaseRewriteOptions> = { sparse: true, onProgress: true, fs: true, windowBytes: true, compareThread: true };

/**
 * 1 MiB windows: the unit of the per-COW work (bitmap window, COW data, writes). The bases are
 * read and compared in smaller chunks inside it (base-compare.ts).
 */
const DEFAULT_WINDOW_BYTES = 1 << 20;
/** Smallest disk whose back half is compared on a second thread (starting one costs some 20-40 ms). */
const COMPARE_THREAD_MIN_BYTES = 256 << 20;
/** Copied bytes after which a COW's writeback is started (sync_file_range, not waited for). */
const WRITEBACK_BYTES = 16 << 20;
/** Longest stretch of blocking reads and compares before the event loop gets a turn. */
const YIELD_MS = 20;

interface Job {
  image: CowImage;
  result: RebasedCow;
  /** The old base (undefined when the COW is already over the new one). */
  oldBase?: OpenedFile;
  /** The temporary new COW, once created. */
  target?: FileHandleLike;
  targetPath?: string;
  /** Bytes written to the target since its writeback was last started. */
  unflushed: number;
  /** The writeback started last (settles with undefined or the error to report). */
  writeback?: Promise<void>;
}

/** sync_file_range(WRITE) of the whole target, its failure kept for whoever awaits it. */
function startWriteback(target: FileHandleLike, targetPath: string): Promise<void> {
  const started = syncRange(target, 0, 0).then(
    () => undefined,
    (err: unknown) => {
      throw fromSystemError(err, targetPath, 'write back');
    },
  );
  // Awaited before the next one and at the end; until then a failure is not "unhandled".
  started.catch(() => undefined);
  return started;
}

export async function rebaseRewrite(cowPaths: string[], newBase: string, options: RebaseRewriteOptions = {}): Promise<RebaseRewriteResult> {
  checkOptions('rebaseRewrite', options, rebaseRewriteOptionKeys);
  const started = Date.now();
  const fs = options.fs ?? nodeFileSystem;
  if (cowPaths.length === 0) throw new UbdcowError('usage', 'rebase --rewrite: name at least one COW file before the new base');
  const stat = await statImageFile(fs, newBase, 'backing file');
  const size = await imageSize(stat, newBase, 'backing file');
  await probeReadable(fs, newBase, 'backing file');
  const stored = await absoluteBackingPath(newBase, fs).catch((err) => {
    throw fromSystemError(err, newBase, 'resolve backing file path');
  });
  const newIdentity = await fileIdentity(fs, newBase);
  const images: CowImage[] = [];
  const bases = new Map<string, OpenedFile>();
  let fresh: OpenedFile | undefined;
  try {
    const seen = new Set<string>();
    const jobs: Job[] = [];
    for (const cowPath of cowPaths) {
      const identity = await fileIdentity(fs, cowPath).catch(() => cowPath);
      if (identity === newIdentity) throw new UbdcowError('same-file', `${cowPath}: is the new base itself`, { file: cowPath });
      if (seen.has(identity)) throw new UbdcowError('same-file', `${cowPath}: named twice (the same file as an earlier argument)`, { file: cowPath });
      seen.add(identity);
      const image = await openLockedImage(cowPath, { fs, mode: 'r+', lock: 'write' });
      images.push(image);
      jobs.push(await prepare(fs, image, { newBase, stored, size, mtime: stat.mtime, newIdentity }, bases));
    }
    fresh = await openBacking(fs, newBase, 'r');
    const active = jobs.filter((job) => !job.result.unchanged);
    const differing = { bytes: 0 };
    if (active.length > 0) {
      await withTargets(fs, active, 0, async () => {
        for (const job of active) await startTarget(fs, job, stored, stat.mtime);
        await rewriteWindows(active, fresh!, size, options, differing);
      });
    }
    return { newBacking: stored, mtime: stat.mtime, size, differingBytes: differing.bytes, cows: jobs.map((job) => job.result), durationMs: Date.now() - started };
  } finally {
    for (const image of images) await image.handle.close().catch(() => undefined);
    for (const base of bases.values()) await base.handle.close().catch(() => undefined);
    await fresh?.handle.close().catch(() => undefined);
  }
}

interface NewBase {
  newBase: string;
  stored: string;
  size: number;
  mtime: number;
  newIdentity: string;
}

/** Checks one COW and opens its old base (shared among COWs over the same file). */
async function prepare(fs: FileSystem, image: CowImage, target: NewBase, bases: Map<string, OpenedFile>): Promise<Job> {
  const { header } = image;
  const cowPath = image.path;
  if (await commitJournalExists(fs, cowPath)) throw interruptedCommitError(cowPath, ' first');
  if (header.size !== target.size) {
    throw backingMismatch(target.newBase, `${target.newBase}: ${target.size} bytes, but the disk of ${cowPath} is ${header.size} bytes; UML refuses a backing file whose size differs from the COW header's ("Size mismatch"), so a disk can only move onto a base of its own size`);
  }
  const report = await checkBacking(header, undefined, fs);
  const result: RebasedCow = { file: cowPath, oldBacking: header.backingFile, unchanged: false, copiedBytes: 0, droppedBytes: 0 };
  const oldIdentity = report.state === 'missing' ? undefined : await fileIdentity(fs, report.path).catch(() => undefined);
  if (oldIdentity === target.newIdentity && header.mtime === target.mtime) {
    // Already over the new base (a re-run after some COWs were done): only the stored path may differ.
    if (header.backingFile !== target.stored) await rewriteHeader(image, { ...header, backingFile: target.stored });
    return { image, result: { ...result, unchanged: true }, unflushed: 0 };
  }
  if (report.state !== 'ok') throw backingError(cowPath, report, 'the old base must be the file the COW was made over, to copy what differs from it');
  await summarizeAllocation(image);
  const key = oldIdentity ?? report.path;
  let oldBase = bases.get(key);
  if (!oldBase) {
    oldBase = await openBacking(fs, report.path, 'r');
    bases.set(key, oldBase);
  }
  return { image, result, oldBase, unflushed: 0 };
}

/** Creates each job's temporary new COW (nested writeNewFile calls), runs `work`, then puts them in place. */
async function withTargets(fs: FileSystem, jobs: Job[], index: number, work: () => Promise<void>): Promise<void> {
  if (index === jobs.length) return work();
  const job = jobs[index]!;
  await writeNewFile(fs, job.image.path, true, async (file, temporaryPath) => {
    job.target = blockingWrites(file);
    job.targetPath = temporaryPath;
    await withTargets(fs, jobs, index + 1, work);
  });
}

/**
 * The target with writes that block where the handle can (writeSync): the copied pages and bitmap
 * bytes go to the page cache in thousands of small writes, each of which would otherwise cost a
 * thread-pool round trip longer than the write. The rename's fsync makes them durable.
 */
function blockingWrites(file: FileHandleLike): FileHandleLike {
  const { writeSync } = file;
  if (!writeSync) return file;
  const write = async (buffer: Uint8Array, offset: number, length: number, position: number) => writeSync.call(file, buffer, offset, length, position);
  return new Proxy(file, { get: (target, key) => (key === 'write' ? write : Reflect.get(target, key, target)) });
}

/** The new COW starts as the old one (shared extents or an in-kernel sparse copy) with the new header. */
async function startTarget(fs: FileSystem, job: Job, stored: string, mtime: number): Promise<void> {
  const { image, target, targetPath } = job;
  // The rebuilt COW keeps the permissions of the one it replaces (best effort, as cp -p).
  const mode = await fs.stat(image.path).then((s) => s.mode, () => undefined);
  if (mode !== undefined) await fs.chmod(targetPath!, mode).catch(() => undefined);
  await cloneOrCopyFile(target!, image.handle).catch((err) => {
    throw fromSystemError(err, image.path, 'copy');
  });
  let header: Uint8Array;
  try {
    header = serializeSameLayout({ ...image.header, backingFile: stored, mtime });
  } catch (err) {
    if (err instanceof UbdcowError) throw new UbdcowError(err.code, `${image.path}: cannot record ${stored} as its backing file: ${err.message}`, { file: image.path });
    throw err;
  }
  await writeAll(target!, targetPath!, 'write', { buffer: header, offset: 0, length: header.length, position: 0 });
}

/**
 * Goes through the disk a window at a time: each base's bytes compared once (BaseComparer), the
 * result applied to every COW over that old base.
 */
async function rewriteWindows(jobs: Job[], fresh: OpenedFile, size: number, options: RebaseRewriteOptions, differing: { bytes: number }): Promise<void> {
  const pageBytes = Math.max(...jobs.map((job) => sectorsPerPage(job.image.header.sectorSize) * job.image.header.sectorSize));
  const unit = Math.max(pageBytes * 8, ...jobs.map((job) => job.image.header.sectorSize * 8));
  const windowBytes = Math.max(unit, Math.ceil((options.windowBytes ?? DEFAULT_WINDOW_BYTES) / unit) * unit);
  const sparse = options.sparse ?? false;
  const groups = new Map<OpenedFile, Job[]>();
  for (const job of jobs) groups.set(job.oldBase!, [...(groups.get(job.oldBase!) ?? []), job]);
  const bases = [...groups.keys()];
  const comparer = new BaseComparer(fresh, bases, size, windowBytes, pageBytes, sparse);
  const scratch = { page: new Uint8Array(pageBytes), out: new Uint8Array(windowBytes), cow: new Uint8Array(windowBytes) };
  // The back half on a second thread; this one compares the front half, then applies the answers.
  const threaded = !sparse && canCompareRemotely([fresh, ...bases]) && (options.compareThread ?? size >= COMPARE_THREAD_MIN_BYTES);
  const from = threaded ? Math.ceil(size / 2 / windowBytes) * windowBytes : size;
  // A worker that cannot start (resource limits) leaves all of it to this thread.
  const remote = from < size ? await RemoteCompare.start({ fresh, olds: bases, from, size, windowBytes, chunkBytes: comparer.chunkBytes, pageBytes }).catch(() => undefined) : undefined;
  try {
    options.onProgress?.(0, size);
    let yielded = performance.now();
    for (let start = 0; start < size; start += windowBytes) {
      const answer = start >= from ? await remote?.take(start) : undefined;
      const window = answer ? comparer.fromAnswer(answer) : await comparer.compare(start);
      if (answer) remote?.recycle(answer);
      const length = window.end - start;
      for (const [index, base] of bases.entries()) {
        const { data, differs } = window.old.get(base)!;
        if (index === 0) differing.bytes += differs.reduce((sum, at) => sum + Math.min(pageBytes, length - at), 0);
        for (const job of groups.get(base)!) await rewriteWindow(job, start, window.end, data, window.fresh, differs, scratch, sparse);
      }
      options.onProgress?.(window.end, size);
      // The compare reads block; let timers, signals and the progress bar run now and then.
      if (performance.now() - yielded > YIELD_MS) {
        await new Promise((resolve) => setImmediate(resolve));
        yielded = performance.now();
      }
    }
    for (const job of jobs) await job.writeback;
  } finally {
    await remote?.stop();
    // A failed run still lets its writebacks finish before the temporaries are removed.
    await Promise.allSettled(jobs.map((job) => job.writeback));
  }
}

/** One COW's share of a window: copy in the differing pages it does not hold, drop (sparse) the ones equal to the new base. */
async function rewriteWindow(job: Job, start: number, end: number, oldData: Uint8Array, freshData: Uint8Array, differs: number[], scratch: { page: Uint8Array; out: Uint8Array; cow: Uint8Array }, sparse: boolean): Promise<void> {
  const { page, out } = scratch;
  const { image, target, targetPath, result } = job;
  const { sectorSize } = image.header;
  const { coveredSectors, dataOffset } = image.geometry;
  const pageBytes = page.length;
  if (differs.length === 0 && !sparse) return;
  const window = await readBitmapWindow(image, start / sectorSize, Math.ceil(end / sectorSize));
  const { bits } = window;
  const rel = (sector: number) => sector - bits.firstSector;
  // The window's data area in one read, when the COW holds anything in it (its holes read cheaply).
  const cowData = bits.nextSet(0) < bits.bitCount ? scratch.cow : undefined;
  if (cowData) await readDataArea(image, cowData, 0, start, end);
  const filled = new Set<number>();
  const copies: Array<{ start: number; end: number }> = [];
  for (const at of differs) {
    const pageStart = start + at;
    const pageEnd = Math.min(end, pageStart + pageBytes);
    const first = pageStart / sectorSize;
    const last = Math.ceil(pageEnd / sectorSize);
    if (last > coveredSectors) {
      throw new UbdcowError('uncovered', `${image.path}: the bases differ at byte ${pageStart}, past the sectors its bitmap covers (a version 1/2 COW); it cannot hold those bytes, so it cannot move onto the new base`, { file: image.path });
    }
    if (bits.allSet(rel(first), rel(last))) continue;
    // Only sectors read from the base matter: is one of those different? (With none held, the page differing says so.)
    let needed = bits.nextSet(rel(first), rel(last)) >= rel(last);
    for (let sector = first; sector < last && !needed; sector++) {
      if (bits.get(rel(sector))) continue;
      const from = sector * sectorSize - start;
      const to = Math.min(from + sectorSize, end - start);
      needed = Buffer.compare(oldData.subarray(from, to), freshData.subarray(from, to)) !== 0;
    }
    if (!needed) continue;
    // Without COW sectors in the window the guest's page is the old base's: written from there.
    if (cowData) guestPage(image, window, oldData, cowData, start, pageStart, pageEnd, out.subarray(pageStart - start));
    // Neighbouring pages go out in one write.
    const run = copies[copies.length - 1];
    if (run && run.end === pageStart) run.end = pageEnd;
    else copies.push({ start: pageStart, end: pageEnd });
    setWindowBits(window, first, last, true);
    result.copiedBytes += pageEnd - pageStart;
    if (sparse) filled.add(pageStart);
  }
  for (const copy of copies) {
    await writeAll(target!, targetPath!, 'write', { buffer: cowData ? out : oldData, offset: copy.start - start, length: copy.end - copy.start, position: dataOffset + copy.start });
    job.unflushed += copy.end - copy.start;
  }
  if (job.unflushed >= WRITEBACK_BYTES) {
    // Start the disk on what is written so far: the fsync before the rename then waits less. The
    // call itself can take 10-20 ms, so it is not waited for here (only before the next one).
    job.unflushed = 0;
    await job.writeback;
    job.writeback = startWriteback(target!, targetPath!);
  }
  if (sparse) {
    for (const run of bits.allocatedRuns()) {
      const runStart = (bits.firstSector + run.start) * sectorSize;
      const runEnd = Math.min(end, (bits.firstSector + run.end) * sectorSize);
      for (let pageStart = Math.floor(runStart / pageBytes) * pageBytes; pageStart < runEnd; pageStart += pageBytes) {
        // A page two runs share is looked at once.
        if (filled.has(pageStart) || pageStart < start) continue;
        filled.add(pageStart);
        const pageEnd = Math.min(end, pageStart + pageBytes);
        const view = guestPage(image, window, oldData, cowData, start, pageStart, pageEnd, page);
        if (Buffer.compare(view, freshData.subarray(pageStart - start, pageEnd - start)) !== 0) continue;
        setWindowBits(window, pageStart / sectorSize, Math.ceil(pageEnd / sectorSize), false);
        await punchHole(target!, dataOffset + pageStart, pageEnd - pageStart, { fallback: 'skip' }).catch((err) => {
          throw fromSystemError(err, targetPath!, 'punch a hole in');
        });
        result.droppedBytes += pageEnd - pageStart;
      }
    }
  }
  await writeBitmapWindow(image, window, target, targetPath);
}

/** The page [pageStart, pageEnd) as the guest sees it now: the COW's sectors (from the window's `cowData`) over the old base. */
function guestPage(image: CowImage, window: BitmapWindow, oldData: Uint8Array, cowData: Uint8Array | undefined, windowStart: number, pageStart: number, pageEnd: number, page: Uint8Array): Uint8Array {
  const { sectorSize } = image.header;
  const { bits } = window;
  const view = page.subarray(0, pageEnd - pageStart);
  view.set(oldData.subarray(pageStart - windowStart, pageEnd - windowStart));
  if (!cowData) return view;
  const first = pageStart / sectorSize - bits.firstSector;
  const last = Math.min(Math.ceil(pageEnd / sectorSize) - bits.firstSector, bits.bitCount);
  for (let sector = bits.nextSet(first, last); sector < last; ) {
    const runEnd = bits.nextClear(sector, last);
    const from = (bits.firstSector + sector) * sectorSize;
    const to = Math.min((bits.firstSector + runEnd) * sectorSize, pageEnd);
    view.set(cowData.subarray(from - windowStart, to - windowStart), from - pageStart);
    sector = bits.nextSet(runEnd, last);
  }
  return view;
}
