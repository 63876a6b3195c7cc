/**
 * A guest's ext2/3/4 file system, read-only, without booting it: `openGuestFs(image)` on a raw
 * image or a COW seen through its backing file, optionally inside an MBR/GPT partition.
 *
 * Paths are resolved by inode with ExtVolume, names compared as bytes (names are bytes: Latin-1
 * names resolve too), and inode contents and file bytes come from it, whole extents at once.
 * libext2fs (npm `ext2fs`, mounted over a disk object that refuses every write) answers `readdir`. Guest symlinks are followed
 * inside the guest, one path component at a time, never on the host, at most 40 deep (as Linux).
 *
 * Invariant: nothing reachable from here writes to the image, its backing file or anything else.
 */
import { createRequire } from 'node:module';
import { UbdcowError } from '../errors.js';
import { type FsSource, type GuestDisk, ReadOnlyExt2fsDisk, openGuestDisk, partitionSource } from './disk-adapter.js';
import { type FileType, type Inode, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, hasExtMagic } from './ext-layout.js';
import { ExtVolume } from './ext-reader.js';
import { decodeName, escapeName, escapeText } from './guest-names.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface GuestFsOptions {
  /** Backing file to use instead of the one the COW's header names. */
  backing?: string;
  /** 1-based partition number (MBR or GPT), as Linux numbers /dev/sdaN. */
  partition?: number;
}

export interface GuestStat {
  ino: number;
  type: FileType | 'unknown';
  /** Permission and special bits (mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  links: number;
  /** Seconds since the epoch, with nanoseconds where the inode records them. */
  mtime: number;
  atime: number;
  ctime: number;
  mtimeNs: number;
  atimeNs: number;
  ctimeNs: number;
}

export interface GuestDirEntry {
  /** The name's UTF-8 reading (U+FFFD where its bytes are not UTF-8). */
  name: string;
  nameBytes: Uint8Array;
  /** As lstat would return it (symlinks not followed). */
  stat: GuestStat;
}

export interface GuestFs {
  image: string;
  /** Where the file system is: the whole disk or partition N. */
  location: string;
  fsKind: 'ext2' | 'ext3' | 'ext4';
  blockSize: number;
  warnings: string[];
  /** Names in a directory (libext2fs), sorted, without . and .. */
  readdir(path: GuestPath): Promise<string[]>;
  /** Entries with their lstat, straight from the directory blocks (one pass), sorted by name bytes. */
  list(path: GuestPath): Promise<GuestDirEntry[]>;
  stat(path: GuestPath): Promise<GuestStat>;
  lstat(path: GuestPath): Promise<GuestStat>;
  readlink(path: GuestPath): Promise<string>;
  readFile(path: GuestPath): Promise<Uint8Array>;
  /** A regular file's bytes in chunks (for large files). */
  readChunks(path: GuestPath): AsyncGenerator<Uint8Array>;
  /** A regular file's written data as (position, bytes) runs, holes left out (for sparse copies). */
  readRuns(path: GuestPath): AsyncGenerator<{ position: number; bytes: Uint8Array }>;
  /** Resolves symlinks inside the guest: the path with none left in it. */
  realpath(path: GuestPath): Promise<string>;
  /** The symlink-free path (string and exact bytes) and inode of `path`; the last part followed or not. */
  resolve(path: GuestPath, followLast: boolean): Promise<{ path: string; pathBytes: Uint8Array; inode: Inode }>;
  close(): Promise<void>;
  /** The inode-level reader under it (for diffFiles). */
  readonly volume: ExtVolume;
  readonly disk: GuestDisk;
}

const MAX_SYMLINKS = 40;
const LINUX_GPT_TYPE = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';

interface Ext2fsModule {
  mount(disk: unknown, offset: number): Promise<Ext2fsMounted>;
  umount(fs: Ext2fsMounted): Promise<void>;
}
interface Ext2fsMounted {
  promises: {
    /** Names in a directory (libext2fs), sorted, without . and .. */
  readdir(path: string): Promise<string[]>;
  /** Entries with their lstat, straight from the directory blocks (one pass, for ls -l and ls -R). */
  list(path: string): Promise<GuestDirEntry[]>;
    open(path: string, flags: number): Promise<{ stat(): Promise<{ ino: number }>; close(): Promise<void> }>;
  };
}


/** What a disk that holds no ext file system holds instead, as far as a few signatures tell. */
async function describeContents(disk: GuestDisk, offset: number, size: number): Promise<string> {
  const head = await disk.read(offset, Math.min(size, 70 << 10));
  const text = (at: number, length: number) => (head.length >= at + length ? new TextDecoder('latin1').decode(head.subarray(at, at + length)) : '');
  if (text(0, 4) === 'XFSB') return 'an XFS file system';
  if (text(0x10040, 8) === '_BHRfS_M') return 'a btrfs file system';
  if (text(4086, 10) === 'SWAPSPACE2') return 'Linux swap';
  if (text(0, 6) === 'LUKS\xba\xbe') return 'a LUKS encrypted volume';
  if (text(0x8001, 5) === 'CD001') return 'an ISO 9660 image';
  if (text(0x52, 5) === 'FAT32' || text(0x36, 3) === 'FAT') return 'a FAT file system';
  if (head.every((byte) => byte === 0)) return `only zeros in its first ${head.length} bytes (an empty, unformatted disk?)`;
  return 'no file system signature ubdcow knows';
}

async function partitionTable(disk: GuestDisk): Promise<{ type: 'mbr' | 'gpt'; partitions: Array<{ index: number; offset: number; size: number; type: number | string }> } | undefined> {
  const { getPartitions } = await import('partitioninfo');
  try {
    const info = await getPartitions(new ReadOnlyExt2fsDisk(disk) as never, { includeExtended: false, getLogical: true });
    return info as never;
  } catch {
    return undefined;
  }
}

function isLinuxPartition(type: number | string): boolean {
  return typeof type === 'number' ? type === 0x83 : type.toUpperCase() === LINUX_GPT_TYPE;
}

/** Finds the file system: partition N, the whole disk, or the only Linux partition. */
async function locate(disk: GuestDisk, partition: number | undefined): Promise<{ source: FsSource; location: string }> {
  const name = disk.path;
  if (partition !== undefined) {
    if (!Number.isInteger(partition) || partition < 1) throw new UbdcowError('usage', `--partition must be a whole number from 1, got ${partition}`);
    const table = await partitionTable(disk);
    if (!table) throw new UbdcowError('no-partition', `${name}: has no MBR or GPT partition table, so there is no partition ${partition} (omit --partition for a whole-disk file system)`, { file: name });
    const found = table.partitions.find((p) => p.index === partition);
    if (!found) {
      throw new UbdcowError('no-partition', `${name}: its ${table.type.toUpperCase()} table has no partition ${partition} (it has ${table.partitions.map((p) => p.index).join(', ') || 'none'})`, { file: name });
    }
    if (found.offset + found.size > disk.size) throw new UbdcowError('corrupt-fs', `${name}: partition ${partition} runs past the end of the disk`, { file: name });
    return { source: partitionSource(disk, found.offset, found.size), location: `partition ${partition}` };
  }
  const superblock = disk.size >= SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE ? await disk.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE) : new Uint8Array(0);
  if (hasExtMagic(superblock)) return { source: partitionSource(disk, 0, disk.size), location: 'whole disk' };
  const table = await partitionTable(disk);
  if (table && table.partitions.length > 0) {
    const linux = table.partitions.filter((p) => isLinuxPartition(p.type));
    if (linux.length === 1) {
      const only = linux[0]!;
      return { source: partitionSource(disk, only.offset, only.size), location: `partition ${only.index}` };
    }
    const list = table.partitions.map((p) => `${p.index} (${typeof p.type === 'number' ? `type 0x${p.type.toString(16)}` : p.type}, ${p.size} bytes)`).join(', ');
    throw new UbdcowError(
      'which-partition',
      `${name}: ${table.type.toUpperCase()} disk with ${linux.length === 0 ? 'no Linux partition' : `${linux.length} Linux partitions`}: ${list}; choose one with --partition N`,
      { file: name },
    );
  }
  throw new UbdcowError('no-fs', `${name}: no ext2/3/4 file system and no partition table; the disk holds ${await describeContents(disk, 0, disk.size)}`, { file: name });
}

let ext2fsModule: Ext2fsModule | undefined;
function loadExt2fs(): Ext2fsModule {
  ext2fsModule ??= createRequire(import.meta.url)('ext2fs') as Ext2fsModule;
  return ext2fsModule;
}

export function statOf(inode: Inode): GuestStat {
  return {
    ino: inode.ino,
    type: inode.type ?? 'unknown',
    mode: inode.mode & 0o7777,
    uid: inode.uid,
    gid: inode.gid,
    size: inode.size,
    links: inode.links,
    mtime: inode.mtime,
    atime: inode.atime,
    ctime: inode.ctime,
    mtimeNs: inode.mtimeNs,
    atimeNs: inode.atimeNs,
    ctimeNs: inode.ctimeNs,
  };
}

/** A guest path as bytes: a string is taken as UTF-8, bytes as they are (names are bytes). */
export type GuestPath = string | Uint8Array;

function pathBytes(path: GuestPath): Uint8Array {
  return typeof path === 'string' ? Buffer.from(path, 'utf8') : path;
}

/** Splits a guest path into components ("." dropped; ".." kept for the resolver). */
function components(path: Uint8Array): Uint8Array[] {
  const parts: Uint8Array[] = [];
  let start = 0;
  for (let i = 0; i <= path.length; i++) {
    if (i < path.length && path[i] !== 0x2f) continue;
    const part = path.subarray(start, i);
    if (part.length > 0 && !(part.length === 1 && part[0] === 0x2e)) parts.push(part);
    start = i + 1;
  }
  return parts;
}

const isDotDot = (part: Uint8Array) => part.length === 2 && part[0] === 0x2e && part[1] === 0x2e;

function joinParts(parts: Uint8Array[]): Uint8Array {
  const slash = Uint8Array.of(0x2f);
  return parts.length === 0 ? slash : Buffer.concat(parts.flatMap((part) => [slash, part]));
}

export interface OpenedVolume {
  source: FsSource;
  location: string;
  /** The image, plus the partition when there is one: how messages name the file system. */
  label: string;
  volume: ExtVolume;
  warnings: string[];
}

/** Finds and opens the ext file system on a guest disk (no libext2fs mount: diffFiles needs only this). */
export async function openVolume(disk: GuestDisk, partition: number | undefined): Promise<OpenedVolume> {
  const { source, location } = await locate(disk, partition);
  const label = location === 'whole disk' ? disk.path : `${disk.path} ${location}`;
  const volume = await ExtVolume.open(source, label);
  const warnings = [...disk.warnings];
  if (volume.sb.needsRecovery) {
    warnings.push(
      `${label}: the ${volume.sb.kind} journal needs recovery (the guest did not unmount cleanly); shown is the file system without the journal's last transactions, which ubdcow never replays (boot the guest, or run e2fsck on a copy, to replay them)`,
    );
  }
  return { source, location, label, volume, warnings };
}

const openGuestFsOptionKeys: OptionKeys<GuestFsOptions> = { backing: true, partition: true };

export async function openGuestFs(image: string, options: GuestFsOptions = {}): Promise<GuestFs> {
  checkOptions('openGuestFs', options, openGuestFsOptionKeys);
  const disk = await openGuestDisk(image, { backing: options.backing });
  try {
    const { source, location, label, volume, warnings } = await openVolume(disk, options.partition);
    // Mounted on first use (only readdir needs it): ls, get and stat never load the WebAssembly
    // library, which is ~0.1 s of every command's start-up.
    let mounted: Promise<Ext2fsMounted> | undefined;
    const mountedFs = () =>
      (mounted ??= loadExt2fs()
        .mount(new ReadOnlyExt2fsDisk(disk), source.offset)
        .catch((err: unknown) => {
          throw new UbdcowError('corrupt-fs', `${label}: libext2fs cannot open the ${volume.sb.kind} file system (${ext2fsMessage(err)}); corrupt file system?`, { file: image });
        }));

    /** A libext2fs error as ours (`path` already escaped for the terminal). */
    const fail = (err: unknown, path: string): never => {
      if (err instanceof UbdcowError) throw err;
      const code = (err as { code?: string }).code;
      if (code === 'ENOENT') throw new UbdcowError('not-found', `${label}: ${path}: no such file or directory in the guest`, { file: image });
      if (code === 'ENOTDIR') throw new UbdcowError('not-a-dir', `${label}: ${path}: a component of the path is not a directory in the guest`, { file: image });
      throw new UbdcowError('corrupt-fs', `${label}: ${path}: libext2fs failed (${ext2fsMessage(err)})`, { file: image });
    };

    /**
     * Resolves `path` by inode, one component at a time, reading directory blocks with ExtVolume
     * (names compared as bytes; libext2fs is not asked, so names that are not UTF-8 and inodes
     * whose times libext2fs cannot represent resolve all the same): the symlink-free path and its
     * inode. `..` goes back up the directories walked, as the kernel does.
     */
    const resolve = async (path: GuestPath, followLast: boolean): Promise<{ path: string; pathBytes: Uint8Array; inode: Inode }> => {
      const asked = escapeName(pathBytes(path));
      let pending = components(pathBytes(path));
      const done: Uint8Array[] = [];
      const parents: Inode[] = [];
      let hops = 0;
      const root = await volume.readInode(2);
      let inode = root;
      while (pending.length > 0) {
        const part = pending.shift()!;
        if (isDotDot(part)) {
          done.pop();
          inode = parents.pop() ?? root;
          continue;
        }
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${asked}: ${escapeName(joinParts(done))} is not a directory in the guest`, { file: image });
        const ino = await volume.lookup(inode, part);
        if (ino === undefined) {
          const candidate = escapeName(joinParts([...done, part]));
          // Name the path asked for, and which part of it is missing when that differs.
          throw new UbdcowError('not-found', `${label}: ${asked}: no such file or directory in the guest${candidate !== asked ? ` (${candidate} does not exist)` : ''}`, { file: image });
        }
        const child = await volume.readInode(ino);
        if (child.type === 'symlink' && (pending.length > 0 || followLast)) {
          if (++hops > MAX_SYMLINKS) {
            throw new UbdcowError('symlink-loop', `${label}: ${asked}: too many levels of symbolic links in the guest (more than ${MAX_SYMLINKS}; a symlink loop?)`, { file: image });
          }
          const target = await volume.readLink(child);
          pending = [...components(target), ...pending];
          if (target[0] === 0x2f) {
            done.length = 0;
            parents.length = 0;
            inode = root;
          }
          continue;
        }
        done.push(part);
        parents.push(inode);
        inode = child;
      }
      const bytes = joinParts(done);
      return { path: decodeName(bytes), pathBytes: bytes, inode };
    };

    const shown = (path: GuestPath) => escapeName(pathBytes(path));
    const regularFile = async (path: GuestPath): Promise<Inode> => {
      const { inode } = await resolve(path, true);
      if (inode.type !== 'file') throw new UbdcowError('not-a-file', `${label}: ${shown(path)}: is a ${inode.type ?? 'special file'}, not a regular file, in the guest`, { file: image });
      return inode;
    };

    const guest: GuestFs = {
      image,
      location,
      fsKind: volume.sb.kind,
      blockSize: volume.sb.blockSize,
      warnings,
      volume,
      disk,
      async readdir(path) {
        const { path: real, inode } = await resolve(path, true);
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${shown(path)}: not a directory in the guest`, { file: image });
        try {
          const names = await (await mountedFs()).promises.readdir(real);
          return names.filter((name) => name !== '.' && name !== '..').sort();
        } catch (err) {
          return fail(err, shown(path));
        }
      },
      async list(path) {
        const { inode } = await resolve(path, true);
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${shown(path)}: not a directory in the guest`, { file: image });
        const entries: GuestDirEntry[] = [];
        for (const entry of await volume.readDir(inode)) entries.push({ name: entry.name, nameBytes: entry.nameBytes, stat: statOf(await volume.readInode(entry.ino)) });
        return entries.sort((x, y) => Buffer.compare(x.nameBytes, y.nameBytes));
      },
      async stat(path) {
        return statOf((await resolve(path, true)).inode);
      },
      async lstat(path) {
        return statOf((await resolve(path, false)).inode);
      },
      async readlink(path) {
        const { inode } = await resolve(path, false);
        if (inode.type !== 'symlink') throw new UbdcowError('not-a-symlink', `${label}: ${shown(path)}: not a symbolic link in the guest`, { file: image });
        return decodeName(await volume.readLink(inode));
      },
      async readFile(path) {
        return volume.readAll(await regularFile(path));
      },
      async *readChunks(path) {
        yield* volume.readChunks(await regularFile(path));
      },
      async *readRuns(path) {
        yield* volume.readRuns(await regularFile(path));
      },
      async realpath(path) {
        return (await resolve(path, true)).path;
      },
      resolve,
      async close() {
        try {
          const fs = await mounted?.catch(() => undefined);
          if (fs) await loadExt2fs().umount(fs);
        } finally {
          await disk.close();
        }
      },
    };
    return guest;
  } catch (err) {
    await disk.close().catch(() => undefined);
    throw err;
  }
}

function ext2fsMessage(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e.code ?? escapeText(String(e.message ?? err)).split(' args:')[0]!;
}
