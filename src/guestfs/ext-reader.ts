/**
 * A small read-only ext2/3/4 reader by inode number: inodes, block maps (extent trees and
 * ext2/3 indirect blocks), directory entries and file bytes, read straight from the disk in
 * large runs: all that ls, get (path lookups included) and diff --files read goes through it,
 * over the disk or a journal replayed in memory; it makes `get` stream at disk speed and lets
 * `diff --files` look at inode tables and directory blocks without walking every path.
 *
 * Invariant: it only reads; every structure is bounds-checked and reported as a corrupt file
 * system (code corrupt-fs) naming the image, never followed out of the file system.
 */
import { UbdcowError } from '../errors.js';
import type { FsSource } from './disk-adapter.js';
import {
  type DirEntry,
  type Extent,
  type GroupDescriptor,
  type Inode,
  INODE_FLAG_EXTENTS,
  INODE_FLAG_INLINE_DATA,
  SUPERBLOCK_OFFSET,
  SUPERBLOCK_SIZE,
  type Superblock,
  descriptorBlocks,
  inodeTableBlocks,
  inodeOffset,
  isFastSymlink,
  parseDirBlock,
  parseExtentNode,
  parseGroupDescriptors,
  parseInode,
  parseSuperblock,
} from './ext-layout.js';
import { unsupportedFeatures } from './ext-features.js';

export interface BlockMap {
  /** Data runs in logical order (holes are the gaps). */
  extents: Extent[];
  /** Blocks of the map itself: extent-tree nodes or indirect-pointer blocks. */
  metaBlocks: number[];
}

const CHUNK = 8 << 20;
const INODE_READAHEAD = 64 << 10;

export class ExtVolume {
  private readonly inodeBlockCache = new Map<number, Uint8Array>();

  private constructor(
    readonly source: FsSource,
    readonly sb: Superblock,
    readonly groups: GroupDescriptor[],
    /** How to name the file system in messages (the image path, plus the partition if any). */
    readonly label: string,
  ) {}

  static async open(source: FsSource, label: string): Promise<ExtVolume> {
    if (source.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) {
      throw new UbdcowError('no-fs', `${label}: too small (${source.size} bytes) to hold an ext2/3/4 file system`, { file: source.disk.path });
    }
    let sb: Superblock;
    try {
      sb = parseSuperblock(await source.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE));
    } catch (err) {
      throw relabel(err, label, source.disk.path);
    }
    const bad = unsupportedFeatures(sb);
    if (bad.length > 0) {
      throw new UbdcowError('unsupported-fs', `${label}: the file system uses ${bad.join(', ')}, which ubdcow cannot read yet`, { file: source.disk.path });
    }
    if (sb.blocksCount * sb.blockSize > source.size) {
      throw new UbdcowError(
        'corrupt-fs',
        `${label}: the superblock says ${sb.blocksCount} blocks of ${sb.blockSize} bytes, but the disk or partition holds only ${source.size} bytes (truncated image or corrupt superblock)`,
        { file: source.disk.path },
      );
    }
    const blocks = descriptorBlocks(sb);
    const table = new Uint8Array(blocks.length * sb.blockSize);
    for (const [i, block] of blocks.entries()) await source.read(block * sb.blockSize, sb.blockSize, table.subarray(i * sb.blockSize, (i + 1) * sb.blockSize));
    let groups: GroupDescriptor[];
    try {
      groups = parseGroupDescriptors(sb, table);
    } catch (err) {
      throw relabel(err, label, source.disk.path);
    }
    return new ExtVolume(source, sb, groups, label);
  }

  corrupt(what: string): UbdcowError {
    return new UbdcowError('corrupt-fs', `${this.label}: ${what} (corrupt file system?)`, { file: this.source.disk.path });
  }

  async readBlock(block: number, into?: Uint8Array): Promise<Uint8Array> {
    if (!(block > 0 && block < this.sb.blocksCount)) throw this.corrupt(`block ${block} is outside the file system`);
    return this.source.read(block * this.sb.blockSize, this.sb.blockSize, into);
  }

  /** Byte offset of inode `ino` in the file system. */
  inodeOffset(ino: number): number {
    return inodeOffset(this.sb, this.groups, ino);
  }

  async readInode(ino: number): Promise<Inode> {
    if (!(ino >= 1 && ino <= this.sb.inodesCount)) throw this.corrupt(`inode ${ino} is outside 1..${this.sb.inodesCount}`);
    const offset = this.inodeOffset(ino);
    const { blockSize, inodeSize } = this.sb;
    const block = Math.floor(offset / blockSize);
    let bytes = this.inodeBlockCache.get(block);
    if (!bytes) {
      // Read ahead within this group's inode table: a walk reads neighbouring inodes next, and one
      // 64 KiB read costs about what one 4 KiB read does.
      const tableEnd = Math.min(this.groups[Math.floor((ino - 1) / this.sb.inodesPerGroup)]!.inodeTable + inodeTableBlocks(this.sb), this.sb.blocksCount);
      const count = Math.max(1, Math.min(Math.floor(INODE_READAHEAD / blockSize), tableEnd - block));
      if (!(block > 0 && block + count <= this.sb.blocksCount)) throw this.corrupt(`block ${block} is outside the file system`);
      const run = await this.source.read(block * blockSize, count * blockSize);
      for (let i = 0; i < count; i++) {
        if (this.inodeBlockCache.size >= 4096) this.inodeBlockCache.delete(this.inodeBlockCache.keys().next().value as number);
        this.inodeBlockCache.set(block + i, run.subarray(i * blockSize, (i + 1) * blockSize));
      }
      bytes = this.inodeBlockCache.get(block)!;
    }
    const at = offset - block * blockSize;
    return parseInode(ino, bytes.subarray(at, at + inodeSize));
  }

  /** The data runs and map blocks of an inode (empty for fast symlinks and device files). */
  async blockMap(inode: Inode): Promise<BlockMap> {
    const map: BlockMap = { extents: [], metaBlocks: [] };
    if (inode.flags & INODE_FLAG_INLINE_DATA) throw this.corrupt(`inode ${inode.ino} keeps its data inline, which ubdcow cannot read yet`);
    if (inode.type !== 'file' && inode.type !== 'dir' && inode.type !== 'symlink') return map;
    if (isFastSymlink(this.sb, inode)) return map;
    if (inode.flags & INODE_FLAG_EXTENTS) {
      await this.walkExtents(inode, inode.blockArea, map, undefined, new Set());
    } else {
      await this.walkIndirect(inode, map);
    }
    return map;
  }

  /**
   * Walks an extent tree as ext4 does: each child one level below its parent (so at most 5 levels),
   * each node block visited once, leaves in increasing logical order. A crafted tree whose index
   * entries all point at one node (or at an ancestor) is an error here, not an exponential walk.
   */
  private async walkExtents(inode: Inode, bytes: Uint8Array, map: BlockMap, expectedDepth: number | undefined, visited: Set<number>): Promise<void> {
    const node = parseExtentNode(bytes, `${this.label}: inode ${inode.ino}`);
    if (expectedDepth !== undefined && node.depth !== expectedDepth) {
      throw this.corrupt(`inode ${inode.ino}'s extent tree has a node at depth ${node.depth} where depth ${expectedDepth} belongs`);
    }
    if (node.depth === 0) {
      for (const extent of node.extents) {
        if (extent.length > 0 && extent.physical + extent.length > this.sb.blocksCount) {
          throw this.corrupt(`inode ${inode.ino} maps blocks ${extent.physical}+${extent.length} past the end of the file system`);
        }
        const last = map.extents[map.extents.length - 1];
        if (last && extent.logical < last.logical + last.length) {
          throw this.corrupt(`inode ${inode.ino}'s extents overlap or are out of order (logical block ${extent.logical} after ${last.logical}+${last.length})`);
        }
        map.extents.push(extent);
      }
      return;
    }
    for (const child of node.children) {
      if (visited.has(child.block)) throw this.corrupt(`inode ${inode.ino}'s extent tree reaches block ${child.block} twice (a loop in the tree)`);
      visited.add(child.block);
      map.metaBlocks.push(child.block);
      await this.walkExtents(inode, await this.readBlock(child.block), map, node.depth - 1, visited);
    }
  }

  private async walkIndirect(inode: Inode, map: BlockMap): Promise<void> {
    const perBlock = this.sb.blockSize / 4;
    const wanted = Math.ceil(inode.size / this.sb.blockSize);
    const area = new DataView(inode.blockArea.buffer, inode.blockArea.byteOffset, 60);
    const add = (logical: number, physical: number) => {
      if (physical === 0) return;
      if (physical >= this.sb.blocksCount) throw this.corrupt(`inode ${inode.ino} points at block ${physical}, past the end of the file system`);
      const last = map.extents[map.extents.length - 1];
      if (last && last.logical + last.length === logical && last.physical + last.length === physical) last.length++;
      else map.extents.push({ logical, physical, length: 1, unwritten: false });
    };
    for (let i = 0; i < 12 && i < wanted; i++) add(i, area.getUint32(i * 4, true));
    // Each pointer block once: a block listed twice (or pointing at itself) is a loop, not a bigger file.
    const visited = new Set<number>();
    const walk = async (block: number, depth: number, firstLogical: number): Promise<void> => {
      if (block === 0 || firstLogical >= wanted) return;
      if (visited.has(block)) throw this.corrupt(`inode ${inode.ino}'s indirect block ${block} is listed twice (a loop in the block map)`);
      visited.add(block);
      map.metaBlocks.push(block);
      const bytes = await this.readBlock(block);
      const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const span = perBlock ** depth;
      for (let i = 0; i < perBlock; i++) {
        const logical = firstLogical + i * span;
        if (logical >= wanted) break;
        const pointer = v.getUint32(i * 4, true);
        if (depth === 0) add(logical, pointer);
        else await walk(pointer, depth - 1, logical);
      }
    };
    await walk(area.getUint32(48, true), 0, 12);
    await walk(area.getUint32(52, true), 1, 12 + perBlock);
    await walk(area.getUint32(56, true), 2, 12 + perBlock + perBlock ** 2);
  }

  /** The inode number `name` (bytes) has in directory `dir`, or undefined. */
  async lookup(dir: Inode, name: Uint8Array): Promise<number | undefined> {
    for (const entry of await this.readDir(dir)) if (Buffer.compare(entry.nameBytes, name) === 0) return entry.ino;
    return undefined;
  }

  /** Directory entries (without . and ..), in on-disk order. */
  async readDir(inode: Inode): Promise<DirEntry[]> {
    if (inode.type !== 'dir') throw this.corrupt(`inode ${inode.ino} is not a directory`);
    const entries: DirEntry[] = [];
    const map = await this.blockMap(inode);
    const blockSize = this.sb.blockSize;
    for (const extent of map.extents) {
      if (extent.unwritten) continue;
      const bytes = await this.source.read(extent.physical * blockSize, extent.length * blockSize);
      for (let i = 0; i < extent.length; i++) {
        entries.push(...parseDirBlock(this.sb, bytes.subarray(i * blockSize, (i + 1) * blockSize), `${this.label}: directory inode ${inode.ino}`));
      }
    }
    return entries;
  }

  /** A symlink's target bytes. */
  async readLink(inode: Inode): Promise<Uint8Array> {
    if (inode.type !== 'symlink') throw this.corrupt(`inode ${inode.ino} is not a symlink`);
    if (isFastSymlink(this.sb, inode)) return inode.blockArea.slice(0, inode.size);
    if (inode.size > this.sb.blockSize) throw this.corrupt(`symlink inode ${inode.ino} is ${inode.size} bytes long`);
    return this.readAll(inode);
  }

  /**
   * The file's bytes in chunks of exactly `chunkBytes` (the last one shorter), holes and unwritten
   * extents as zeros. The fixed chunking is what lets diff compare two files chunk by chunk.
   */
  async *readChunks(inode: Inode, chunkBytes = CHUNK): AsyncGenerator<Uint8Array> {
    const map = await this.blockMap(inode);
    const blockSize = this.sb.blockSize;
    const size = inode.size;
    let extentIndex = 0;
    for (let position = 0; position < size; ) {
      const length = Math.min(chunkBytes, size - position);
      const end = position + length;
      // Extents are sorted by logical block; skip those wholly before this chunk.
      while (extentIndex < map.extents.length && (map.extents[extentIndex]!.logical + map.extents[extentIndex]!.length) * blockSize <= position) extentIndex++;
      const next = map.extents[extentIndex];
      if (!next || next.logical * blockSize >= end) {
        // All hole: fresh zeroed memory, which the kernel maps lazily (no 8 MiB written).
        yield new Uint8Array(length);
        position = end;
        continue;
      }
      // Not zeroed up front: the extents fill most of it, the gaps are zeroed below.
      const chunk = Buffer.allocUnsafe(length);
      let filled = position;
      for (let i = extentIndex; i < map.extents.length; i++) {
        const extent = map.extents[i]!;
        const start = extent.logical * blockSize;
        if (start >= end) break;
        if (extent.unwritten) continue;
        const from = Math.max(start, position);
        const to = Math.min((extent.logical + extent.length) * blockSize, end);
        if (to <= from) continue;
        if (from > filled) chunk.fill(0, filled - position, from - position);
        await this.source.read(extent.physical * blockSize + (from - start), to - from, chunk.subarray(from - position, to - position));
        filled = to;
      }
      if (filled < end) chunk.fill(0, filled - position, length);
      yield chunk;
      position = end;
    }
  }

  /**
   * The written data of a file as (position, bytes) runs of at most `chunkBytes`, in order, clipped
   * to its size; holes and unwritten extents are left out (a sparse copy writes only these).
   */
  async *readRuns(inode: Inode, chunkBytes = CHUNK): AsyncGenerator<{ position: number; bytes: Uint8Array }> {
    const map = await this.blockMap(inode);
    const blockSize = this.sb.blockSize;
    const size = inode.size;
    for (const extent of map.extents) {
      if (extent.unwritten) continue;
      const start = extent.logical * blockSize;
      const end = Math.min((extent.logical + extent.length) * blockSize, size);
      for (let from = start; from < end; ) {
        const to = Math.min(end, from + chunkBytes);
        // Every byte is read into it, so it need not be zeroed first.
        const bytes = await this.source.read(extent.physical * blockSize + (from - start), to - from, Buffer.allocUnsafe(to - from));
        yield { position: from, bytes };
        from = to;
      }
    }
  }

  async readAll(inode: Inode): Promise<Uint8Array> {
    const all = new Uint8Array(inode.size);
    let at = 0;
    for await (const chunk of this.readChunks(inode)) {
      all.set(chunk, at);
      at += chunk.length;
    }
    return all;
  }
}

function relabel(err: unknown, label: string, file: string): unknown {
  if (err instanceof UbdcowError && err.code === 'corrupt-fs') {
    const noFs = err.message.startsWith('no ext2/3/4 superblock');
    return new UbdcowError(noFs ? 'no-fs' : 'corrupt-fs', `${label}: ${err.message}`, { file });
  }
  return err;
}
