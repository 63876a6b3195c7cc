/**
 * Pure decoding of the ext2/3/4 on-disk structures the guest file-system code reads itself:
 * superblock, group descriptors (where each group's inode table lives), inodes, extent-tree nodes
 * and directory blocks. No I/O here: every function takes bytes and returns plain values, so the
 * offsets can be checked against `dumpe2fs`/`debugfs` in tests.
 *
 * Invariant: only fields whose meaning is fixed by the ext4 disk-layout documentation are read,
 * little-endian, and anything out of range is reported as a corrupt-file-system error rather than
 * guessed around.
 */
import { UbdcowError } from '../errors.js';

export const SUPERBLOCK_OFFSET = 1024;
export const SUPERBLOCK_SIZE = 1024;
export const EXT_MAGIC = 0xef53;
export const ROOT_INODE = 2;

const COMPAT_HAS_JOURNAL = 0x4;
const INCOMPAT_FILETYPE = 0x2;
const INCOMPAT_RECOVER = 0x4;
const INCOMPAT_JOURNAL_DEV = 0x8;
const INCOMPAT_META_BG = 0x10;
const INCOMPAT_EXTENTS = 0x40;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_INLINE_DATA = 0x8000;
const INCOMPAT_CASEFOLD = 0x20000;
const RO_COMPAT_SPARSE_SUPER = 0x1;
const RO_COMPAT_BIGALLOC = 0x200;


export const INODE_FLAG_EXTENTS = 0x80000;
export const INODE_FLAG_INLINE_DATA = 0x10000000;

export interface Superblock {
  inodesCount: number;
  blocksCount: number;
  firstDataBlock: number;
  blockSize: number;
  /** Bytes per allocation cluster: the block size, or a multiple of it with bigalloc. */
  clusterSize: number;
  blocksPerGroup: number;
  inodesPerGroup: number;
  inodeSize: number;
  groupCount: number;
  /** Bytes per group descriptor: 32, or s_desc_size with the 64bit feature. */
  descSize: number;
  featureCompat: number;
  featureIncompat: number;
  featureRoCompat: number;
  firstMetaBg: number;
  hasJournal: boolean;
  /** The journal holds transactions not yet written to their home blocks. */
  needsRecovery: boolean;
  hasFileType: boolean;
  /** Directories flagged casefold look names up case-insensitively. */
  hasCasefold: boolean;
  /** Inode of the internal journal (0: none, or an external journal device). */
  journalInode: number;
  /** UUID and device number (Linux's encoding) of the external journal device, when the journal is not an inode. */
  journalUuid: string;
  journalDevice: number;
  volumeName: string;
  /** What this looks like: ext2, ext3 or ext4 (by features, as blkid names them). */
  kind: 'ext2' | 'ext3' | 'ext4';
}

function corrupt(what: string): UbdcowError {
  return new UbdcowError('corrupt-fs', what);
}

/** True when `bytes` (the 1 KiB at byte 1024 of a file system) carries the ext magic number. */
export function hasExtMagic(superblock: Uint8Array): boolean {
  return superblock.length >= 0x3a && (superblock[0x38]! | (superblock[0x39]! << 8)) === EXT_MAGIC;
}

/** Decodes the superblock (the 1024 bytes at byte 1024 of the file system). */
export function parseSuperblock(bytes: Uint8Array): Superblock {
  if (bytes.length < SUPERBLOCK_SIZE) throw corrupt(`superblock is ${bytes.length} bytes, expected ${SUPERBLOCK_SIZE}`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = (o: number) => v.getUint16(o, true);
  const u32 = (o: number) => v.getUint32(o, true);
  if (u16(0x38) !== EXT_MAGIC) throw corrupt(`no ext2/3/4 superblock (magic 0x${u16(0x38).toString(16)}, expected 0xef53)`);
  const logBlockSize = u32(0x18);
  if (logBlockSize > 6) throw corrupt(`superblock block size field is ${logBlockSize}, expected 0 to 6 (1 KiB to 64 KiB)`);
  const blockSize = 1024 << logBlockSize;
  const featureCompat = u32(0x5c);
  const featureIncompat = u32(0x60);
  const featureRoCompat = u32(0x64);
  const is64 = (featureIncompat & INCOMPAT_64BIT) !== 0;
  const blocksCount = u32(0x04) + (is64 ? u32(0x150) * 2 ** 32 : 0);
  const revLevel = u32(0x4c);
  const inodeSize = revLevel >= 1 ? u16(0x58) : 128;
  const descSize = is64 ? u16(0xfe) : 32;
  const blocksPerGroup = u32(0x20);
  // bigalloc allocates in clusters: the bitmap limits clusters (not blocks) per group.
  const bigalloc = (featureRoCompat & RO_COMPAT_BIGALLOC) !== 0;
  const logClusterSize = bigalloc ? u32(0x1c) : logBlockSize;
  if (logClusterSize < logBlockSize || logClusterSize > logBlockSize + 16) throw corrupt(`superblock cluster size field is ${logClusterSize} with block size field ${logBlockSize}`);
  const clusterSize = 1024 * 2 ** logClusterSize;
  const clustersPerGroup = bigalloc ? u32(0x24) : blocksPerGroup;
  const inodesPerGroup = u32(0x28);
  const firstDataBlock = u32(0x14);
  const inodesCount = u32(0x00);
  if (inodeSize < 128 || inodeSize > blockSize || (inodeSize & (inodeSize - 1)) !== 0) {
    throw corrupt(`superblock inode size is ${inodeSize}, expected a power of two from 128 to the block size`);
  }
  if (clustersPerGroup === 0 || clustersPerGroup > blockSize * 8 || blocksPerGroup !== clustersPerGroup * (clusterSize / blockSize)) {
    throw corrupt(`superblock blocks per group is ${blocksPerGroup}${bigalloc ? ` with ${clustersPerGroup} clusters of ${clusterSize} bytes per group` : ''}`);
  }
  if (inodesPerGroup === 0 || inodesPerGroup > blockSize * 8) throw corrupt(`superblock inodes per group is ${inodesPerGroup}`);
  if (is64 && (descSize < 32 || descSize > blockSize || (descSize & (descSize - 1)) !== 0)) {
    throw corrupt(`superblock group descriptor size is ${descSize}`);
  }
  if (blocksCount <= firstDataBlock) throw corrupt(`superblock block count is ${blocksCount}`);
  const groupCount = Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup);
  if (inodesCount > groupCount * inodesPerGroup) throw corrupt(`superblock inode count ${inodesCount} exceeds ${groupCount} groups of ${inodesPerGroup}`);
  if (featureIncompat & INCOMPAT_JOURNAL_DEV) throw corrupt('this is an external journal device, not a file system');
  const name = bytes.subarray(0x78, 0x88);
  const nul = name.indexOf(0);
  const hasJournal = (featureCompat & COMPAT_HAS_JOURNAL) !== 0;
  const ext4Features = INCOMPAT_EXTENTS | INCOMPAT_64BIT | 0x200 /* flex_bg */ | INCOMPAT_INLINE_DATA;
  return {
    inodesCount,
    blocksCount,
    firstDataBlock,
    blockSize,
    clusterSize,
    blocksPerGroup,
    inodesPerGroup,
    inodeSize,
    groupCount,
    descSize,
    featureCompat,
    featureIncompat,
    featureRoCompat,
    firstMetaBg: u32(0x104),
    hasJournal,
    needsRecovery: (featureIncompat & INCOMPAT_RECOVER) !== 0,
    hasFileType: (featureIncompat & INCOMPAT_FILETYPE) !== 0,
    hasCasefold: (featureIncompat & INCOMPAT_CASEFOLD) !== 0,
    journalInode: hasJournal ? u32(0xe0) : 0,
    journalDevice: u32(0xe4),
    journalUuid: [...bytes.subarray(0xd0, 0xe0)].map((b) => b.toString(16).padStart(2, '0')).join('').replace(/^(.{8})(.{4})(.{4})(.{4})/, '$1-$2-$3-$4-'),
    volumeName: new TextDecoder().decode(nul < 0 ? name : name.subarray(0, nul)),
    kind: featureIncompat & ext4Features ? 'ext4' : hasJournal ? 'ext3' : 'ext2',
  };
}

/** Does group `g` hold a superblock backup (and so descriptor blocks)? With sparse_super: 0, 1, powers of 3, 5, 7. */
export function groupHasSuper(sb: Superblock, group: number): boolean {
  if (group <= 1 || (sb.featureRoCompat & RO_COMPAT_SPARSE_SUPER) === 0) return true;
  for (const base of [3, 5, 7]) {
    let n = base;
    while (n < group) n *= base;
    if (n === group) return true;
  }
  return false;
}

/** Block numbers holding the group descriptor table, in order (meta_bg spreads them over groups). */
export function descriptorBlocks(sb: Superblock): number[] {
  const perBlock = sb.blockSize / sb.descSize;
  const count = Math.ceil(sb.groupCount / perBlock);
  // 1 KiB blocks with bigalloc start the file system at block 0, yet the superblock is still at
  // byte 1024 (block 1): the table follows it (e2fsprogs' group_zero_adjust).
  const zeroAdjust = sb.firstDataBlock === 0 && sb.blockSize === 1024 ? 1 : 0;
  const first = sb.firstDataBlock + zeroAdjust + 1;
  const blocks: number[] = [];
  const metaBg = (sb.featureIncompat & INCOMPAT_META_BG) !== 0;
  for (let i = 0; i < count; i++) {
    if (!metaBg || i < sb.firstMetaBg) {
      blocks.push(first + i);
    } else {
      const group = i * perBlock;
      const groupStart = sb.firstDataBlock + group * sb.blocksPerGroup;
      blocks.push((groupStart === 0 ? zeroAdjust : groupStart) + (groupHasSuper(sb, group) ? 1 : 0));
    }
  }
  return blocks;
}

export interface GroupDescriptor {
  inodeBitmap: number;
  inodeTable: number;
  flags: number;
}

/** Decodes `sb.groupCount` descriptors from the concatenated descriptor blocks. */
export function parseGroupDescriptors(sb: Superblock, table: Uint8Array): GroupDescriptor[] {
  const v = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const groups: GroupDescriptor[] = [];
  const wide = sb.descSize >= 64;
  for (let g = 0; g < sb.groupCount; g++) {
    const o = g * sb.descSize;
    if (o + sb.descSize > table.length) throw corrupt(`group descriptor table ends before group ${g}`);
    const inodeTable = v.getUint32(o + 0x08, true) + (wide ? v.getUint32(o + 0x28, true) * 2 ** 32 : 0);
    const inodeBitmap = v.getUint32(o + 0x04, true) + (wide ? v.getUint32(o + 0x24, true) * 2 ** 32 : 0);
    if (inodeTable === 0 || inodeTable >= sb.blocksCount) throw corrupt(`group ${g}'s inode table is at block ${inodeTable}, outside the file system (${sb.blocksCount} blocks)`);
    groups.push({ inodeBitmap, inodeTable, flags: v.getUint16(o + 0x12, true) });
  }
  return groups;
}

/** Blocks one group's inode table spans. */
export function inodeTableBlocks(sb: Superblock): number {
  return Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize);
}

/** Byte offset (in the file system) of inode `ino` (1-based). */
export function inodeOffset(sb: Superblock, groups: GroupDescriptor[], ino: number): number {
  if (!(ino >= 1 && ino <= sb.inodesCount)) throw corrupt(`inode ${ino} is outside 1..${sb.inodesCount}`);
  const group = Math.floor((ino - 1) / sb.inodesPerGroup);
  const index = (ino - 1) % sb.inodesPerGroup;
  return groups[group]!.inodeTable * sb.blockSize + index * sb.inodeSize;
}

export type FileType = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket';

export function fileTypeOfMode(mode: number): FileType | undefined {
  switch (mode & 0xf000) {
    case 0x8000: return 'file';
    case 0x4000: return 'dir';
    case 0xa000: return 'symlink';
    case 0x2000: return 'char';
    case 0x6000: return 'block';
    case 0x1000: return 'fifo';
    case 0xc000: return 'socket';
    default: return undefined;
  }
}

export interface Inode {
  ino: number;
  mode: number;
  type: FileType | undefined;
  uid: number;
  gid: number;
  size: number;
  links: number;
  /** Seconds since the epoch (the low 32 bits, sign-extended as the kernel does before 2038). */
  atime: number;
  ctime: number;
  mtime: number;
  /** Nanoseconds from the extra fields (0 with 128-byte inodes). */
  atimeNs: number;
  ctimeNs: number;
  mtimeNs: number;
  dtime: number;
  flags: number;
  /** 512-byte sectors charged to the file (with huge_file's per-block mode ignored). */
  sectors: number;
  fileAcl: number;
  /** The 60 bytes of i_block: block pointers, an extent root, or a fast symlink's target. */
  blockArea: Uint8Array;
  /** Device number of a char/block device (old or new encoding), else 0. */
  rdev: number;
}

/** Decodes one on-disk inode (`bytes` is its record of s_inode_size bytes). */
export function parseInode(ino: number, bytes: Uint8Array): Inode {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = (o: number) => v.getUint16(o, true);
  const u32 = (o: number) => v.getUint32(o, true);
  const mode = u16(0x00);
  const extra = bytes.length > 128 ? u16(0x80) : 0;
  const extraField = (o: number) => (extra >= o - 128 + 4 ? u32(o) : 0);
  // Extra time fields: 2 epoch bits, then 30 bits of nanoseconds.
  const seconds = (o: number, extraOffset: number) => v.getInt32(o, true) + (extraField(extraOffset) & 3) * 2 ** 32;
  const blockArea = bytes.slice(0x28, 0x28 + 60);
  const b = new DataView(blockArea.buffer);
  const type = fileTypeOfMode(mode);
  let rdev = 0;
  if (type === 'char' || type === 'block') {
    const old = b.getUint32(0, true);
    const fresh = b.getUint32(4, true);
    rdev = old !== 0 ? old : fresh;
  }
  return {
    ino,
    mode,
    type,
    uid: u16(0x02) | (u16(0x78) << 16),
    gid: u16(0x18) | (u16(0x7a) << 16),
    size: u32(0x04) + u32(0x6c) * 2 ** 32,
    links: u16(0x1a),
    atime: seconds(0x08, 0x8c),
    ctime: seconds(0x0c, 0x84),
    mtime: seconds(0x10, 0x88),
    atimeNs: extraField(0x8c) >>> 2,
    ctimeNs: extraField(0x84) >>> 2,
    mtimeNs: extraField(0x88) >>> 2,
    dtime: u32(0x14),
    flags: u32(0x20),
    sectors: u32(0x1c) + u16(0x74) * 2 ** 32,
    fileAcl: u32(0x68) + u16(0x76) * 2 ** 32,
    blockArea,
    rdev,
  };
}

/** A symlink whose target sits in i_block itself (no data block). */
export function isFastSymlink(sb: Superblock, inode: Inode): boolean {
  if (inode.type !== 'symlink' || inode.flags & INODE_FLAG_INLINE_DATA) return false;
  const aclSectors = inode.fileAcl ? sb.blockSize / 512 : 0;
  return inode.size < 60 && inode.sectors - aclSectors === 0;
}

export interface Extent {
  /** First logical block of the file it maps. */
  logical: number;
  /** First physical block. */
  physical: number;
  length: number;
  /** Allocated but unwritten: reads as zeros. */
  unwritten: boolean;
}

export interface ExtentNode {
  depth: number;
  /** Leaves (depth 0). */
  extents: Extent[];
  /** Index entries (depth > 0): child node blocks. */
  children: { logical: number; block: number }[];
}

/** Decodes an extent-tree node (the i_block root or a tree block). */
export function parseExtentNode(bytes: Uint8Array, where: string): ExtentNode {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint16(0, true) !== 0xf30a) throw corrupt(`${where}: extent header magic is 0x${v.getUint16(0, true).toString(16)}, expected 0xf30a`);
  const entries = v.getUint16(2, true);
  const depth = v.getUint16(6, true);
  if (12 + entries * 12 > bytes.length || depth > 5) throw corrupt(`${where}: extent node claims ${entries} entries at depth ${depth}`);
  const node: ExtentNode = { depth, extents: [], children: [] };
  for (let i = 0; i < entries; i++) {
    const o = 12 + i * 12;
    const logical = v.getUint32(o, true);
    if (depth === 0) {
      let length = v.getUint16(o + 4, true);
      const unwritten = length > 32768;
      if (unwritten) length -= 32768;
      const physical = v.getUint16(o + 6, true) * 2 ** 32 + v.getUint32(o + 8, true);
      node.extents.push({ logical, physical, length, unwritten });
    } else {
      node.children.push({ logical, block: v.getUint32(o + 4, true) + v.getUint16(o + 8, true) * 2 ** 32 });
    }
  }
  return node;
}

export interface DirEntry {
  name: string;
  /** Raw name bytes (names are bytes on Linux; `name` is their UTF-8 reading). */
  nameBytes: Uint8Array;
  ino: number;
  /** From the entry's file-type byte when the file system records it. */
  type: FileType | undefined;
}

const direntTypes: Array<FileType | undefined> = [undefined, 'file', 'dir', 'char', 'block', 'fifo', 'socket', 'symlink'];

/**
 * Entries of one directory block, without "." and "..". htree interior blocks look like one
 * empty entry spanning the block, and checksum tails have inode 0, so both are skipped naturally.
 */
export function parseDirBlock(sb: Superblock, block: Uint8Array, where: string): DirEntry[] {
  const v = new DataView(block.buffer, block.byteOffset, block.byteLength);
  const entries: DirEntry[] = [];
  const decoder = new TextDecoder();
  let o = 0;
  while (o + 8 <= block.length) {
    const ino = v.getUint32(o, true);
    // 64 KiB blocks: a record spanning the whole block is stored as 0 or 65535 (ext2fs_get_rec_len).
    const rawRecLen = v.getUint16(o + 4, true);
    const recLen = block.length === 65536 && (rawRecLen === 0 || rawRecLen === 65535) ? 65536 : (rawRecLen & 65532) | ((rawRecLen & 3) << 16);
    const nameLen = sb.hasFileType ? block[o + 6]! : v.getUint16(o + 6, true);
    if (recLen < 8 || recLen % 4 !== 0 || o + recLen > block.length || 8 + nameLen > recLen) {
      throw corrupt(`${where}: directory entry at byte ${o} has record length ${recLen} and name length ${nameLen}`);
    }
    if (ino !== 0 && nameLen > 0) {
      const nameBytes = block.slice(o + 8, o + 8 + nameLen);
      const isDot = nameLen === 1 && nameBytes[0] === 0x2e;
      const isDotDot = nameLen === 2 && nameBytes[0] === 0x2e && nameBytes[1] === 0x2e;
      if (!isDot && !isDotDot) {
        entries.push({ name: decoder.decode(nameBytes), nameBytes, ino, type: sb.hasFileType ? direntTypes[block[o + 7]!] : undefined });
      }
    }
    o += recLen;
  }
  return entries;
}

/** Directory inode flag: names in it are looked up case-insensitively (casefold feature). */
export const INODE_FLAG_CASEFOLD = 0x40000000;
