import { lock, unlock } from 'os-lock';
import { UbdcowError, fromSystemError } from '../errors.js';
import type { FileHandleLike } from './file.js';

export interface CowLockOptions {
  /**
   * A write lock, the kind the UML kernel takes (needs the file open read-write). A read lock is
   * enough to detect a running UML and to keep one from starting while the file is read.
   */
  exclusive?: boolean;
}

/** errno codes fcntl(F_SETLK) uses for "someone else holds a conflicting lock". */
const heldElsewhere = new Set(['EACCES', 'EAGAIN', 'EBUSY']);

/**
 * Takes a POSIX record lock on the whole COW file (start 0, length 0 = to the end, as the kernel
 * does), refusing at once when another process holds a conflicting one. The lock lasts until the
 * handle is closed. Handles without a descriptor (injected test file systems) are not locked.
 *
 * POSIX locks belong to the process and vanish when it closes ANY descriptor of the file, so
 * callers must not open the COW file a second time while they rely on the lock.
 */
export async function lockCowFile(file: FileHandleLike, path: string, options: CowLockOptions = {}): Promise<void> {
  if (file.fd === undefined) return;
  try {
    await lock(file.fd, 0, 0, { exclusive: options.exclusive ?? true, immediate: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code && heldElsewhere.has(code)) {
      throw new UbdcowError(
        'locked',
        `${path}: in use by another process (a running UML holds a lock on it; see /proc/locks)`,
        { file: path, cause: err },
      );
    }
    throw fromSystemError(err, path, 'lock');
  }
}

/** Releases a lock taken by lockCowFile (closing the handle does the same). */
export async function unlockCowFile(file: FileHandleLike, path: string): Promise<void> {
  if (file.fd === undefined) return;
  try {
    await unlock(file.fd, 0, 0);
  } catch (err) {
    throw fromSystemError(err, path, 'unlock');
  }
}

/**
 * True when another process holds a lock that conflicts with the one asked for. Probing takes the
 * lock and drops it again at once, so it must not be used on a handle that already holds one.
 */
export async function isCowFileLocked(file: FileHandleLike, path: string, options: CowLockOptions = {}): Promise<boolean> {
  try {
    await lockCowFile(file, path, options);
  } catch (err) {
    if (err instanceof UbdcowError && err.code === 'locked') return true;
    throw err;
  }
  await unlockCowFile(file, path);
  return false;
}
