import type { FileHandleLike } from './file.js';

/** Bytes [start, end) of a file that may hold data (everything outside reads as zeros). */
export interface DataExtent {
  start: number;
  end: number;
}

/**
 * Error codes that mean "this handle or file system cannot tell holes from data": the answer is
 * then "all of it is data", which is always true in effect (a hole reads as zeros either way).
 */
const cannotTell = new Set(['ENOSYS', 'EINVAL', 'EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EOVERFLOW']);

/**
 * The data extents of [start, end), in order, with SEEK_DATA/SEEK_HOLE; holes are skipped, so
 * scanning a nearly empty sparse file costs what its data costs. Invariant: every byte in
 * [start, end) that is not a hole lies in a yielded extent (extents may include holes — file
 * systems may report a hole as data — but never leave data out). Without the calls (handle lacks
 * them, bindings unavailable, file system cannot tell) the rest of the range is one extent.
 * Other errors (EIO, EBADF) propagate.
 */
export async function* dataExtents(handle: FileHandleLike, start: number, end: number): AsyncGenerator<DataExtent> {
  let position = start;
  while (position < end) {
    let dataAt: number | undefined;
    let holeAt: number;
    try {
      if (!handle.seekData || !handle.seekHole) throw Object.assign(new Error('no SEEK_DATA'), { code: 'ENOSYS' });
      dataAt = handle.seekData(position);
      if (dataAt === undefined || dataAt >= end) return;
      holeAt = handle.seekHole(dataAt);
    } catch (err) {
      if (!cannotTell.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
      yield { start: position, end };
      return;
    }
    const extentEnd = Math.min(holeAt, end);
    // A file system that answers nonsense (hole before data) must not loop forever.
    if (extentEnd <= dataAt) {
      yield { start: dataAt, end };
      return;
    }
    yield { start: dataAt, end: extentEnd };
    position = extentEnd;
  }
}

/** True when [start, end) holds no data (all holes), as far as the file system can tell. */
export async function isHole(handle: FileHandleLike, start: number, end: number): Promise<boolean> {
  for await (const _ of dataExtents(handle, start, end)) return false;
  return true;
}
