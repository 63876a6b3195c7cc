/**
 * A guest's ext2/3/4 file system, read-only, without booting it: `openGuestFs(image)` on a raw
 * image or a COW seen through its backing file, optionally inside an MBR/GPT partition.
 *
 * Paths are resolved by inode with ExtVolume, names compared as bytes (names are bytes: Latin-1
 * names resolve too); names, inodes and file bytes all come from ExtVolume (directory blocks read
 * whole, extents read in large runs), over the disk as it is or, when the journal needs recovery,
 * over an in-memory replay of it (journal-replay.ts). Guest symlinks are followed inside the
 * guest, one path component at a time, never on the host, at most 40 deep (as Linux).
 *
 * Invariant: nothing reachable from here writes to the image, its backing file or anything else.
 */
import { UbdcowError } from '../errors.js';
import { type ByteRange, type FsSource, type GuestDisk, openGuestDisk, partitionSource } from './disk-adapter.js';
import { describeContents } from './disk-signatures.js';
import { type FileType, type Inode, INODE_FLAG_CASEFOLD, ROOT_INODE, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, hasExtMagic } from './ext-layout.js';
import { ExtVolume } from './ext-reader.js';
import { decodeName, escapeName } from './guest-names.js';
import { type JournalReplayNote, journalOverlay, replayJournal } from './journal-replay.js';
import { type PartitionTable, isExtendedPartition, readPartitionTable } from './partition-table.js';
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
  /** Set when the journal needed recovery: it was replayed in memory, and this says how much. */
  journal?: JournalReplayNote;
  /** Names in a directory, sorted by name bytes, without . and .. */
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


function isLinuxPartition(type: number | string): boolean {
  return typeof type === 'number' ? type === 0x83 : type.toUpperCase() === LINUX_GPT_TYPE;
}

function tableOf(disk: GuestDisk): Promise<PartitionTable | undefined> {
  return readPartitionTable((offset, length) => disk.read(offset, length), disk.size);
}

/** Finds the file system: partition N (numbered as the table numbers it), the whole disk, or the only Linux partition. */
async function locate(disk: GuestDisk, partition: number | undefined): Promise<{ source: FsSource; location: string }> {
  const name = disk.path;
  if (partition !== undefined) {
    if (!Number.isInteger(partition) || partition < 1) throw new UbdcowError('usage', `--partition must be a whole number from 1, got ${partition}`);
    const table = await tableOf(disk);
    if (!table) throw new UbdcowError('no-partition', `${name}: has no MBR or GPT partition table, so there is no partition ${partition} (omit --partition for a whole-disk file system)`, { file: name });
    const found = table.partitions.find((p) => p.number === partition);
    if (!found) {
      throw new UbdcowError('no-partition', `${name}: its ${table.type.toUpperCase()} table has no partition ${partition} (it has ${table.partitions.map((p) => p.number).join(', ')})`, { file: name });
    }
    if (isExtendedPartition(found)) {
      throw new UbdcowError('no-fs', `${name}: partition ${partition} is an MBR extended partition (a container for logical partitions, numbered from 5), not a file system`, { file: name });
    }
    if (found.offset + found.size > disk.size) throw new UbdcowError('corrupt-fs', `${name}: partition ${partition} runs past the end of the disk`, { file: name });
    return { source: partitionSource(disk, found.offset, found.size), location: `partition ${partition}` };
  }
  const superblock = disk.size >= SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE ? await disk.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE) : new Uint8Array(0);
  if (hasExtMagic(superblock)) return { source: partitionSource(disk, 0, disk.size), location: 'whole disk' };
  const table = await tableOf(disk);
  if (table) {
    const linux = table.partitions.filter((p) => isLinuxPartition(p.type));
    if (linux.length === 1) {
      const only = linux[0]!;
      return { source: partitionSource(disk, only.offset, only.size), location: `partition ${only.number}` };
    }
    const list = table.partitions.map((p) => `${p.number} (${typeof p.type === 'number' ? `type 0x${p.type.toString(16)}` : p.type}, ${p.size} bytes)`).join(', ');
    throw new UbdcowError(
      'which-partition',
      `${name}: ${table.type.toUpperCase()} disk with ${linux.length === 0 ? 'no Linux partition' : `${linux.length} Linux partitions`}: ${list}; choose one with --partition N`,
      { file: name },
    );
  }
  throw new UbdcowError('no-fs', `${name}: no ext2/3/4 file system and no partition table; the disk holds ${await describeContents(disk, 0, disk.size)}`, { file: name });
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
  /** Set when the journal needed recovery and was replayed in memory. */
  journal?: JournalReplayNote;
  /** Byte ranges of the file system the in-memory replay changed (relative to the file system). */
  replayedRanges: ByteRange[];
}

/** Finds and opens the ext file system on a guest disk, replaying a journal that needs recovery in memory. */
export async function openVolume(disk: GuestDisk, partition: number | undefined): Promise<OpenedVolume> {
  const { source, location } = await locate(disk, partition);
  const label = location === 'whole disk' ? disk.path : `${disk.path} ${location}`;
  const head = source.size >= SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE ? await source.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE) : undefined;
  if (head && !hasExtMagic(head) && location !== 'whole disk') {
    const what = await describeContents(disk, source.offset, source.size);
    throw new UbdcowError('no-fs', `${label} holds ${what}, not an ext2/3/4 file system`, { file: disk.path });
  }
  const onDisk = await ExtVolume.open(source, label);
  const warnings = [...disk.warnings];
  if (!onDisk.sb.needsRecovery) return { source, location, label, volume: onDisk, warnings, replayedRanges: [] };
  const replay = await replayJournal(onDisk);
  const replayedSource = journalOverlay(source, replay, onDisk.sb.blockSize);
  const volume = await ExtVolume.open(replayedSource, label);
  const journal: JournalReplayNote = { file: label, transactions: replay.transactions, blocks: replay.blocks.size };
  warnings.push(
    journal.transactions === 0
      ? `${label}: the ${onDisk.sb.kind} file system is marked as needing journal recovery, but its journal holds no committed transaction: nothing to replay`
      : `${label}: the ${onDisk.sb.kind} journal needed recovery (the guest did not unmount cleanly): replayed in memory (${journal.transactions} transaction${journal.transactions === 1 ? '' : 's'}, ${journal.blocks} block${journal.blocks === 1 ? '' : 's'}), as the kernel would on mount; the image itself is not written`,
  );
  warnings.push(...replay.warnings.map((warning) => `${label}: ${warning}`));
  const bs = onDisk.sb.blockSize;
  const replayedRanges = [...replay.blocks.keys()].map((block) => ({ start: block * bs, end: (block + 1) * bs }));
  return { source: replayedSource, location, label, volume, warnings, journal, replayedRanges };
}

/** Case-insensitive key of a name in a casefold directory (Unicode NFD, then lower case, as the kernel's utf8 casefold approximately). */
function foldName(name: string): string {
  return name.normalize('NFD').toLowerCase();
}

const openGuestFsOptionKeys: OptionKeys<GuestFsOptions> = { backing: true, partition: true };

export async function openGuestFs(image: string, options: GuestFsOptions = {}): Promise<GuestFs> {
  checkOptions('openGuestFs', options, openGuestFsOptionKeys);
  const disk = await openGuestDisk(image, { backing: options.backing });
  try {
    const { location, label, volume, warnings, journal } = await openVolume(disk, options.partition);

    /** The inode a name in directory `dir` points at: exact bytes first, then (casefold directories) any case. */
    const lookup = async (dir: Inode, part: Uint8Array): Promise<number | undefined> => {
      const exact = await volume.lookup(dir, part);
      if (exact !== undefined || !(volume.sb.hasCasefold && dir.flags & INODE_FLAG_CASEFOLD)) return exact;
      const key = foldName(decodeName(part));
      return (await volume.readDir(dir)).find((entry) => foldName(entry.name) === key)?.ino;
    };

    /**
     * Resolves `path` by inode, one component at a time, reading directory blocks with ExtVolume
     * (names compared as bytes, so names that are not UTF-8 resolve too): the symlink-free path and
     * its inode. `..` goes back up the directories walked, as the kernel does.
     */
    const resolve = async (path: GuestPath, followLast: boolean): Promise<{ path: string; pathBytes: Uint8Array; inode: Inode }> => {
      const asked = escapeName(pathBytes(path));
      let pending = components(pathBytes(path));
      const done: Uint8Array[] = [];
      const parents: Inode[] = [];
      let hops = 0;
      const root = await volume.readInode(ROOT_INODE);
      let inode = root;
      while (pending.length > 0) {
        const part = pending.shift()!;
        if (isDotDot(part)) {
          done.pop();
          inode = parents.pop() ?? root;
          continue;
        }
        if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${asked}: ${escapeName(joinParts(done))} is not a directory in the guest`, { file: image });
        const ino = await lookup(inode, part);
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

    const list = async (path: GuestPath): Promise<GuestDirEntry[]> => {
      const { inode } = await resolve(path, true);
      if (inode.type !== 'dir') throw new UbdcowError('not-a-dir', `${label}: ${shown(path)}: not a directory in the guest`, { file: image });
      const entries: GuestDirEntry[] = [];
      for (const entry of await volume.readDir(inode)) entries.push({ name: entry.name, nameBytes: entry.nameBytes, stat: statOf(await volume.readInode(entry.ino)) });
      return entries.sort((x, y) => Buffer.compare(x.nameBytes, y.nameBytes));
    };

    const guest: GuestFs = {
      image,
      location,
      fsKind: volume.sb.kind,
      blockSize: volume.sb.blockSize,
      warnings,
      ...(journal ? { journal } : {}),
      volume,
      disk,
      async readdir(path) {
        return (await list(path)).map((entry) => entry.name);
      },
      list,
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
        await disk.close();
      },
    };
    return guest;
  } catch (err) {
    await disk.close().catch(() => undefined);
    throw err;
  }
}
