/**
 * The FileSystem the library uses unless told otherwise: Node's fs, with the OS extras (holes,
 * clones, hole punching, range sync) from src/os where the system has them (ENOSYS elsewhere).
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { type CloneRange, type FileHandleLike, type FileStat, type FileSystem, type OpenMode, unavailableError } from './file.js';
import { type OsCalls, osCalls, osCallsUnavailable, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE } from '../../os/libc.js';

function nodeOpenFlags(mode: OpenMode): string | number {
  return mode === 'w-direct' ? fs.constants.O_WRONLY | fs.constants.O_DIRECT : mode;
}

function kindOf(stats: fs.Stats): FileStat['kind'] {
  if (stats.isFile()) return 'file';
  if (stats.isDirectory()) return 'directory';
  if (stats.isBlockDevice()) return 'block-device';
  if (stats.isFIFO()) return 'fifo';
  return 'other';
}

function toFileStat(stats: fs.Stats): FileStat {
  return {
    size: stats.size,
    mtime: Math.floor(stats.mtimeMs / 1000),
    allocated: stats.blocks * 512,
    blockSize: stats.blksize,
    kind: kindOf(stats),
    rdev: stats.rdev,
    dev: stats.dev,
    ino: stats.ino,
    mode: stats.mode & 0o7777,
  };
}

type IoCallback = (err: NodeJS.ErrnoException | null, bytes: number) => void;

/** What FileHandle methods reject with once the handle is closed. */
function fileClosedError(syscall: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error('file closed');
  err.code = 'EBADF';
  err.syscall = syscall;
  return err;
}

/**
 * Reads and writes go straight to fs.read/fs.write on the descriptor with callbacks: on this hot
 * path FileHandle's promise machinery costs about twice the native time per call (measured in
 * bench/engine.ts). Everything else uses the FileHandle. As FileHandle does, close() waits for
 * the reads and writes in flight; after it is called new ones are refused, so a descriptor number
 * the OS has reused is never touched.
 */
class NodeFileHandle implements FileHandleLike {
  private inFlight = 0;
  private closing: Promise<void> | undefined;
  private idle: (() => void) | undefined;

  constructor(private readonly handle: fsp.FileHandle) {}

  get fd(): number {
    return this.handle.fd;
  }

  read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    return this.transfer('read', buffer, offset, length, position);
  }

  async write(buffer: Uint8Array, offset: number, length: number, position: number): Promise<void> {
    await this.transfer('write', buffer, offset, length, position);
  }

  /** Repeats the call until `length` bytes are moved (reads stop early at EOF); resolves with the count. */
  private transfer(syscall: 'read' | 'write', buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    if (this.closing) return Promise.reject(fileClosedError(syscall));
    if (length === 0) return Promise.resolve(0);
    const fd = this.handle.fd;
    this.inFlight++;
    return new Promise<number>((resolve, reject) => {
      let done = 0;
      const next: IoCallback = (err, bytes) => {
        if (err === null) {
          done += bytes;
          // A read of 0 bytes is EOF; a write of 0 bytes is retried, as the FileHandle loop did.
          if (done < length && (bytes > 0 || syscall === 'write')) {
            this.issue(syscall, fd, buffer, offset + done, length - done, position + done, next, reject);
            return;
          }
        }
        this.settled();
        if (err === null) resolve(done);
        else reject(err);
      };
      this.issue(syscall, fd, buffer, offset, length, position, next, reject);
    });
  }

  private issue(syscall: 'read' | 'write', fd: number, buffer: Uint8Array, offset: number, length: number, position: number, callback: IoCallback, reject: (err: unknown) => void): void {
    try {
      if (syscall === 'read') fs.read(fd, buffer, offset, length, position, callback);
      else fs.write(fd, buffer, offset, length, position, callback);
    } catch (err) {
      // Argument errors are thrown synchronously by fs; FileHandle rejected with them.
      this.settled();
      reject(err);
    }
  }

  readSync(buffer: Uint8Array, offset: number, length: number, position: number): number {
    if (this.closing) throw fileClosedError('read');
    let done = 0;
    while (done < length) {
      const bytes = fs.readSync(this.handle.fd, buffer, offset + done, length - done, position + done);
      if (bytes === 0) break;
      done += bytes;
    }
    return done;
  }

  readCached(buffer: Uint8Array, offset: number, length: number, position: number): number | undefined {
    if (this.closing) return undefined;
    return osCalls()?.readCached(this.handle.fd, buffer, offset, length, position);
  }

  writeSync(buffer: Uint8Array, offset: number, length: number, position: number): void {
    if (this.closing) throw fileClosedError('write');
    for (let done = 0; done < length; ) {
      done += fs.writeSync(this.handle.fd, buffer, offset + done, length - done, position + done);
    }
  }

  /** The bindings, or an ENOSYS error saying why there are none (callers fall back on it). */
  private os(syscall: string): OsCalls {
    if (this.closing) throw fileClosedError(syscall);
    const calls = osCalls();
    if (!calls) throw unavailableError(syscall, osCallsUnavailable() ?? 'no bindings');
    return calls;
  }

  seekData(position: number): number | undefined {
    return this.os('lseek').seekData(this.handle.fd, position);
  }

  seekHole(position: number): number {
    return this.os('lseek').seekHole(this.handle.fd, position);
  }

  async cloneFrom(source: FileHandleLike, range?: CloneRange): Promise<void> {
    const calls = this.os('ioctl');
    if (source.fd === undefined) throw unavailableError('ioctl', 'the source has no descriptor');
    if (range) await calls.cloneRange(this.handle.fd, source.fd, range.sourceOffset, range.length, range.targetOffset);
    else await calls.clone(this.handle.fd, source.fd);
  }

  async copyRangeFrom(source: FileHandleLike, sourceOffset: number, length: number, targetOffset: number): Promise<number> {
    const calls = this.os('copy_file_range');
    if (source.fd === undefined) throw unavailableError('copy_file_range', 'the source has no descriptor');
    return calls.copyFileRange(source.fd, sourceOffset, this.handle.fd, targetOffset, length);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    await this.os('fallocate').fallocate(this.handle.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }

  async syncRange(offset: number, length: number, wait: boolean): Promise<void> {
    const flags = wait ? SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER : SYNC_FILE_RANGE_WRITE;
    await this.os('sync_file_range').syncFileRange(this.handle.fd, offset, length, flags);
  }

  private settled(): void {
    this.inFlight--;
    if (this.inFlight === 0) this.idle?.();
  }

  datasync(): Promise<void> {
    return this.handle.datasync();
  }

  sync(): Promise<void> {
    return this.handle.sync();
  }

  truncate(length: number): Promise<void> {
    return this.handle.truncate(length);
  }

  async stat(): Promise<FileStat> {
    return toFileStat(await this.handle.stat());
  }

  close(): Promise<void> {
    this.closing ??= this.closeWhenIdle();
    return this.closing;
  }

  private async closeWhenIdle(): Promise<void> {
    if (this.inFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve));
    await this.handle.close();
  }
}

export const nodeFileSystem: FileSystem = {
  async open(path, mode) {
    return new NodeFileHandle(await fsp.open(path, nodeOpenFlags(mode), 0o644));
  },
  async stat(path) {
    return toFileStat(await fsp.stat(path));
  },
  rename: (from, to) => fsp.rename(from, to),
  link: (existing, newPath) => fsp.link(existing, newPath),
  unlink: (path) => fsp.unlink(path),
  realpath: (path) => fsp.realpath(path),
  readdir: (path) => fsp.readdir(path),
  async syncDirectory(dir) {
    const handle = await fsp.open(dir, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  },
  utimes: (path, atime, mtime) => fsp.utimes(path, atime, mtime),
  chmod: (path, mode) => fsp.chmod(path, mode),
  makeTempFolder: (prefix) => fsp.mkdtemp(prefix),
  removeTree: (path) => fsp.rm(path, { recursive: true, force: true }),
};

