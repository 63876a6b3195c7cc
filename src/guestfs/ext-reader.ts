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
  inodeOffset,
  isFastSymlink,
  parseDirBlock,
  parseExtentNode,
  parseGroupDescriptors,
  parseInode,
  parseSuperblock,
  unsupportedFeatures,
} from './ext-layout.js';

export interface BlockMap {
  /** Data runs in logical order (holes are the gaps). */
  extents: Extent[];
  /** Blocks of the map itself: extent-tree nodes or indirect-pointer blocks. */
  metaBlocks: number[];
}

const CHUNK = 8 << 20;

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
      bytes = await this.readBlock(block);
      if (this.inodeBlockCache.size >= 4096) this.inodeBlockCache.delete(this.inodeBlockCache.keys().next().value as number);
      this.inodeBlockCache.set(block, bytes);
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
      await this.walkExtents(inode, inode.blockArea, map, 0);
    } else {
      await this.walkIndirect(inode, map);
    }
    return map;
  }

  private async walkExtents(inode: Inode, bytes: Uint8Array, map: BlockMap, level: number): Promise<void> {
    if (level > 6) throw this.corrupt(`inode ${inode.ino}'s extent tree is deeper than 5 levels`);
    const node = parseExtentNode(bytes, `${this.label}: inode ${inode.ino}`);
    if (node.depth === 0) {
      for (const extent of node.extents) {
        if (extent.length > 0 && extent.physical + extent.length > this.sb.blocksCount) {
          throw this.corrupt(`inode ${inode.ino} maps blocks ${extent.physical}+${extent.length} past the end of the file system`);
        }
        map.extents.push(extent);
      }
      return;
    }
    for (const child of node.children) {
      map.metaBlocks.push(child.block);
      await this.walkExtents(inode, await this.readBlock(child.block), map, level + 1);
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
    const walk = async (block: number, depth: number, firstLogical: number): Promise<void> => {
      if (block === 0 || firstLogical >= wanted) return;
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

  /** The file's bytes in chunks of at most 8 MiB, holes and unwritten extents as zeros. */
  async *readChunks(inode: Inode, chunkBytes = CHUNK): AsyncGenerator<Uint8Array> {
    const map = await this.blockMap(inode);
    const blockSize = this.sb.blockSize;
    const size = inode.size;
    let extentIndex = 0;
    for (let position = 0; position < size; ) {
      const length = Math.min(chunkBytes, size - position);
      const chunk = new Uint8Array(length);
      const end = position + length;
      // Extents are sorted by logical block; skip those wholly before this chunk.
      while (extentIndex < map.extents.length && (map.extents[extentIndex]!.logical + map.extents[extentIndex]!.length) * blockSize <= position) extentIndex++;
      for (let i = extentIndex; i < map.extents.length; i++) {
        const extent = map.extents[i]!;
        const start = extent.logical * blockSize;
        if (start >= end) break;
        if (extent.unwritten) continue;
        const from = Math.max(start, position);
        const to = Math.min((extent.logical + extent.length) * blockSize, end);
        if (to <= from) continue;
        await this.source.read(extent.physical * blockSize + (from - start), to - from, chunk.subarray(from - position, to - position));
      }
      yield chunk;
      position = end;
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
