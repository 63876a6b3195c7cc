/**
 * The system calls Node lacks, bound from the C library with koffi: POSIX record locks (fcntl),
 * SEEK_DATA/SEEK_HOLE, FICLONE/FICLONERANGE, copy_file_range, fallocate, sync_file_range,
 * preadv2(RWF_NOWAIT) for reads answered from the page cache without blocking, and sendfile and
 * dup for the NBD server's zero-copy replies.
 *
 * Invariant: the bindings are used only where their constants and struct layouts were checked
 * (Linux, glibc or musl, on x86-64 and arm64, where off_t is 64 bits and both use the generic fcntl and
 * ioctl numbering); anywhere else, or when koffi or libc cannot load, `osCalls()` is undefined
 * with the reason in `osCallsUnavailable()`, and every caller has a portable fallback. Failures
 * are thrown as Node-style system errors (`code` 'EAGAIN', `errno`, `syscall`), the shape the
 * rest of the code already handles. Loading is lazy: commands that need none of this never load
 * koffi.
 */
import { createRequire } from 'node:module';
import * as os from 'node:os';

/** fcntl commands (asm-generic/fcntl.h, the same on x86-64 and arm64). */
export const F_GETLK = 5;
export const F_SETLK = 6;
export const F_SETLKW = 7;
/** Open-file-description locks (Linux 3.15+): owned by the open file, not the process. */
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_OFD_SETLKW = 38;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
export const SEEK_SET = 0;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
/** _IOW(0x94, 9, int) and _IOW(0x94, 13, struct file_clone_range) in the generic ioctl encoding. */
export const FICLONE = 0x40049409;
export const FICLONERANGE = 0x4020940d;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const SYNC_FILE_RANGE_WAIT_BEFORE = 1;
export const SYNC_FILE_RANGE_WRITE = 2;
export const SYNC_FILE_RANGE_WAIT_AFTER = 4;
export const RWF_NOWAIT = 0x00000008;
/** Largest read readCached answers (the size of its native buffer). */
export const CACHED_READ_MAX = 64 << 10;

/**
 * struct flock on 64-bit Linux: short l_type @0, short l_whence @2, off_t l_start @8,
 * off_t l_len @16, pid_t l_pid @24, size 32 (padded to 8). Checked against koffi's layout at
 * load time, so a mismatch disables the bindings instead of corrupting memory.
 */
export const FLOCK_LAYOUT = { size: 32, l_type: 0, l_whence: 2, l_start: 8, l_len: 16, l_pid: 24 } as const;
/** struct file_clone_range: s64 src_fd @0, u64 src_offset @8, u64 src_length @16, u64 dest_offset @24. */
export const FILE_CLONE_RANGE_LAYOUT = { size: 32, src_fd: 0, src_offset: 8, src_length: 16, dest_offset: 24 } as const;
/** struct iovec: void *iov_base @0, size_t iov_len @8, size 16. */
export const IOVEC_LAYOUT = { size: 16, iov_base: 0, iov_len: 8 } as const;

export type LockType = 'read' | 'write' | 'unlock';

export interface LockQuery {
  /** 'unlock' when nothing conflicts. */
  type: LockType;
  /** Process holding the conflicting lock (-1 for an OFD lock). */
  pid: number;
}

/** The bound calls. Each throws a Node-style system error on failure. */
export interface OsCalls {
  /** fcntl(fd, F_SETLK or F_OFD_SETLK) on [start, start+len) (len 0: to EOF, forever). */
  setLock(fd: number, type: LockType, options?: { ofd?: boolean; start?: number; len?: number }): void;
  /** fcntl(fd, F_GETLK): who would block a lock of `type` on the whole file. */
  getLock(fd: number, type: Exclude<LockType, 'unlock'>, options?: { ofd?: boolean }): LockQuery;
  /** lseek(fd, position, SEEK_DATA); undefined when no data follows (ENXIO). */
  seekData(fd: number, position: number): number | undefined;
  /** lseek(fd, position, SEEK_HOLE); the end of the file counts as a hole. */
  seekHole(fd: number, position: number): number;
  /** lseek(fd, position, SEEK_SET): moves the descriptor's own offset (what write() uses). */
  seekSet(fd: number, position: number): number;
  /** ioctl(target, FICLONE, source): target shares all of source's extents. */
  clone(targetFd: number, sourceFd: number): Promise<void>;
  /** ioctl(target, FICLONERANGE): offsets and length block-aligned (length may reach source EOF). */
  cloneRange(targetFd: number, sourceFd: number, sourceOffset: number, length: number, targetOffset: number): Promise<void>;
  /** copy_file_range once; returns the bytes copied (fewer than asked at EOF or by choice). */
  copyFileRange(sourceFd: number, sourceOffset: number, targetFd: number, targetOffset: number, length: number): Promise<number>;
  /** fallocate(fd, mode, offset, length). */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  /** sync_file_range(fd, offset, length, flags). */
  syncFileRange(fd: number, offset: number, length: number, flags: number): Promise<void>;
  /**
   * sendfile(out, in, &position, length) once, on the calling thread: the bytes sent (fewer than
   * asked when the socket's buffer fills; 0 at the end of `inFd`), or undefined when the socket
   * (non-blocking) cannot take any now (EAGAIN).
   */
  sendFile(outFd: number, inFd: number, position: number, length: number): number | undefined;
  /**
   * preadv2(fd, RWF_NOWAIT) of at most CACHED_READ_MAX bytes into `buffer` at `offset`, on the
   * calling thread: the bytes read when (some of) the data is in the page cache, 0 at end of file,
   * undefined when reading would wait for the disk (EAGAIN) or the file system cannot say (then
   * the caller reads the usual way). Never blocks on I/O.
   */
  readCached(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number | undefined;
  /** dup(fd): a descriptor of the same open file, closed only by closeFd. */
  dup(fd: number): number;
  /** close(fd), for descriptors from dup. */
  closeFd(fd: number): void;
}

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(os.constants.errno)) if (!errnoNames.has(value)) errnoNames.set(value, name);
// Linux aliases: ENOTSUP is EOPNOTSUPP and EWOULDBLOCK is EAGAIN; keep the names callers test.
if (os.constants.errno.EOPNOTSUPP !== undefined) errnoNames.set(os.constants.errno.EOPNOTSUPP, 'EOPNOTSUPP');
if (os.constants.errno.EAGAIN !== undefined) errnoNames.set(os.constants.errno.EAGAIN, 'EAGAIN');

/** A Node-style system error for errno `errno` from `syscall`. */
export function systemError(errno: number, syscall: string): NodeJS.ErrnoException {
  const code = errnoNames.get(errno) ?? `E${errno}`;
  const err: NodeJS.ErrnoException = new Error(`${code}: ${syscall} failed (errno ${errno})`);
  err.code = code;
  err.errno = -errno;
  err.syscall = syscall;
  return err;
}

/** What the bindings were checked for. */
const checkedArchitectures = new Set(['x64', 'arm64']);

type Koffi = typeof import('koffi');

let loaded: { calls: OsCalls } | { reason: string } | undefined;
let override: { calls: OsCalls | undefined; reason: string } | undefined;

/** Offsets and size of a koffi struct type, for comparing with the expected layout. */
function layoutOf(koffi: Koffi, type: ReturnType<Koffi['struct']>, fields: string[]): Record<string, number> {
  const layout: Record<string, number> = { size: koffi.sizeof(type) };
  for (const field of fields) layout[field] = koffi.offsetof(type, field);
  return layout;
}

function sameLayout(actual: Record<string, number>, expected: Record<string, number>): boolean {
  return Object.entries(expected).every(([key, value]) => actual[key] === value);
}

/** The koffi struct layouts as bound here (for the layout test). */
export function boundLayouts(): { flock: Record<string, number>; fileCloneRange: Record<string, number>; iovec: Record<string, number> } | undefined {
  const koffi = loadKoffi();
  if (typeof koffi === 'string') return undefined;
  const { flock, fileCloneRange, iovec } = structTypes(koffi);
  return {
    iovec: layoutOf(koffi, iovec, ['iov_base', 'iov_len']),
    flock: layoutOf(koffi, flock, ['l_type', 'l_whence', 'l_start', 'l_len', 'l_pid']),
    fileCloneRange: layoutOf(koffi, fileCloneRange, ['src_fd', 'src_offset', 'src_length', 'dest_offset']),
  };
}

let koffiModule: Koffi | string | undefined;

function loadKoffi(): Koffi | string {
  if (koffiModule !== undefined) return koffiModule;
  try {
    const require = createRequire(import.meta.url);
    koffiModule = require('koffi') as Koffi;
  } catch (err) {
    koffiModule = `koffi did not load (${firstLine(err)})`;
  }
  return koffiModule;
}

let structs:
  | { flock: ReturnType<Koffi['struct']>; fileCloneRange: ReturnType<Koffi['struct']>; iovec: ReturnType<Koffi['struct']> }
  | undefined;

function structTypes(koffi: Koffi) {
  structs ??= {
    flock: koffi.struct('ubdcow_flock', { l_type: 'short', l_whence: 'short', l_start: 'int64_t', l_len: 'int64_t', l_pid: 'int' }),
    fileCloneRange: koffi.struct('ubdcow_file_clone_range', { src_fd: 'int64_t', src_offset: 'uint64_t', src_length: 'uint64_t', dest_offset: 'uint64_t' }),
    iovec: koffi.struct('ubdcow_iovec', { iov_base: 'void *', iov_len: 'size_t' }),
  };
  return structs;
}

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n')[0]!;
}

function bind(): { calls: OsCalls } | { reason: string } {
  if (process.env.UBDCOW_NO_OS_CALLS) return { reason: 'disabled by UBDCOW_NO_OS_CALLS' };
  if (process.platform !== 'linux') return { reason: `not bound on ${process.platform} (Linux only)` };
  if (!checkedArchitectures.has(process.arch)) return { reason: `struct layouts not checked on ${process.arch}` };
  const koffi = loadKoffi();
  if (typeof koffi === 'string') return { reason: koffi };
  try {
    // glibc by name; elsewhere (musl) the symbols node itself links against.
    let libc: ReturnType<Koffi['load']>;
    try {
      libc = koffi.load('libc.so.6');
    } catch {
      libc = koffi.load(null);
    }
    const { flock, fileCloneRange, iovec } = structTypes(koffi);
    if (!sameLayout(layoutOf(koffi, flock, ['l_type', 'l_whence', 'l_start', 'l_len', 'l_pid']), FLOCK_LAYOUT)) {
      return { reason: 'struct flock layout differs from the checked one' };
    }
    if (!sameLayout(layoutOf(koffi, fileCloneRange, ['src_fd', 'src_offset', 'src_length', 'dest_offset']), FILE_CLONE_RANGE_LAYOUT)) {
      return { reason: 'struct file_clone_range layout differs from the checked one' };
    }
    if (!sameLayout(layoutOf(koffi, iovec, ['iov_base', 'iov_len']), IOVEC_LAYOUT)) {
      return { reason: 'struct iovec layout differs from the checked one' };
    }
    const fcntl = libc.func('int fcntl(int fd, int cmd, ...)');
    const lseek = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const ioctl = libc.func('int ioctl(int fd, unsigned long request, ...)');
    const copyFileRange = libc.func('int64_t copy_file_range(int fd_in, _Inout_ int64_t *off_in, int fd_out, _Inout_ int64_t *off_out, size_t len, unsigned int flags)');
    const fallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    const syncFileRange = libc.func('int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)');
    const sendfile = libc.func('int64_t sendfile(int out_fd, int in_fd, _Inout_ int64_t *offset, size_t count)');
    const preadv2 = libc.func('int64_t preadv2(int fd, const ubdcow_iovec *iov, int iovcnt, int64_t offset, int flags)');
    // preadv2 reads into native memory (an iovec cannot point into a JS buffer that may move);
    // the bytes are then copied out through a view of it: one 64 KiB copy at most.
    // Runtimes that forbid external buffers (koffi.view) just go without the cached reads.
    let native: { pointer: unknown; view: Uint8Array } | undefined;
    try {
      const pointer = koffi.alloc('uint8_t', CACHED_READ_MAX);
      native = { pointer, view: new Uint8Array(koffi.view(pointer, CACHED_READ_MAX)) };
    } catch {
      native = undefined;
    }
    const dup = libc.func('int dup(int fd)');
    const close = libc.func('int close(int fd)');
    const flockPtr = koffi.pointer(flock);
    const flockInOut = koffi.inout(flockPtr);
    const cloneRangePtr = koffi.pointer(fileCloneRange);

    /** Runs a blocking call on the thread pool; koffi hands its errno to the callback's thread. */
    const offThread = <T extends number>(fn: { async: (...args: unknown[]) => void }, syscall: string, ...args: unknown[]): Promise<T> =>
      new Promise((resolve, reject) => {
        fn.async(...args, (err: unknown, result: T) => {
          if (err) reject(err);
          else if (result < 0) reject(systemError(koffi.errno(), syscall));
          else resolve(result);
        });
      });
    const lockTypes: Record<LockType, number> = { read: F_RDLCK, write: F_WRLCK, unlock: F_UNLCK };

    const calls: OsCalls = {
      setLock(fd, type, options = {}) {
        const lock = { l_type: lockTypes[type], l_whence: SEEK_SET, l_start: options.start ?? 0, l_len: options.len ?? 0, l_pid: 0 };
        if (fcntl(fd, options.ofd ? F_OFD_SETLK : F_SETLK, flockPtr, lock) < 0) throw systemError(koffi.errno(), 'fcntl');
      },
      getLock(fd, type, options = {}) {
        const lock = { l_type: lockTypes[type], l_whence: SEEK_SET, l_start: 0, l_len: 0, l_pid: 0 };
        if (fcntl(fd, options.ofd ? F_OFD_GETLK : F_GETLK, flockInOut, lock) < 0) throw systemError(koffi.errno(), 'fcntl');
        const found: LockType = lock.l_type === F_RDLCK ? 'read' : lock.l_type === F_WRLCK ? 'write' : 'unlock';
        return { type: found, pid: lock.l_pid };
      },
      seekData(fd, position) {
        const at = Number(lseek(fd, position, SEEK_DATA));
        if (at >= 0) return at;
        const errno = koffi.errno();
        if (errnoNames.get(errno) === 'ENXIO') return undefined;
        throw systemError(errno, 'lseek');
      },
      seekSet(fd, position) {
        const at = Number(lseek(fd, position, SEEK_SET));
        if (at < 0) throw systemError(koffi.errno(), 'lseek');
        return at;
      },
      seekHole(fd, position) {
        const at = Number(lseek(fd, position, SEEK_HOLE));
        if (at < 0) throw systemError(koffi.errno(), 'lseek');
        return at;
      },
      // ioctl is variadic, and koffi runs variadic calls on the calling thread only; a clone
      // takes milliseconds even for gigabytes (it copies extent references, not data).
      async clone(targetFd, sourceFd) {
        if (ioctl(targetFd, FICLONE, 'int', sourceFd) < 0) throw systemError(koffi.errno(), 'ioctl');
      },
      async cloneRange(targetFd, sourceFd, sourceOffset, length, targetOffset) {
        const range = { src_fd: sourceFd, src_offset: sourceOffset, src_length: length, dest_offset: targetOffset };
        if (ioctl(targetFd, FICLONERANGE, cloneRangePtr, range) < 0) throw systemError(koffi.errno(), 'ioctl');
      },
      async copyFileRange(sourceFd, sourceOffset, targetFd, targetOffset, length) {
        return Number(await offThread(copyFileRange, 'copy_file_range', sourceFd, [sourceOffset], targetFd, [targetOffset], length, 0));
      },
      async fallocate(fd, mode, offset, length) {
        await offThread(fallocate, 'fallocate', fd, mode, offset, length);
      },
      async syncFileRange(fd, offset, length, flags) {
        await offThread(syncFileRange, 'sync_file_range', fd, offset, length, flags);
      },
      sendFile(outFd, inFd, position, length) {
        const sent = Number(sendfile(outFd, inFd, [position], length));
        if (sent >= 0) return sent;
        const errno = koffi.errno();
        if (errnoNames.get(errno) === 'EAGAIN') return undefined;
        throw systemError(errno, 'sendfile');
      },
      readCached(fd, buffer, offset, length, position) {
        if (!native) return undefined;
        const wanted = Math.min(length, CACHED_READ_MAX);
        const got = Number(preadv2(fd, { iov_base: native.pointer, iov_len: wanted }, 1, position, RWF_NOWAIT));
        if (got < 0) {
          const code = errnoNames.get(koffi.errno());
          if (code === 'EAGAIN' || code === 'EOPNOTSUPP' || code === 'EINVAL' || code === 'ENOSYS') return undefined;
          throw systemError(koffi.errno(), 'preadv2');
        }
        buffer.set(native.view.subarray(0, got), offset);
        return got;
      },
      dup(fd) {
        const copy = dup(fd);
        if (copy < 0) throw systemError(koffi.errno(), 'dup');
        return copy;
      },
      closeFd(fd) {
        if (close(fd) < 0) throw systemError(koffi.errno(), 'close');
      },
    };
    return { calls };
  } catch (err) {
    return { reason: `libc bindings did not load (${firstLine(err)})` };
  }
}

/** The bound calls, or undefined where they are not available (see osCallsUnavailable). */
export function osCalls(): OsCalls | undefined {
  if (override) return override.calls;
  loaded ??= bind();
  return 'calls' in loaded ? loaded.calls : undefined;
}

/** Why osCalls() is undefined, or undefined when it is not. */
export function osCallsUnavailable(): string | undefined {
  if (override) return override.calls ? undefined : override.reason;
  loaded ??= bind();
  return 'reason' in loaded ? loaded.reason : undefined;
}

/**
 * Replaces the bindings (tests: `undefined` forces every fallback; a wrapped OsCalls injects
 * failures). `reset` restores the real ones.
 */
export function overrideOsCalls(calls: OsCalls | undefined, reason = 'disabled for a test'): { reset(): void } {
  const previous = override;
  override = { calls, reason };
  return {
    reset() {
      override = previous;
    },
  };
}
