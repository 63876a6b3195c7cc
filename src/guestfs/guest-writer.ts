/**
 * A guest file system open for writing: libext2fs (npm `ext2fs`) mounted over a staged disk
 * (staged-disk.ts), with the node-fs-like calls `ubdcow customize` needs, their errors turned into
 * one-line UbdcowErrors naming the guest path. Guest paths are absolute; symlinks in them are
 * resolved by libext2fs inside the guest (an absolute target restarts at the guest's root, never
 * the host's).
 *
 * What the npm package offers and this relies on (read from its glue code): open with O_CREAT/
 * O_EXCL/O_TRUNC/O_APPEND, write (which updates mtime/ctime only when the descriptor was opened
 * with O_CREAT), mkdir, rmdir, unlink, rename (directories included: `..` and link counts),
 * link, symlink, chmod, chown (the low 16 bits of uid/gid only: larger ids are refused here).
 * It has no utimes, truncate to a length other than 0, or mknod.
 */
import { UbdcowError } from '../errors.js';

export interface Ext2fsPromises {
  open(path: string, flags: number, mode?: number): Promise<Ext2fsHandle>;
  mkdir(path: string, mode: number): Promise<void>;
  rmdir(path: string): Promise<void>;
  unlink(path: string): Promise<void>;
  rename(from: string, to: string): Promise<void>;
  link(existing: string, newPath: string): Promise<void>;
  symlink(target: string, path: string): Promise<void>;
  readlink(path: string): Promise<string>;
  readdir(path: string): Promise<string[]>;
  chmod(path: string, mode: number): Promise<void>;
  lchown(path: string, uid: number, gid: number): Promise<void>;
  chown(path: string, uid: number, gid: number): Promise<void>;
}
interface Ext2fsHandle {
  stat(): Promise<{ ino: number; mode: number; uid: number; gid: number; size: number; nlink: number }>;
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  write(buffer: Buffer, offset: number, length: number, position: number | null): Promise<{ bytesWritten: number }>;
  close(): Promise<void>;
}

export const O = { RDONLY: 0, WRONLY: 1, RDWR: 2, CREAT: 64, EXCL: 128, TRUNC: 512, APPEND: 1024, NOFOLLOW: 131072, NOATIME: 262144 } as const;
const S_IFMT = 0o170000;

export type GuestKind = 'file' | 'dir' | 'symlink' | 'other';

export interface GuestEntry {
  ino: number;
  kind: GuestKind;
  /** Permission bits (mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  links: number;
}

function kindOf(mode: number): GuestKind {
  switch (mode & S_IFMT) {
    case 0o100000: return 'file';
    case 0o040000: return 'dir';
    case 0o120000: return 'symlink';
    default: return 'other';
  }
}

/** Checks and normalises a guest path: absolute, no NUL, components of at most 255 bytes; no trailing slash. */
export function guestPath(path: string, what = 'guest path'): string {
  if (!path.startsWith('/')) throw new UbdcowError('usage', `${what} ${JSON.stringify(path)} is not absolute (guest paths start with /)`);
  if (path.includes('\0')) throw new UbdcowError('usage', `${what} ${JSON.stringify(path)} contains a NUL byte`);
  const parts = path.split('/').filter((part) => part !== '' && part !== '.');
  for (const part of parts) {
    if (Buffer.byteLength(part) > 255) throw new UbdcowError('usage', `${what} ${JSON.stringify(path)}: the name ${JSON.stringify(part.slice(0, 20))}... is longer than 255 bytes`);
  }
  return `/${parts.join('/')}`;
}

export function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

export function joinGuest(dir: string, name: string): string {
  return dir === '/' ? `/${name}` : `${dir}/${name}`;
}

/** Host-readable reasons for libext2fs error numbers that are not errno values. */
function describeCode(err: unknown): { code: string; text: string } {
  const e = err as { code?: string; errno?: number; message?: string };
  const known: Record<string, string> = {
    ENOENT: 'no such file or directory',
    EEXIST: 'already exists',
    ENOTDIR: 'a component of the path is not a directory',
    EISDIR: 'is a directory',
    ENOTEMPTY: 'directory not empty',
    ENOSPC: 'no space left in the guest file system',
    EMLINK: 'too many links',
    ENAMETOOLONG: 'name too long',
    EFBIG: 'file too large for the guest file system',
  };
  if (e.code && known[e.code]) return { code: e.code, text: known[e.code] };
  const errno = e.errno ?? 0;
  // e2fsprogs' error table (lib/ext2fs/ext2_err.et), numbered from EXT2_ET_BASE.
  const base = 2133571328;
  const ext2: Record<number, [string, string]> = {
    72: ['ENOSPC', known.ENOSPC!],
    73: ['ENOSPC', 'no free inode left in the guest file system'],
    74: ['ENOTDIR', known.ENOTDIR!],
    76: ['ENOENT', known.ENOENT!],
  };
  const mapped = errno > base ? ext2[errno - base] : undefined;
  if (mapped) return { code: mapped[0], text: mapped[1] };
  return { code: e.code && e.code !== 'UNKNOWN' ? e.code : 'EIO', text: `libext2fs error ${errno > base ? `EXT2_ET #${errno - base}` : (e.code ?? String(e.message ?? err).split(' args:')[0])}` };
}

export class GuestWriter {
  constructor(
    private readonly p: Ext2fsPromises,
    /** How messages name the file system (image, plus partition). */
    readonly label: string,
    private readonly file: string,
  ) {}

  fail(err: unknown, path: string, action: string): never {
    if (err instanceof UbdcowError) throw err;
    const { code, text } = describeCode(err);
    throw new UbdcowError('guest-op-failed', `${this.label}: cannot ${action} ${path}: ${text} (${code})`, { file: this.file, cause: err });
  }

  private async entry(path: string, follow: boolean): Promise<GuestEntry | undefined> {
    let handle: Ext2fsHandle;
    try {
      handle = await this.p.open(path, O.RDONLY | O.NOATIME | (follow ? 0 : O.NOFOLLOW));
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      return this.fail(err, path, 'look up');
    }
    try {
      const s = await handle.stat();
      return { ino: s.ino, kind: kindOf(s.mode), mode: s.mode & 0o7777, uid: s.uid, gid: s.gid, size: s.size, links: s.nlink };
    } finally {
      await handle.close();
    }
  }

  /** What is at `path` (the last component not followed), or undefined. */
  lstat(path: string): Promise<GuestEntry | undefined> {
    return this.entry(path, false);
  }

  /** What `path` leads to (symlinks followed), or undefined. */
  stat(path: string): Promise<GuestEntry | undefined> {
    return this.entry(path, true);
  }

  async readFile(path: string): Promise<Buffer> {
    try {
      const handle = await this.p.open(path, O.RDONLY | O.NOATIME);
      try {
        const { size } = await handle.stat();
        const buffer = Buffer.alloc(size);
        let done = 0;
        while (done < size) {
          const { bytesRead } = await handle.read(buffer, done, size - done, done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
        return buffer.subarray(0, done);
      } finally {
        await handle.close();
      }
    } catch (err) {
      return this.fail(err, path, 'read');
    }
  }

  /**
   * Writes a regular file from chunks: replaced in place (same inode, owner and mode) when it
   * exists, else created with `mode` (owned by root). `append` adds to its end instead.
   */
  async writeFile(path: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, options: { mode?: number; append?: boolean; fresh?: boolean } = {}): Promise<void> {
    // `fresh`: the caller knows nothing is there (a directory it just made): no lookup, and O_EXCL says so if wrong.
    const existing = options.fresh ? undefined : await this.stat(path);
    if (existing && existing.kind !== 'file') throw new UbdcowError('guest-op-failed', `${this.label}: cannot write ${path}: it is a ${existing.kind === 'dir' ? 'directory' : 'special file'} in the guest`, { file: this.file });
    // O_CREAT on every open: the package updates mtime/ctime after a write only then.
    const flags = O.WRONLY | O.CREAT | (options.fresh ? O.EXCL : options.append ? O.APPEND : O.TRUNC);
    try {
      const handle = await this.p.open(path, flags, options.mode ?? 0o644);
      try {
        let position = 0;
        for await (const chunk of chunks) {
          if (chunk.length === 0) continue;
          const buffer = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
          let done = 0;
          while (done < buffer.length) {
            // The package ignores the offset argument (it always writes from the buffer's start): pass a view.
            const { bytesWritten } = await handle.write(buffer.subarray(done), 0, buffer.length - done, options.append ? null : position + done);
            if (bytesWritten <= 0) throw Object.assign(new Error('short write'), { code: 'ENOSPC' });
            done += bytesWritten;
          }
          position += buffer.length;
        }
      } finally {
        await handle.close();
      }
    } catch (err) {
      return this.fail(err, path, 'write');
    }
  }

  /** mkdir -p: each missing directory created with `mode`; an existing directory (or symlink to one) is fine. */
  async mkdirs(path: string, mode = 0o755): Promise<void> {
    const parts = path.split('/').filter(Boolean);
    let current = '';
    for (const part of parts) {
      current = `${current}/${part}`;
      const found = await this.stat(current);
      if (found?.kind === 'dir') continue;
      if (found) throw new UbdcowError('guest-op-failed', `${this.label}: cannot create directory ${path}: ${current} exists and is not a directory`, { file: this.file });
      await this.call(() => this.p.mkdir(current, mode), current, 'create directory');
    }
  }

  private async call<T>(run: () => Promise<T>, path: string, action: string): Promise<T> {
    try {
      return await run();
    } catch (err) {
      return this.fail(err, path, action);
    }
  }

  mkdir(path: string, mode: number): Promise<void> {
    return this.call(() => this.p.mkdir(path, mode), path, 'create directory');
  }

  /** rm -rf: a missing path is not an error. Returns whether something was removed. */
  async removeTree(path: string): Promise<boolean> {
    const found = await this.lstat(path);
    if (!found) return false;
    if (found.kind === 'dir') {
      for (const name of await this.readdir(path)) await this.removeTree(joinGuest(path, name));
      await this.call(() => this.p.rmdir(path), path, 'remove directory');
    } else {
      await this.call(() => this.p.unlink(path), path, 'remove');
    }
    return true;
  }

  readdir(path: string): Promise<string[]> {
    return this.call(() => this.p.readdir(path), path, 'list');
  }

  rename(from: string, to: string): Promise<void> {
    return this.call(() => this.p.rename(from, to), `${from} -> ${to}`, 'move');
  }

  unlink(path: string): Promise<void> {
    return this.call(() => this.p.unlink(path), path, 'remove');
  }

  symlink(target: string, path: string): Promise<void> {
    return this.call(() => this.p.symlink(target, path), path, 'create symbolic link');
  }

  link(existing: string, path: string): Promise<void> {
    return this.call(() => this.p.link(existing, path), path, 'create hard link');
  }

  readlink(path: string): Promise<string> {
    return this.call(() => this.p.readlink(path), path, 'read link');
  }

  chmod(path: string, mode: number): Promise<void> {
    return this.call(() => this.p.chmod(path, mode), path, 'change the mode of');
  }

  /** chown (follows symlinks) or, with `noFollow`, lchown. */
  async chown(path: string, uid: number, gid: number, noFollow = false): Promise<void> {
    for (const [name, id] of [['uid', uid], ['gid', gid]] as const) {
      if (!Number.isInteger(id) || id < 0 || id > 0xffff) {
        throw new UbdcowError('usage', `${this.label}: cannot change the owner of ${path}: ${name} ${id} is outside 0..65535 (the only ids ubdcow customize can write)`, { file: this.file });
      }
    }
    await this.call(() => (noFollow ? this.p.lchown(path, uid, gid) : this.p.chown(path, uid, gid)), path, 'change the owner of');
  }

  /** Updates mtime and ctime to now (the package's write with O_CREAT does that), creating an empty file if missing. */
  async touch(path: string): Promise<void> {
    const existing = await this.stat(path);
    if (existing && existing.kind !== 'file') throw new UbdcowError('guest-op-failed', `${this.label}: cannot touch ${path}: it is a ${existing.kind === 'dir' ? 'directory' : 'special file'} in the guest (only regular files)`, { file: this.file });
    await this.call(async () => {
      const handle = await this.p.open(path, O.WRONLY | O.CREAT, 0o644);
      try {
        await handle.write(Buffer.alloc(0), 0, 0, 0);
      } finally {
        await handle.close();
      }
    }, path, 'touch');
  }
}
