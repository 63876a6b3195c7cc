import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../../errors.js';
import { allocatedWindows, clearNonZeroBytes, type WindowRuns } from '../../io/bitmap/index.js';
import {
  type BackingReport,
  checkBacking,
  type CowImage,
  openBacking,
  rewriteHeader,
  statImageFile,
  withImage,
} from '../../io/image/index.js';
import { type CommitJournal, readCommitJournal, removeCommitJournal, writeCommitJournal } from '../../io/journal/index.js';
import {
  type FileHandleLike,
  type FileSystem,
  writeAll,
  writeAllSync,
} from '../../io/file/index.js';
import { type CommitOptions, type InPlaceCommitResult, judgeBacking, readCowRun, readCowRunSync, roundChunk, summarizeAllocation } from './shared.js';
import { findSiblingCows } from './siblings.js';

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

/** True when the journal describes the state this COW's header still records. */
function journalMatches(journal: CommitJournal | undefined, image: CowImage, backing: BackingReport): boolean {
  return (
    journal !== undefined &&
    journal.backing === backing.path &&
    journal.size === image.header.size &&
    journal.mtime === image.header.mtime
  );
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

export async function commitInPlace(cowPath: string, options: CommitOptions & { fs: FileSystem }): Promise<InPlaceCommitResult> {
  const started = Date.now();
  const { fs } = options;
  const chunkBytes = roundChunk(options.chunkBytes);
  return withImage(cowPath, { fs, mode: 'r+', lock: 'write' }, async (image) => {
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
      await copyAllocatedIntoBacking(image, backing.handle, report.path, chunkBytes, summary.allocatedBytes, options.onProgress);
      try {
        await backing.handle.sync();
      } catch (err) {
        throw fromSystemError(err, report.path, 'sync');
      }
    } finally {
      await backing.handle.close().catch(() => undefined);
    }
    const warnings = [...image.warnings, ...siblings];
    if (options.keep) {
      warnings.push(
        `${cowPath}: kept as it was; its header still records the old backing mtime, so UML will refuse it over the merged ${report.path}`,
      );
    } else {
      const merged = await statImageFile(fs, report.path, 'backing file');
      await emptyCow(image, merged.mtime);
      if (report.state === 'size-mismatch' && report.actual) {
        // The size fixes the COW's layout, so the header keeps it: the kernel will refuse the pair.
        warnings.push(
          `${cowPath}: emptied and pointed at the merged ${report.path}, but its header records ${image.header.size} bytes and the backing has ${report.actual.size} (forced), so UML will refuse it; make a new one: ubdcow create -f ${cowPath} ${report.path}`,
        );
      }
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
  });
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
  const cow = image.handle;
  let done = 0;
  onProgress?.(0, totalBytes);
  for await (const { runs } of allocatedWindows(image, windowBytes)) {
    if (hasBlockingCalls(cow) && hasBlockingCalls(backing)) {
      copyRunsBlocking(image, cow, backing, backingPath, cowData, runs);
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
function copyRunsBlocking(image: CowImage, cow: BlockingHandle, backing: BlockingHandle, backingPath: string, buffer: Uint8Array, runs: WindowRuns['runs']): void {
  for (const run of runs) {
    const length = run.end - run.start;
    readCowRunSync(image, cow, buffer, 0, run.start, run.end);
    writeAllSync(backing, backingPath, 'write', { buffer, offset: 0, length, position: run.start });
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
      await writeAll(backing, backingPath, 'write', { buffer, offset: run.start - spanStart, length: run.end - run.start, position: run.start });
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
  await clearNonZeroBytes(image.handle, image.path, bitmapOffset, bitmapLength);
  await rewriteHeader(image, { ...image.header, mtime: backingMtime });
  try {
    await image.handle.truncate(dataOffset);
    await image.handle.truncate(fileLength);
    await image.handle.sync();
  } catch (err) {
    throw fromSystemError(err, image.path, 'drop the data area of');
  }
}
