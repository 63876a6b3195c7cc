/**
 * A guest's ext2/3/4 file system, read-only, without booting it: `openGuestFs(image)` on a raw
 * image or a COW seen through its backing file, optionally inside an MBR/GPT partition.
 *
 * Names are resolved by libext2fs (npm `ext2fs`, mounted over a disk object that refuses every
 * write, files opened O_NOATIME so reading never even tries to update an inode); inode contents and
 * file bytes come from ExtVolume, which reads whole extents at once. Guest symlinks are followed
 * inside the guest, one path component at a time, never on the host, at most 40 deep (as Linux).
 *
 * Invariant: nothing reachable from here writes to the image, its backing file or anything else.
 */
import { createRequire } from 'node:module';
import { UbdcowError } from '../errors.js';
import { type FsSource, type GuestDisk, ReadOnlyExt2fsDisk, openGuestDisk, partitionSource } from './disk-adapter.js';
import { type FileType, type Inode, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, hasExtMagic } from './ext-layout.js';
import { ExtVolume } from './ext-reader.js';

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
  name: string;
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
  readdir(path: string): Promise<string[]>;
  /** Entries with their lstat, straight from the directory blocks (one pass, for ls -l and ls -R). */
  list(path: string): Promise<GuestDirEntry[]>;
  stat(path: string): Promise<GuestStat>;
  lstat(path: string): Promise<GuestStat>;
  readlink(path: string): Promise<string>;
  readFile(path: string): Promise<Uint8Array>;
  /** A regular file's bytes in chunks (for large files). */
  readChunks(path: string): AsyncGenerator<Uint8Array>;
  /** Resolves symlinks inside the guest: the path with none left in it. */
  realpath(path: string): Promise<string>;
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

const O_NOFOLLOW = 131072;
const O_NOATIME = 262144;

function stripControl(text: string): string {
  return text.replace(/[\x00-\x1f\x7f]/g, '?');
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

function statOf(inode: Inode): GuestStat {
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

/** Splits a guest path into components ("." dropped; ".." kept for the resolver). */
function components(path: string): string[] {
  return path.split('/').filter((part) => part !== '' && part !== '.');
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

export async function openGuestFs(image: string, options: GuestFsOptions = {}): Promise<GuestFs> {
  const disk = await openGuestDisk(image, { backing: options.backing });
  let mounted: Ext2fsMounted | undefined;
  const ext2fs = loadExt2fs();
  try {
    const { source, location, label, volume, warnings } = await openVolume(disk, options.partition);
    const readOnlyDisk = new ReadOnlyExt2fsDisk(disk);
    try {
      mounted = await ext2fs.mount(readOnlyDisk, source.offset);
    } catch (err) {
      throw new UbdcowError('corrupt-fs', `${label}: libext2fs cannot open the ${volume.sb.kind} file system (${ext2fsMessage(err)}); corrupt file system?`, { file: image });
    }
    const mountedFs = mounted;
    const p = mountedFs.promises;

    const fail = (err: unknown, path: string): never => {
      if (err instanceof UbdcowError) throw err;
      const code = (err as { code?: string }).code;
      if (code === 'ENOENT') throw new UbdcowError('not-found', `${label}: ${stripControl(path)}: no such file or directory in the guest`, { file: image });
      if (code === 'ENOTDIR') throw new UbdcowError('not-a-dir', `${label}: ${stripControl(path)}: a component of the path is not a directory in the guest`, { file: image });
      throw new UbdcowError('corrupt-fs', `${label}: ${stripControl(path)}: libext2fs failed (${ext2fsMessage(err)})`, { file: image });
    };

    /** Inode number of a path made only of real directories (no symlinks), the last part not followed. */
    const lookup = async (realPath: string): Promise<number> => {
      if (realPath === '/') return 2;
      try {
        const handle = await p.open(realPath, O_NOFOLLOW | O_NOATIME);
        try {
          return (await handle.stat()).ino;
        } finally {
          await handle.close();
        }
      } catch (err) {
        return fail(err, realPath);
      }
    };

    /** Resolves `path`: returns the symlink-free path and its inode. */
    const resolve = async (path: string, followLast: boolean): Promise<{ path: string; inode: Inode }> => {
      let pending = components(path);
      const done: string[] = [];
      let hops = 0;
      let inode = await volume.readInode(2);
      while (pending.length > 0) {
        const part = pending.shift()!;
        if (part === '..') {
          done.pop();
          inode = await volume.readInode(await lookup(`/${done.join('/')}`));
          continue;
        }
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${stripControl(path)}: /${stripControl(done.join('/'))} is not a directory in the guest`, { file: image });
        const candidate = `/${[...done, part].join('/')}`;
        const child = await volume.readInode(
          await lookup(candidate).catch((err: unknown) => {
            // Name the path asked for, and which part of it is missing when that differs.
            if (err instanceof UbdcowError && err.code === 'not-found' && candidate !== path) {
              throw new UbdcowError('not-found', `${label}: ${stripControl(path)}: no such file or directory in the guest (${stripControl(candidate)} does not exist)`, { file: image });
            }
            throw err;
          }),
        );
        if (child.type === 'symlink' && (pending.length > 0 || followLast)) {
          if (++hops > MAX_SYMLINKS) {
            throw new UbdcowError('symlink-loop', `${label}: ${stripControl(path)}: too many levels of symbolic links in the guest (more than ${MAX_SYMLINKS}; a symlink loop?)`, { file: image });
          }
          const target = new TextDecoder().decode(await volume.readLink(child));
          pending = [...components(target), ...pending];
          if (target.startsWith('/')) {
            done.length = 0;
            inode = await volume.readInode(2);
          }
          continue;
        }
        done.push(part);
        inode = child;
      }
      return { path: `/${done.join('/')}`, inode };
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
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${stripControl(path)}: not a directory in the guest`, { file: image });
        try {
          const names = await p.readdir(real);
          return names.filter((name) => name !== '.' && name !== '..').sort();
        } catch (err) {
          return fail(err, path);
        }
      },
      async list(path) {
        const { inode } = await resolve(path, true);
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${stripControl(path)}: not a directory in the guest`, { file: image });
        const entries: GuestDirEntry[] = [];
        for (const entry of await volume.readDir(inode)) entries.push({ name: entry.name, stat: statOf(await volume.readInode(entry.ino)) });
        return entries.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
      },
      async stat(path) {
        return statOf((await resolve(path, true)).inode);
      },
      async lstat(path) {
        return statOf((await resolve(path, false)).inode);
      },
      async readlink(path) {
        const { inode } = await resolve(path, false);
        if (inode.type !== 'symlink') throw new UbdcowError('not-a-symlink', `${label}: ${stripControl(path)}: not a symbolic link in the guest`, { file: image });
        return new TextDecoder().decode(await volume.readLink(inode));
      },
      async readFile(path) {
        const { inode } = await resolve(path, true);
        if (inode.type !== 'file') throw new UbdcowError('not-a-file', `${label}: ${stripControl(path)}: is a ${inode.type ?? 'special file'}, not a regular file, in the guest`, { file: image });
        return volume.readAll(inode);
      },
      async *readChunks(path) {
        const { inode } = await resolve(path, true);
        if (inode.type !== 'file') throw new UbdcowError('not-a-file', `${label}: ${stripControl(path)}: is a ${inode.type ?? 'special file'}, not a regular file, in the guest`, { file: image });
        yield* volume.readChunks(inode);
      },
      async realpath(path) {
        return (await resolve(path, true)).path;
      },
      async close() {
        try {
          await ext2fs.umount(mountedFs);
        } finally {
          await disk.close();
        }
      },
    };
    return guest;
  } catch (err) {
    if (mounted) await ext2fs.umount(mounted).catch(() => undefined);
    await disk.close().catch(() => undefined);
    throw err;
  }
}

function ext2fsMessage(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e.code ?? stripControl(String(e.message ?? err)).split(' args:')[0]!;
}
