/**
 * `diff --files`: which guest files differ between two views of an ext2/3/4 disk (a COW and its
 * backing, two COWs over one backing, or any two images), like virt-diff but without booting.
 *
 * Smart path (COW against its backing, or two COWs over the same backing, same file-system
 * geometry on both sides): bytes the COW files do not hold are the backing's on both sides, so an
 * inode whose on-disk record holds no written sector is the same inode on both sides, and a
 * directory whose inode, map blocks and data blocks hold none lists the same entries. File-system
 * writes always rewrite the inode (mtime/ctime at least), so only touched inodes are compared, and
 * for those the content is compared byte for byte (unless both sides map the same untouched
 * blocks). Every directory is still listed, since a changed file can sit under an unchanged
 * directory, but unchanged ones are read once, not twice, and no untouched file inode is read.
 * `deep` (or unrelated images) compares every inode and every file's bytes.
 *
 * Invariant: read-only; the answer never depends on the smart path being taken except through the
 * documented assumption (writes went through the file system, not under it: use deep for dd).
 */
import { createHash } from 'node:crypto';
import { UbdcowError } from '../errors.js';
import { type ByteRange, type GuestDisk, openGuestDisk, sameBase } from './disk-adapter.js';
import type { DirEntry, FileType, Inode } from './ext-layout.js';
import type { BlockMap, ExtVolume } from './ext-reader.js';
import { type OpenedVolume, openVolume } from './guest-fs.js';
import type { JournalReplayNote } from './journal-replay.js';
import { type OptionKeys, checkOptions } from '../options.js';
import { decodeName, escapeName, joinPathBytes, lossless } from './guest-names.js';

export type FileChangeWhat = 'content' | 'size' | 'mode' | 'owner' | 'type' | 'target' | 'mtime' | 'atime' | 'ctime';

export interface FileChange {
  /** The guest path (U+FFFD where its bytes are not UTF-8). */
  path: string;
  /** The exact bytes of `path`, base64, only when `path` is not them (a name that is not UTF-8). */
  pathBytes?: string;
  change: 'added' | 'removed' | 'modified';
  /** The type on the new side (a, or the COW), or on the old side for a removed path. */
  type: FileType | 'unknown';
  /** For modified paths: what differs, in a fixed order. */
  what: FileChangeWhat[];
  /** With `checksum`, for regular files: SHA-256 of the bytes in a (new) and b (old); a side that is not a regular file has none. */
  sha256?: { a?: string; b?: string };
}

export interface DiffFilesOptions {
  backingA?: string;
  backingB?: string;
  partition?: number;
  /** Report atime and ctime differences too. */
  times?: boolean;
  /** Add a SHA-256 of each side of every changed regular file. */
  checksum?: boolean;
  /** Compare every inode and every file's bytes, ignoring what the COW bitmaps say. */
  deep?: boolean;
}

export interface DiffFilesResult {
  a: string;
  /** The other side: b, or the backing file of a. */
  b: string;
  /** How candidates were found: from COW allocation ("smart") or by comparing everything ("full"). */
  mode: 'smart' | 'full';
  /** Why the full walk was needed, when it was. */
  fullReason?: string;
  changes: FileChange[];
  warnings: string[];
  /** Journals that needed recovery and were replayed in memory (the answer is the file system after recovery). */
  journal: JournalReplayNote[];
  stats: { directoriesListed: number; inodesCompared: number; filesRead: number; bytesCompared: number };
}

const whatOrder: FileChangeWhat[] = ['type', 'content', 'size', 'target', 'mode', 'owner', 'mtime', 'atime', 'ctime'];

/** Sorted, merged byte ranges with a fast "does [start, end) touch any" query. */
class RangeSet {
  private readonly starts: number[];
  private readonly ends: number[];

  constructor(ranges: ByteRange[]) {
    const sorted = [...ranges].sort((x, y) => x.start - y.start);
    this.starts = [];
    this.ends = [];
    for (const r of sorted) {
      const last = this.ends.length - 1;
      if (last >= 0 && r.start <= this.ends[last]!) this.ends[last] = Math.max(this.ends[last]!, r.end);
      else {
        this.starts.push(r.start);
        this.ends.push(r.end);
      }
    }
  }

  touches(start: number, end: number): boolean {
    // Last range starting before `end`.
    let lo = 0;
    let hi = this.starts.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.starts[mid]! < end) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found >= 0 && this.ends[found]! > start;
  }
}

function sameGeometry(a: ExtVolume, b: ExtVolume): boolean {
  const x = a.sb;
  const y = b.sb;
  if (x.blockSize !== y.blockSize || x.inodeSize !== y.inodeSize || x.inodesPerGroup !== y.inodesPerGroup || x.groupCount !== y.groupCount) return false;
  return a.groups.every((g, i) => g.inodeTable === b.groups[i]!.inodeTable);
}

function nameKey(entry: DirEntry): string {
  return Buffer.from(entry.nameBytes).toString('latin1');
}


const diffFilesOptionKeys: OptionKeys<DiffFilesOptions> = { backingA: true, backingB: true, partition: true, times: true, checksum: true, deep: true };

export async function diffFiles(a: string, b?: string, options: DiffFilesOptions = {}): Promise<DiffFilesResult> {
  checkOptions('diffFiles', options, diffFilesOptionKeys);
  const opened: GuestDisk[] = [];
  try {
    const diskA = await openGuestDisk(a, { backing: options.backingA });
    opened.push(diskA);
    let diskB: GuestDisk;
    let written: ByteRange[] | undefined;
    let fullReason: string | undefined;
    if (b === undefined) {
      if (diskA.kind !== 'cow' || !diskA.backing || !diskA.writtenRanges) {
        throw new UbdcowError('not-a-cow', `${a}: is not a COW file, so there is no backing file to compare it with (give a second image: diff --files A B)`, { file: a });
      }
      diskB = diskA.backing;
      written = await diskA.writtenRanges();
    } else {
      diskB = await openGuestDisk(b, { backing: options.backingB });
      opened.push(diskB);
      if (sameBase(diskA, diskB) && (diskA.writtenRanges || diskB.writtenRanges)) {
        written = [...((await diskA.writtenRanges?.()) ?? []), ...((await diskB.writtenRanges?.()) ?? [])];
      } else {
        fullReason = 'the two images do not share a backing file';
      }
    }
    const volA = await openVolume(diskA, options.partition);
    const volB = await openVolume(diskB, options.partition);
    if (options.deep) {
      written = undefined;
      fullReason = 'deep comparison asked for';
    } else if (written) {
      if (volA.source.offset !== volB.source.offset) {
        written = undefined;
        fullReason = 'the file system starts at different offsets on the two disks';
      } else if (!sameGeometry(volA.volume, volB.volume)) {
        written = undefined;
        fullReason = 'the file systems have different layouts (resized or reformatted?)';
      }
    }
    // Blocks a journal replay put in place differ from the disk's bytes there: touched too.
    const replayed = [...volA.replayedRanges, ...volB.replayedRanges];
    const touched = written ? new RangeSet([...written.map((r) => ({ start: r.start - volA.source.offset, end: r.end - volA.source.offset })), ...replayed]) : undefined;
    const differ = new TreeDiff(volA, volB, touched, options);
    await differ.run();
    differ.sortChanges();
    const warnings = [...volA.warnings, ...volB.warnings.filter((w) => !volA.warnings.includes(w))];
    return {
      a,
      b: b ?? diskB.path,
      mode: touched ? 'smart' : 'full',
      ...(touched ? {} : { fullReason }),
      changes: differ.changes,
      warnings,
      journal: [volA.journal, volB.journal].filter((note): note is JournalReplayNote => note !== undefined),
      stats: differ.stats,
    };
  } finally {
    for (const disk of opened.reverse()) await disk.close().catch(() => undefined);
  }
}

class TreeDiff {
  readonly changes: FileChange[] = [];
  /** The exact path bytes of each change (paths are bytes; the strings may be lossy). */
  private readonly changeBytes = new Map<FileChange, Uint8Array>();
  /** Directory inodes entered on each side: a second visit is a directory hard link (a loop, maybe). */
  private readonly enteredA = new Map<number, Uint8Array>();
  private readonly enteredB = new Map<number, Uint8Array>();
  readonly stats = { directoriesListed: 0, inodesCompared: 0, filesRead: 0, bytesCompared: 0 };
  private readonly a: ExtVolume;
  private readonly b: ExtVolume;

  constructor(
    volA: OpenedVolume,
    volB: OpenedVolume,
    /** Bytes of the file system written on either side; undefined: everything may differ. */
    private readonly touched: RangeSet | undefined,
    private readonly options: DiffFilesOptions,
  ) {
    this.a = volA.volume;
    this.b = volB.volume;
  }

  async run(): Promise<void> {
    await this.compare(Uint8Array.of(0x2f), 2, 2);
  }

  sortChanges(): void {
    const bytes = (c: FileChange) => this.changeBytes.get(c)!;
    this.changes.sort((x, y) => Buffer.compare(bytes(x), bytes(y)));
  }

  private push(path: Uint8Array, change: Omit<FileChange, 'path' | 'pathBytes'>): void {
    const exact = lossless(path);
    const entry: FileChange = { path: decodeName(path), ...(exact === undefined ? {} : { pathBytes: exact }), ...change };
    this.changeBytes.set(entry, path);
    this.changes.push(entry);
  }

  /**
   * Notes that a directory is being listed on one side; a directory inode met twice exists only
   * through a hard link to a directory (a corrupt or crafted file system), and walking it again
   * could go round forever, so that is a one-line error naming both paths.
   */
  private enter(volume: ExtVolume, dir: Inode, path: Uint8Array): void {
    const entered = volume === this.a ? this.enteredA : this.enteredB;
    const first = entered.get(dir.ino);
    if (first !== undefined) {
      throw volume.corrupt(`${escapeName(path)} is directory inode ${dir.ino} again, already walked at ${escapeName(first)} (a hard link to a directory, which can loop)`);
    }
    entered.set(dir.ino, path);
  }

  /** The inode's record reads the same on both sides (same number, no written byte in it). */
  private inodeUntouched(ino: number): boolean {
    if (!this.touched) return false;
    const at = this.a.inodeOffset(ino);
    return !this.touched.touches(at, at + this.a.sb.inodeSize);
  }

  private blocksUntouched(map: BlockMap): boolean {
    if (!this.touched) return false;
    const bs = this.a.sb.blockSize;
    for (const block of map.metaBlocks) if (this.touched.touches(block * bs, (block + 1) * bs)) return false;
    for (const e of map.extents) if (this.touched.touches(e.physical * bs, (e.physical + e.length) * bs)) return false;
    return true;
  }

  private async listDir(volume: ExtVolume, inode: Inode, path: Uint8Array): Promise<DirEntry[]> {
    this.enter(volume, inode, path);
    this.stats.directoriesListed++;
    return volume.readDir(inode);
  }

  /** Compares the inodes at one path on both sides (ia on a, ib on b). */
  private async compare(path: Uint8Array, ia: number, ib: number, typeHint?: FileType): Promise<void> {
    const same = ia === ib && this.inodeUntouched(ia);
    // An untouched non-directory needs nothing more; the entry's file-type byte says which it is.
    if (same && typeHint !== undefined && typeHint !== 'dir') return;
    const inodeA = await this.a.readInode(ia);
    if (same) {
      // Identical inode; only a directory can hide changes below it.
      if (inodeA.type === 'dir' && (await this.compareDirs(path, inodeA, inodeA, true))) {
        this.push(path, { change: 'modified', type: 'dir', what: ['content'] });
      }
      return;
    }
    this.stats.inodesCompared++;
    const inodeB = await this.b.readInode(ib);
    const what = new Set<FileChangeWhat>();
    const typeA = inodeA.type ?? 'unknown';
    const typeB = inodeB.type ?? 'unknown';
    let sums: FileChange['sha256'];
    if (typeA !== typeB) {
      what.add('type');
      if (typeA === 'dir') await this.subtree(path, this.a, inodeA, 'added');
      if (typeB === 'dir') await this.subtree(path, this.b, inodeB, 'removed');
      // A path that became (or stopped being) a regular file: the sum of the side that is one.
      if (this.options.checksum && (typeA === 'file' || typeB === 'file')) {
        sums = {
          ...(typeA === 'file' ? { a: await this.sha256(this.a, inodeA) } : {}),
          ...(typeB === 'file' ? { b: await this.sha256(this.b, inodeB) } : {}),
        };
      }
    } else {
      if ((inodeA.mode & 0o7777) !== (inodeB.mode & 0o7777)) what.add('mode');
      if (inodeA.uid !== inodeB.uid || inodeA.gid !== inodeB.gid) what.add('owner');
      if (inodeA.size !== inodeB.size) what.add('size');
      if (inodeA.mtime !== inodeB.mtime || inodeA.mtimeNs !== inodeB.mtimeNs) what.add('mtime');
      if (this.options.times) {
        if (inodeA.atime !== inodeB.atime || inodeA.atimeNs !== inodeB.atimeNs) what.add('atime');
        if (inodeA.ctime !== inodeB.ctime || inodeA.ctimeNs !== inodeB.ctimeNs) what.add('ctime');
      }
      if (typeA === 'file') {
        const result = await this.compareContent(inodeA, inodeB);
        if (!result.same) what.add('content');
        if (this.options.checksum && what.size > 0) sums = await this.checksums(inodeA, inodeB);
      } else if (typeA === 'symlink') {
        const [ta, tb] = await Promise.all([this.a.readLink(inodeA), this.b.readLink(inodeB)]);
        if (Buffer.compare(ta, tb) !== 0) what.add('target');
      } else if (typeA === 'char' || typeA === 'block') {
        if (inodeA.rdev !== inodeB.rdev) what.add('content');
      } else if (typeA === 'dir') {
        if (await this.compareDirs(path, inodeA, inodeB, false)) what.add('content');
      }
    }
    if (what.size > 0) {
      this.push(path, { change: 'modified', type: typeA, what: whatOrder.filter((w) => what.has(w)), ...(sums ? { sha256: sums } : {}) });
    }
  }

  /** Compares the entries of a directory on both sides; true when the set of names or their inodes changed. */
  private async compareDirs(path: Uint8Array, dirA: Inode, dirB: Inode, sameInode: boolean): Promise<boolean> {
    const entriesA = await this.listDir(this.a, dirA, path);
    let entriesB: DirEntry[];
    if (sameInode && this.blocksUntouched(await this.a.blockMap(dirA))) {
      this.enter(this.b, dirB, path);
      entriesB = entriesA;
    } else entriesB = await this.listDir(this.b, dirB, path);
    const byNameB = new Map(entriesB.map((e) => [nameKey(e), e]));
    let changed = false;
    const seen = new Set<string>();
    for (const entryA of entriesA) {
      const key = nameKey(entryA);
      seen.add(key);
      const entryB = byNameB.get(key);
      const path2 = joinPathBytes(path, entryA.nameBytes);
      if (!entryB) {
        changed = true;
        await this.whole(path2, this.a, entryA.ino, 'added');
      } else {
        if (entryA.ino !== entryB.ino) changed = true;
        await this.compare(path2, entryA.ino, entryB.ino, entryA.ino === entryB.ino && entryA.type === entryB.type ? entryA.type : undefined);
      }
    }
    for (const entryB of entriesB) {
      if (seen.has(nameKey(entryB))) continue;
      changed = true;
      await this.whole(joinPathBytes(path, entryB.nameBytes), this.b, entryB.ino, 'removed');
    }
    return changed;
  }

  /** A path only one side has: it and, for a directory, everything below it. */
  private async whole(path: Uint8Array, volume: ExtVolume, ino: number, change: 'added' | 'removed'): Promise<void> {
    const inode = await volume.readInode(ino);
    const entry: Omit<FileChange, 'path'> = { change, type: inode.type ?? 'unknown', what: [] };
    if (this.options.checksum && inode.type === 'file') {
      const sum = await this.sha256(volume, inode);
      entry.sha256 = change === 'added' ? { a: sum } : { b: sum };
    }
    this.push(path, entry);
    if (inode.type === 'dir') await this.subtree(path, volume, inode, change);
  }

  private async subtree(path: Uint8Array, volume: ExtVolume, dir: Inode, change: 'added' | 'removed'): Promise<void> {
    for (const entry of await this.listDir(volume, dir, path)) await this.whole(joinPathBytes(path, entry.nameBytes), volume, entry.ino, change);
  }

  private async compareContent(inodeA: Inode, inodeB: Inode): Promise<{ same: boolean }> {
    if (inodeA.size !== inodeB.size) return { same: false };
    if (inodeA.ino === inodeB.ino && this.touched) {
      // Same blocks, none written on either side: the bytes are the backing's on both.
      const [mapA, mapB] = await Promise.all([this.a.blockMap(inodeA), this.b.blockMap(inodeB)]);
      if (sameExtents(mapA, mapB) && this.blocksUntouched(mapA)) return { same: true };
    }
    this.stats.filesRead += 2;
    const chunksA = this.a.readChunks(inodeA);
    const chunksB = this.b.readChunks(inodeB);
    try {
      for (;;) {
        const [x, y] = await Promise.all([chunksA.next(), chunksB.next()]);
        if (x.done || y.done) return { same: Boolean(x.done && y.done) };
        this.stats.bytesCompared += x.value.length;
        if (Buffer.compare(x.value, y.value) !== 0) return { same: false };
      }
    } finally {
      await chunksA.return(undefined);
      await chunksB.return(undefined);
    }
  }

  private async sha256(volume: ExtVolume, inode: Inode): Promise<string> {
    const hash = createHash('sha256');
    for await (const chunk of volume.readChunks(inode)) hash.update(chunk);
    return hash.digest('hex');
  }

  private async checksums(inodeA: Inode, inodeB: Inode): Promise<{ a: string; b: string }> {
    return { a: await this.sha256(this.a, inodeA), b: await this.sha256(this.b, inodeB) };
  }
}

function sameExtents(x: BlockMap, y: BlockMap): boolean {
  if (x.extents.length !== y.extents.length) return false;
  return x.extents.every((e, i) => {
    const f = y.extents[i]!;
    return e.logical === f.logical && e.physical === f.physical && e.length === f.length && e.unwritten === f.unwritten;
  });
}
