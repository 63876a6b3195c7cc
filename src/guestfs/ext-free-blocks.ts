/**
 * Which bytes of a guest disk an ext2/3/4 file system does not use: its block bitmaps, read from
 * the group descriptors' bg_block_bitmap. `sparsify --fs` drops COW sectors that lie wholly in
 * free blocks, whose contents the guest never reads.
 *
 * Invariant: a byte is reported free only when the file system is clean (no journal waiting for
 * recovery, no error flag, and without a journal marked cleanly unmounted) and every block it
 * lies in has its bit clear in the group's bitmap. A group whose bitmap was never initialized
 * (BLOCK_UNINIT: nothing was ever allocated in it) is free but for its own metadata (superblock
 * backup, descriptors, reserved descriptors, its bitmaps and inode table), as libext2fs computes
 * it; with meta_bg such a group counts as used. Blocks outside the file system count as used.
 */
import { UbdcowError } from '../errors.js';
import { SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, type Superblock, descriptorBlocks, groupHasSuper, inodeTableBlocks } from './ext-layout.js';
import type { ExtVolume } from './ext-reader.js';
import { uncleanReason } from './clean-unmount.js';

const BG_BLOCK_UNINIT = 0x2;
const RO_COMPAT_BIGALLOC = 0x200;

export interface FreeBlocks {
  /** Byte offset of the file system on the disk (its partition's start). */
  offset: number;
  blockSize: number;
  blocksCount: number;
  /** Blocks free in the bitmaps (for reports). */
  freeBlocks: number;
  /** One bit per block, set = in use (ext's own bit order: bit b is byte b >> 3, mask 1 << (b & 7)). */
  used: Uint8Array;
  /** True when disk bytes [start, end) lie wholly in free blocks. */
  rangeFree(start: number, end: number): boolean;
}

/** Reads the block bitmaps of `volume`; refuses (code unclean-fs) a file system whose bitmaps may be stale. */
export async function readFreeBlocks(volume: ExtVolume): Promise<FreeBlocks> {
  const { sb, source, label } = volume;
  const superblock = await source.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE);
  const unclean = uncleanReason(superblock);
  if (unclean) {
    throw new UbdcowError('unclean-fs', `${label}: ${unclean}, so its free-block bitmaps cannot be trusted; boot the guest and shut it down cleanly, or use --no-fs to drop only pages equal to the backing file`, {
      file: source.disk.path,
    });
  }
  if (sb.featureRoCompat & RO_COMPAT_BIGALLOC) {
    // With bigalloc a bitmap bit is a cluster of blocks; read as one bit per block, used blocks would look free.
    throw new UbdcowError('unsupported-fs', `${label}: the file system uses bigalloc (clusters of blocks), whose free-space bitmaps ubdcow does not read`, { file: source.disk.path });
  }
  const blocks = descriptorBlocks(sb);
  const table = new Uint8Array(blocks.length * sb.blockSize);
  for (const [i, block] of blocks.entries()) await source.read(block * sb.blockSize, sb.blockSize, table.subarray(i * sb.blockSize, (i + 1) * sb.blockSize));
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const used = new Uint8Array(Math.ceil(sb.blocksCount / 8)).fill(0xff);
  const bitmap = new Uint8Array(sb.blockSize);
  const bitsPerGroup = sb.blocksPerGroup;
  let freeBlocks = 0;
  for (let group = 0; group < sb.groupCount; group++) {
    const o = group * sb.descSize;
    const flags = view.getUint16(o + 0x12, true);
    const wide = sb.descSize >= 64;
    const location = (lo: number, hi: number) => view.getUint32(o + lo, true) + (wide ? view.getUint32(o + hi, true) * 2 ** 32 : 0);
    const at = location(0x00, 0x20);
    if (at === 0 || at >= sb.blocksCount) throw new UbdcowError('corrupt-fs', `${label}: group ${group}'s block bitmap is at block ${at}, outside the file system`, { file: source.disk.path });
    const first = sb.firstDataBlock + group * bitsPerGroup;
    const count = Math.min(bitsPerGroup, sb.blocksCount - first);
    if (flags & BG_BLOCK_UNINIT) {
      if (sb.featureIncompat & INCOMPAT_META_BG) continue;
      uninitializedBitmap(sb, superblock, group, first, count, [at, location(0x04, 0x24), location(0x08, 0x28)], bitmap);
    } else {
      await source.read(at * sb.blockSize, sb.blockSize, bitmap);
    }
    for (let i = 0; i < count; i++) {
      if (bitmap[i >> 3]! & (1 << (i & 7))) continue;
      const block = first + i;
      used[Math.floor(block / 8)]! &= ~(1 << (block % 8));
      freeBlocks++;
    }
  }
  const offset = source.offset;
  const blockSize = sb.blockSize;
  const blocksCount = sb.blocksCount;
  const isUsed = (block: number) => (used[Math.floor(block / 8)]! & (1 << (block % 8))) !== 0;
  return {
    offset,
    blockSize,
    blocksCount,
    freeBlocks,
    used,
    rangeFree(start, end) {
      if (start < offset || end <= start) return false;
      const first = Math.floor((start - offset) / blockSize);
      const last = Math.ceil((end - offset) / blockSize);
      if (last > blocksCount) return false;
      for (let block = first; block < last; block++) if (isUsed(block)) return false;
      return true;
    },
  };
}

const INCOMPAT_META_BG = 0x10;

/**
 * The bitmap of a BLOCK_UNINIT group as libext2fs would build it: its superblock backup, group
 * descriptors and reserved descriptor blocks (when the group has a backup), and whichever of its
 * block bitmap, inode bitmap and inode table lie inside it, are in use; the rest is free.
 */
function uninitializedBitmap(sb: Superblock, superblock: Uint8Array, group: number, first: number, count: number, tables: number[], bitmap: Uint8Array): void {
  bitmap.fill(0);
  const mark = (block: number, blocks: number) => {
    for (let b = Math.max(block, first); b < Math.min(block + blocks, first + count); b++) bitmap[Math.floor((b - first) / 8)]! |= 1 << ((b - first) % 8);
  };
  if (groupHasSuper(sb, group)) {
    const reservedGdt = superblock[0xce]! | (superblock[0xcf]! << 8);
    mark(first, 1 + descriptorBlocks(sb).length + reservedGdt);
  }
  mark(tables[0]!, 1);
  mark(tables[1]!, 1);
  mark(tables[2]!, inodeTableBlocks(sb));
  // Bits past the group's last block (the last group is short) stay as they are: never looked at.
}
