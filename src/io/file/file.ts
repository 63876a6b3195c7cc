import * as fsp from 'node:fs/promises';

import { fileEndsEarly, fromSystemError } from '../../errors.js';


/**
 * The small file interface everything above the OS goes through, so tests can record, delay,
 * reorder, fail or cut off I/O (see test/io/harness). Positions and lengths are bytes.
 */
export interface FileHandleLike {
  /** Reads up to `length` bytes into `buffer` at `offset`; returns how many (fewer only at EOF). */
  read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<number>;
  /** Writes all `length` bytes or throws. */
  write(buffer: Uint8Array, offset: number, length: number, position: number): Promise<void>;
  /**
   * Blocking variants of read and write, for batch work that moves thousands of small pieces:
   * there a thread-pool round trip costs 5-10 times the system call itself (in-place commit of
   * 9,640 scattered 4 KiB runs: 45 ms blocking against 250-680 ms async). Optional: file systems
   * without them get the async calls. Callers keep each blocking stretch short.
   */
  readSync?(buffer: Uint8Array, offset: number, length: number, position: number): number;
  /**
   * A read answered from the page cache without waiting for the disk (preadv2 RWF_NOWAIT), on the
   * calling thread: a few microseconds against a thread-pool round trip of tens. Returns the
   * bytes read (possibly fewer than asked, 0 at end of file), or undefined when the data is not
   * cached or the call is not available; the caller then reads the usual way. Optional.
   */
  readCached?(buffer: Uint8Array, offset: number, length: number, position: number): number | undefined;
  writeSync?(buffer: Uint8Array, offset: number, length: number, position: number): void;
  datasync(): Promise<void>;
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  stat(): Promise<FileStat>;
  close(): Promise<void>;
  /** The OS file descriptor, when there is one (needed for POSIX record locks). */
  readonly fd?: number;
  /*
   * System calls Node lacks (src/os), optional so injected file systems may leave them out and
   * tests may make them fail. Callers go through the helpers in src/io/file/extents.ts and
   * src/io/file/file-ops.ts, which fall back to plain reads and writes when a method is absent or
   * throws "not supported here" (ENOSYS when the bindings are unavailable).
   */
  /** lseek SEEK_DATA: the first data byte at or after `position`; undefined when only holes follow. */
  seekData?(position: number): number | undefined;
  /** lseek SEEK_HOLE: the first hole byte at or after `position` (the end of the file is one). */
  seekHole?(position: number): number;
  /** FICLONE (no range: this whole file becomes source's) or FICLONERANGE. */
  cloneFrom?(source: FileHandleLike, range?: CloneRange): Promise<void>;
  /** copy_file_range from `source` once; resolves with the bytes copied (0 at source EOF). */
  copyRangeFrom?(source: FileHandleLike, sourceOffset: number, length: number, targetOffset: number): Promise<number>;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and frees its blocks. */
  punchHole?(offset: number, length: number): Promise<void>;
  /** sync_file_range: start writeback of the range, and with `wait` also wait for it. */
  syncRange?(offset: number, length: number, wait: boolean): Promise<void>;
}

/** Source and target byte ranges of a clone; offsets and length a multiple of the block size. */
export interface CloneRange {
  sourceOffset: number;
  length: number;
  targetOffset: number;
}

/**
 * Reads exactly `length` bytes. An I/O error becomes fromSystemError(err, file, action); a short
 * read (the file ends early) becomes the error `onShort(got)` builds, so each caller names its
 * own kind of truncation.
 */
export async function readExactly(
  handle: FileHandleLike,
  file: string,
  action: string,
  target: { buffer: Uint8Array; offset: number; length: number; position: number },
  onShort: (got: number) => Error,
): Promise<void> {
  let got: number;
  try {
    got = await handle.read(target.buffer, target.offset, target.length, target.position);
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
  if (got < target.length) throw onShort(got);
}

/** Reads exactly `length` bytes with the blocking call; errors as readExactly. */
export function readExactlySync(
  handle: Required<Pick<FileHandleLike, 'readSync'>>,
  file: string,
  action: string,
  target: { buffer: Uint8Array; offset: number; length: number; position: number },
  onShort: (got: number) => Error,
): void {
  let got: number;
  try {
    got = handle.readSync(target.buffer, target.offset, target.length, target.position);
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
  if (got < target.length) throw onShort(got);
}

/** Writes all `length` bytes; an I/O error becomes fromSystemError(err, file, action). */
export async function writeAll(
  handle: Pick<FileHandleLike, 'write'>,
  file: string,
  action: string,
  source: { buffer: Uint8Array; offset: number; length: number; position: number },
): Promise<void> {
  try {
    await handle.write(source.buffer, source.offset, source.length, source.position);
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
}

/** writeAll with the blocking call. */
export function writeAllSync(
  handle: Required<Pick<FileHandleLike, 'writeSync'>>,
  file: string,
  action: string,
  source: { buffer: Uint8Array; offset: number; length: number; position: number },
): void {
  try {
    handle.writeSync(source.buffer, source.offset, source.length, source.position);
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
}

export interface FileStat {
  size: number;
  /** Modification time in whole seconds, as the kernel compares it. */
  mtime: number;
  /** Bytes actually allocated on disk. */
  allocated: number;
  /** The file system's preferred I/O size (st_blksize), when known: clones align to it. */
  blockSize?: number;
  kind: 'file' | 'directory' | 'block-device' | 'fifo' | 'other';
  /** Device number for block devices (to find their size). */
  rdev: number;
  /**
   * Device and inode: what names one file, whatever path (symlink, hard link) reaches it. The
   * kernel tells backing files apart this way. Optional: a test file system may leave them out.
   */
  dev?: number;
  ino?: number;
  /** Permission bits (st_mode & 0o7777), when the file system has them: a file rebuilt beside another keeps them. */
  mode?: number;
}

/**
 * 'r' read-only, 'r+' read-write, 'wx' create a new file (fails if it exists; 'wx+' also readable), 'w-direct' write
 * an existing file bypassing the page cache (O_DIRECT): buffers from alignedBuffer(), positions
 * and lengths multiples of DIRECT_IO_ALIGNMENT. File systems without direct I/O refuse it with
 * EINVAL, at open or at the first write.
 */
export type OpenMode = 'r' | 'r+' | 'wx' | 'wx+' | 'w-direct';

/** Alignment (memory, file position, length) that direct I/O needs on any Linux block device. */
export const DIRECT_IO_ALIGNMENT = 4096;

const WASM_PAGE_BYTES = 64 * 1024;

// A global in Node; the ES library types this project compiles against do not declare it.
declare const WebAssembly: { Memory: new (descriptor: { initial: number; maximum: number }) => { buffer: ArrayBuffer } };

/**
 * A zeroed buffer whose memory starts on a page boundary, as direct I/O needs. JavaScript cannot
 * align an ArrayBuffer, but a WebAssembly memory is mapped whole pages at a time.
 */
export function alignedBuffer(bytes: number): Uint8Array {
  const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE_BYTES));
  return new Uint8Array(new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer, 0, bytes);
}

export interface FileSystem {
  open(path: string, mode: OpenMode): Promise<FileHandleLike>;
  stat(path: string): Promise<FileStat>;
  rename(from: string, to: string): Promise<void>;
  link(existing: string, newPath: string): Promise<void>;
  unlink(path: string): Promise<void>;
  realpath(path: string): Promise<string>;
  readdir(path: string): Promise<string[]>;
  /** Makes a rename or link in `dir` durable. */
  syncDirectory(dir: string): Promise<void>;
  /** Sets a file's modification time, seconds. */
  utimes(path: string, atime: number, mtime: number): Promise<void>;
  /** Sets a file's permission bits. */
  chmod(path: string, mode: number): Promise<void>;
  /** Makes a new, empty folder whose name starts with `prefix` (mkdtemp), and returns its path. */
  makeTempFolder(prefix: string): Promise<string>;
  /** Removes a folder and everything in it; nothing there is not an error. */
  removeTree(path: string): Promise<void>;
}

/** "a directory", "a character device or socket": how messages name a kind of file. */
export function describeKind(kind: FileStat['kind']): string {
  switch (kind) {
    case 'file':
      return 'a regular file';
    case 'directory':
      return 'a directory';
    case 'block-device':
      return 'a block device';
    case 'fifo':
      return 'a FIFO (named pipe)';
    default:
      return 'a character device, socket or other special file';
  }
}

/** What the OS extras throw where they cannot run: ENOSYS, which every caller treats as "fall back". */
export function unavailableError(syscall: string, why: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`ENOSYS: ${syscall} unavailable: ${why}`);
  err.code = 'ENOSYS';
  err.syscall = syscall;
  return err;
}

/** Size of a block device, from sysfs (stat reports 0 for devices). */
export async function blockDeviceSize(rdev: number): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  const sectors = await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  return Number(sectors.trim()) * 512;
}

/** The whole of a (small) file's contents, read through `fs`. */
export async function readWholeFile(fs: FileSystem, path: string): Promise<Uint8Array> {
  const handle = await fs.open(path, 'r');
  try {
    const size = (await handle.stat()).size;
    const bytes = new Uint8Array(size);
    await readExactly(handle, path, 'read', { buffer: bytes, offset: 0, length: size, position: 0 }, (got) => fileEndsEarly(path, 0, got, size, 'the file'));
    return bytes;
  } finally {
    await handle.close();
  }
}

/** Size in bytes of a regular file or block device. */
export async function sizeOf(stat: FileStat): Promise<number> {
  return stat.kind === 'block-device' ? blockDeviceSize(stat.rdev) : stat.size;
}
