/**
 * Whole-range file operations with the fast system call first and a portable fallback after:
 * clone (FICLONE/FICLONERANGE) → copy_file_range → read and write; punch a hole → write zeros
 * (or skip); sync_file_range → nothing or fdatasync. Invariant: the bytes a caller reads back
 * afterwards are the same whichever path ran; only the time and the space used differ. "Not
 * supported here" (see `unsupported`) moves to the next path; any other error (EIO, ENOSPC,
 * EBADF) is thrown as the system error it is, for the caller to name the file.
 */
import { dataExtents } from './extents.js';
import type { CloneRange, FileHandleLike } from './file.js';

/**
 * Codes that mean the call cannot work for these files here, as opposed to a failure: no binding
 * (ENOSYS), the file system does not share extents (EOPNOTSUPP, ENOTTY), the files are on
 * different file systems (EXDEV), or the range is not block-aligned for this file system (EINVAL).
 */
export const unsupportedCodes = new Set(['ENOSYS', 'EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EXDEV', 'EINVAL']);

export function unsupported(err: unknown): boolean {
  return unsupportedCodes.has((err as NodeJS.ErrnoException | undefined)?.code ?? '');
}

export type CloneOutcome = { cloned: true } | { cloned: false; reason: string };

function notCloned(err: unknown): CloneOutcome {
  if (!unsupported(err)) throw err;
  const e = err as NodeJS.ErrnoException;
  return { cloned: false, reason: e.code === 'ENOSYS' ? e.message : `${e.code} from ${e.syscall ?? 'ioctl'}` };
}

/**
 * Makes `target` share all of `source`'s extents (FICLONE): the target's contents and length
 * become the source's in O(extents) time and no new space. `{ cloned: false }` when the file
 * system cannot share extents between these files; the target is then unchanged.
 */
export async function cloneFile(target: FileHandleLike, source: FileHandleLike): Promise<CloneOutcome> {
  if (!target.cloneFrom) return { cloned: false, reason: 'the handle cannot clone' };
  try {
    await target.cloneFrom(source);
    return { cloned: true };
  } catch (err) {
    return notCloned(err);
  }
}

/**
 * FICLONERANGE: target bytes [targetOffset, +length) share source's [sourceOffset, +length).
 * Offsets and length must be multiples of the file system block size (the length may instead run
 * to the source's end); otherwise, or where nothing is shared, `{ cloned: false }`.
 */
export async function cloneRange(target: FileHandleLike, source: FileHandleLike, range: CloneRange): Promise<CloneOutcome> {
  if (range.length === 0) return { cloned: true };
  if (!target.cloneFrom) return { cloned: false, reason: 'the handle cannot clone' };
  try {
    await target.cloneFrom(source, range);
    return { cloned: true };
  } catch (err) {
    return notCloned(err);
  }
}

export interface CopyRangeOptions {
  /** Try FICLONERANGE first (default true). Needs `blockSize`-aligned offsets to succeed. */
  clone?: boolean;
  /** Alignment a clone needs; unaligned ranges skip the clone attempt. Default 4096. */
  blockSize?: number;
  /**
   * The target already reads as zeros over the range (a new or truncated file): source holes are
   * then skipped with SEEK_DATA instead of copied as zeros, and the target stays sparse.
   */
  targetIsZero?: boolean;
  /** Read/write fallback chunk, bytes. Default 1 MiB. */
  chunkBytes?: number;
}

/** How many bytes each path moved. */
export interface CopyReport {
  cloned: number;
  copiedInKernel: number;
  copied: number;
  /** Source holes not copied (targetIsZero). */
  skipped: number;
}

/**
 * Copies source [sourceOffset, +length) to target at targetOffset by the cheapest path that
 * works: a shared-extent clone, then copy_file_range (the kernel copies, and reflinks by itself
 * on XFS/btrfs), then reads and writes. A short source (EOF inside the range) is an error with
 * code 'ESHORT', as a truncated backing file must not become zeros silently.
 */
export async function copyRange(
  target: FileHandleLike,
  source: FileHandleLike,
  range: CloneRange,
  options: CopyRangeOptions = {},
): Promise<CopyReport> {
  const report: CopyReport = { cloned: 0, copiedInKernel: 0, copied: 0, skipped: 0 };
  const pieces: CloneRange[] = [];
  if (options.targetIsZero) {
    let covered = range.sourceOffset;
    for await (const extent of dataExtents(source, range.sourceOffset, range.sourceOffset + range.length)) {
      report.skipped += extent.start - covered;
      pieces.push({ sourceOffset: extent.start, length: extent.end - extent.start, targetOffset: range.targetOffset + (extent.start - range.sourceOffset) });
      covered = extent.end;
    }
    report.skipped += range.sourceOffset + range.length - covered;
  } else if (range.length > 0) {
    pieces.push(range);
  }
  const state = { clone: options.clone ?? true, kernel: true };
  for (const piece of pieces) await copyPiece(target, source, piece, options, state, report);
  return report;
}

async function copyPiece(
  target: FileHandleLike,
  source: FileHandleLike,
  piece: CloneRange,
  options: CopyRangeOptions,
  state: { clone: boolean; kernel: boolean },
  report: CopyReport,
): Promise<void> {
  const blockSize = options.blockSize ?? 4096;
  const aligned = piece.sourceOffset % blockSize === 0 && piece.targetOffset % blockSize === 0 && piece.length % blockSize === 0;
  if (state.clone && aligned) {
    const outcome = await cloneRange(target, source, piece);
    if (outcome.cloned) {
      report.cloned += piece.length;
      return;
    }
    // Once refused for these files, every later piece would be refused as well.
    state.clone = false;
  }
  let done = 0;
  if (state.kernel && target.copyRangeFrom) {
    try {
      while (done < piece.length) {
        const moved = await target.copyRangeFrom(source, piece.sourceOffset + done, piece.length - done, piece.targetOffset + done);
        if (moved === 0) throw shortSource(piece.sourceOffset + done);
        done += moved;
        report.copiedInKernel += moved;
      }
      return;
    } catch (err) {
      if (!unsupported(err)) throw err;
      state.kernel = false;
    }
  }
  const chunk = Math.min(options.chunkBytes ?? 1 << 20, piece.length - done);
  const buffer = new Uint8Array(chunk);
  while (done < piece.length) {
    const length = Math.min(chunk, piece.length - done);
    const got = await source.read(buffer, 0, length, piece.sourceOffset + done);
    if (got < length) throw shortSource(piece.sourceOffset + done + got);
    await target.write(buffer, 0, length, piece.targetOffset + done);
    done += length;
    report.copied += length;
  }
}

function shortSource(at: number): NodeJS.ErrnoException {
  return Object.assign(new Error(`the source ends at byte ${at}, inside the range to copy`), { code: 'ESHORT' });
}

/** Copies the whole source into a new, empty target: a clone where possible, else a sparse copy. */
export async function cloneOrCopyFile(target: FileHandleLike, source: FileHandleLike, options: Omit<CopyRangeOptions, 'targetIsZero'> = {}): Promise<CopyReport & { wholeFileClone: boolean }> {
  const size = (await source.stat()).size;
  if (options.clone ?? true) {
    const outcome = await cloneFile(target, source);
    if (outcome.cloned) return { cloned: size, copiedInKernel: 0, copied: 0, skipped: 0, wholeFileClone: true };
  }
  await target.truncate(size);
  const report = await copyRange(target, source, { sourceOffset: 0, length: size, targetOffset: 0 }, { ...options, clone: false, targetIsZero: true });
  return { ...report, wholeFileClone: false };
}

export type PunchOutcome = 'punched' | 'zeroed' | 'skipped';

/**
 * Makes [offset, +length) read as zeros and, where the file system can, frees its blocks
 * (fallocate PUNCH_HOLE | KEEP_SIZE; the file length never changes). Fallback: write zeros
 * (`fallback: 'zeros'`, default) or leave the bytes (`'skip'`, for callers to whom freeing space
 * is only an optimisation and the bytes are never read again).
 */
export async function punchHole(handle: FileHandleLike, offset: number, length: number, options: { fallback?: 'zeros' | 'skip'; chunkBytes?: number } = {}): Promise<PunchOutcome> {
  if (length <= 0) return 'punched';
  if (handle.punchHole) {
    try {
      await handle.punchHole(offset, length);
      return 'punched';
    } catch (err) {
      if (!unsupported(err)) throw err;
    }
  }
  if (options.fallback === 'skip') return 'skipped';
  const zeros = new Uint8Array(Math.min(options.chunkBytes ?? 1 << 20, length));
  for (let done = 0; done < length; ) {
    const part = Math.min(zeros.length, length - done);
    await handle.write(zeros, 0, part, offset + done);
    done += part;
  }
  return 'zeroed';
}

/**
 * sync_file_range: starts writeback of [offset, +length) (length 0: to the end) so a later
 * fdatasync has less to wait for, or with `wait` also waits for it. This is not durability (no
 * metadata, no device cache flush): callers still fdatasync once at the end. Fallback: nothing
 * (without `wait`) or fdatasync (with it). Resolves true when sync_file_range ran.
 */
export async function syncRange(handle: FileHandleLike, offset: number, length: number, options: { wait?: boolean } = {}): Promise<boolean> {
  if (handle.syncRange) {
    try {
      await handle.syncRange(offset, length, options.wait ?? false);
      return true;
    } catch (err) {
      if (!unsupported(err)) throw err;
    }
  }
  if (options.wait) await handle.datasync();
  return false;
}
