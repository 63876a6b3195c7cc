import * as fsp from 'node:fs/promises';
import * as fs from 'node:fs';

/**
 * The small file interface everything above the OS goes through, so tests can record, delay,
 * reorder, fail or cut off I/O (see test/io/harness). Positions and lengths are bytes.
 */
export interface FileHandleLike {
  /** Reads up to `length` bytes into `buffer` at `offset`; returns how many (fewer only at EOF). */
  read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<number>;
  /** Writes all `length` bytes or throws. */
  write(buffer: Uint8Array, offset: number, length: number, position: number): Promise<void>;
  datasync(): Promise<void>;
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  stat(): Promise<FileStat>;
  close(): Promise<void>;
  /** The OS file descriptor, when there is one (needed for POSIX record locks). */
  readonly fd?: number;
}

export interface FileStat {
  size: number;
  /** Modification time in whole seconds, as the kernel compares it. */
  mtime: number;
  /** Bytes actually allocated on disk. */
  allocated: number;
  kind: 'file' | 'directory' | 'block-device' | 'fifo' | 'other';
  /** Device number for block devices (to find their size). */
  rdev: number;
}

export type OpenMode = 'r' | 'r+' | 'wx';

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
    kind: kindOf(stats),
    rdev: stats.rdev,
  };
}

class NodeFileHandle implements FileHandleLike {
  constructor(private readonly handle: fsp.FileHandle) {}

  get fd(): number {
    return this.handle.fd;
  }

  async read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(buffer, offset + done, length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async write(buffer: Uint8Array, offset: number, length: number, position: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const { bytesWritten } = await this.handle.write(buffer, offset + done, length - done, position + done);
      done += bytesWritten;
    }
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
    return this.handle.close();
  }
}

export const nodeFileSystem: FileSystem = {
  async open(path, mode) {
    return new NodeFileHandle(await fsp.open(path, mode, 0o644));
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
};

/** Size of a block device, from sysfs (stat reports 0 for devices). */
export async function blockDeviceSize(rdev: number): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  const sectors = await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  return Number(sectors.trim()) * 512;
}

/** Size in bytes of a regular file or block device. */
export async function sizeOf(stat: FileStat): Promise<number> {
  return stat.kind === 'block-device' ? blockDeviceSize(stat.rdev) : stat.size;
}
