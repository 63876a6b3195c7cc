import * as fs from 'node:fs';
import { UbdcowError, fromSystemError } from '../../errors.js';
import { osCalls, osCallsUnavailable } from '../../os/libc.js';
import type { FileHandleLike } from '../file/index.js';
import { describeLockHolder } from './lock-holder.js';
import { type OptionKeys, checkOptions } from '../../options.js';

export interface CowLockOptions {
  /**
   * A write lock, the kind the UML kernel takes (needs the file open read-write). A read lock is
   * enough to detect a running UML and to keep one from starting while the file is read.
   */
  exclusive?: boolean;
}

const lockOptionKeys: OptionKeys<CowLockOptions> = { exclusive: true };

/** errno codes fcntl(F_SETLK) uses for "someone else holds a conflicting lock". */
const heldElsewhere = new Set(['EACCES', 'EAGAIN', 'EBUSY']);

/**
 * The refusal, naming the holder when its pid is known: a UML keeps the wording users and tests
 * know (plus the pid); another ubdcow (serve, commit...) or any other program is named as such.
 */
function lockedError(path: string, holderPid: number | undefined, cause?: unknown): UbdcowError {
  const holder = holderPid !== undefined && holderPid > 0 ? describeLockHolder(holderPid) : undefined;
  let message: string;
  if (!holder) message = `${path}: in use by another process (a running UML holds a lock on it; see /proc/locks)`;
  else if (holder.kind === 'uml') message = `${path}: in use by another process (a running UML holds a lock on it, pid ${holder.pid}; see /proc/locks)`;
  else message = `${path}: in use by another process: held by ${holder.name} (pid ${holder.pid}); stop it or wait until it ends, then retry; see /proc/locks`;
  return new UbdcowError('locked', message, { file: path, cause });
}

/** The pid fcntl(F_GETLK) names as the holder of a conflicting lock, if any (-1 for OFD locks). */
function conflictingPid(fd: number, exclusive: boolean): number | undefined {
  try {
    const found = osCalls()?.getLock(fd, exclusive ? 'write' : 'read');
    return found && found.type !== 'unlock' ? found.pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Takes a POSIX record lock on the whole COW file (start 0, length 0 = to the end), the lock
 * UML's os_lock_file takes with fcntl(F_SETLK), refusing at once when another process holds a
 * conflicting one. The lock lasts until the handle is closed. Handles without a descriptor
 * (injected test file systems) are not locked.
 *
 * POSIX locks belong to the process and vanish when it closes ANY descriptor of the file, so
 * callers must not open the COW file a second time while they rely on the lock.
 *
 * Where fcntl cannot be called (see src/os), holders are looked up in /proc/locks instead: a file
 * someone holds is still refused, but nothing keeps a UML from starting later, which is said once
 * in a one-line warning.
 */
export async function lockCowFile(file: FileHandleLike, path: string, options: CowLockOptions = {}): Promise<void> {
  checkOptions('lockCowFile', options, lockOptionKeys);
  if (file.fd === undefined) return;
  const exclusive = options.exclusive ?? true;
  const calls = osCalls();
  if (!calls) {
    const holder = await heldInProcLocks(file.fd, path, exclusive);
    if (holder) throw lockedError(path, holder.pid);
    warnUnlocked(path);
    return;
  }
  try {
    calls.setLock(file.fd, exclusive ? 'write' : 'read');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code && heldElsewhere.has(code)) throw lockedError(path, conflictingPid(file.fd, exclusive), err);
    throw fromSystemError(err, path, 'lock');
  }
}

/** Releases a lock taken by lockCowFile (closing the handle does the same). */
export async function unlockCowFile(file: FileHandleLike, path: string): Promise<void> {
  if (file.fd === undefined) return;
  const calls = osCalls();
  if (!calls) return;
  try {
    calls.setLock(file.fd, 'unlock');
  } catch (err) {
    throw fromSystemError(err, path, 'unlock');
  }
}

/**
 * True when another process holds a lock that conflicts with the one asked for. Probing takes the
 * lock and drops it again at once, so it must not be used on a handle that already holds one.
 */
export async function isCowFileLocked(file: FileHandleLike, path: string, options: CowLockOptions = {}): Promise<boolean> {
  checkOptions('isCowFileLocked', options, lockOptionKeys);
  // Without fcntl a probe only looks; it takes nothing, so there is nothing to warn about.
  if (file.fd !== undefined && !osCalls()) return (await heldInProcLocks(file.fd, path, options.exclusive ?? true)) !== undefined;
  try {
    await lockCowFile(file, path, options);
  } catch (err) {
    if (err instanceof UbdcowError && err.code === 'locked') return true;
    throw err;
  }
  await unlockCowFile(file, path);
  return false;
}

let warned = false;

function warnUnlocked(path: string): void {
  if (warned) return;
  warned = true;
  process.stderr.write(`ubdcow: warning: ${path}: no other process holds it, but it cannot be locked here (${osCallsUnavailable()}), so a UML started now would not be kept out\n`);
}

/** A lock line of /proc/locks, the fields the fallback needs. */
export interface ProcLock {
  kind: 'POSIX' | 'OFDLCK' | 'FLOCK' | string;
  access: 'READ' | 'WRITE' | string;
  pid: number;
  /** "major:minor:inode", major and minor in hex as the kernel prints them. */
  id: string;
}

/** Parses /proc/locks text; lines of blocked waiters ("->") are left out. */
export function parseProcLocks(text: string): ProcLock[] {
  const locks: ProcLock[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 6 || fields[1] === '->') continue;
    locks.push({ kind: fields[1]!, access: fields[3]!, pid: Number(fields[4]), id: fields[5]! });
  }
  return locks;
}

/** The /proc/locks id of a file from its stat: st_dev split as the kernel's MAJOR/MINOR print it. */
export function procLocksId(dev: number, ino: number | bigint): string {
  const major = Math.floor(dev / 256) & 0xfff;
  const minor = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${ino}`;
}

/** Where the fallback reads locks from (tests point it elsewhere). */
export const procLocksSource = { path: '/proc/locks' };

/**
 * A lock another process holds on the file that conflicts with ours: any POSIX or OFD lock for a
 * write lock, a write lock for a read lock (BSD flock locks never conflict with fcntl ones on
 * Linux). Without /proc/locks nothing can be known, and the answer is none.
 */
async function heldInProcLocks(fd: number, path: string, exclusive: boolean): Promise<ProcLock | undefined> {
  let text: string;
  let id: string;
  try {
    const stat = fs.fstatSync(fd, { bigint: true });
    id = procLocksId(Number(stat.dev), stat.ino);
    text = await fs.promises.readFile(procLocksSource.path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EBADF') throw fromSystemError(err, path, 'lock');
    return undefined;
  }
  return parseProcLocks(text).find(
    (lock) => lock.id === id && lock.pid !== process.pid && (lock.kind === 'POSIX' || lock.kind === 'OFDLCK') && (exclusive || lock.access === 'WRITE'),
  );
}
