/**
 * jbd2 journal recovery in memory: what the kernel (or e2fsck) would write back to the file system
 * on the next mount of a guest that was not unmounted cleanly, computed as a map from file-system
 * block to the journal block holding its last committed copy, and served as an overlay over the
 * file system's bytes. ls, get and diff --files then answer about the file system as it will be
 * after recovery.
 *
 * The walk follows the kernel's fs/jbd2/recovery.c: from the journal superblock's s_start and
 * s_sequence, blocks are read in log order (wrapping from the end back to s_first) while each block
 * header carries the jbd2 magic and the expected sequence; a commit block ends a transaction. Only
 * committed transactions are replayed, in order (later copies win), and a block revoked by a
 * committed transaction whose sequence is not older than the copy's is not replayed. Escaped data
 * blocks get their magic number back. Descriptor tag sizes follow the journal's features (v1:
 * 8 bytes; 64bit adds 4; csum v2 adds 2; csum v3 tags are 16 bytes; no SAME_UUID flag adds a
 * 16-byte UUID), and checksummed journals end descriptor blocks in a 4-byte tail.
 *
 * Checksums (csum v2/v3, crc32c) are checked as the kernel checks them: a commit block failing
 * its checksum ends the replay before that transaction; a logged block failing its tag checksum is
 * not replayed; a descriptor or revoke block failing its checksum in a transaction whose commit is
 * not stale makes the journal corrupt (refused); the old v1 journal_checksum (one crc32_be over a
 * transaction's descriptor and data blocks, in its commit block) likewise ends the replay. Refused by name: fast commits, unknown journal features,
 * external journal devices.
 *
 * Invariant: read-only. Nothing here writes; the image stays exactly as it was.
 */
import { UbdcowError } from '../errors.js';
import type { FsSource } from './disk-adapter.js';
import { crc32be, crc32c } from './journal-checksums.js';
import type { ExtVolume } from './ext-reader.js';

const JBD2_MAGIC = 0xc03b3998;
const BLOCK_DESCRIPTOR = 1;
const BLOCK_COMMIT = 2;
const BLOCK_SUPERBLOCK_V1 = 3;
const BLOCK_SUPERBLOCK_V2 = 4;
const BLOCK_REVOKE = 5;

const INCOMPAT_REVOKE = 0x1;
const INCOMPAT_64BIT = 0x2;
const INCOMPAT_ASYNC_COMMIT = 0x4;
const INCOMPAT_CSUM_V2 = 0x8;
const INCOMPAT_CSUM_V3 = 0x10;
const INCOMPAT_FAST_COMMIT = 0x20;
const KNOWN_INCOMPAT = INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_ASYNC_COMMIT | INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT;

const COMPAT_CHECKSUM = 0x1;
const CHECKSUM_TYPE_CRC32 = 1;

const TAG_ESCAPE = 0x1;
const TAG_SAME_UUID = 0x2;
const TAG_LAST = 0x8;

/** Where a replayed block's bytes are: a block of the file system (inside the journal). */
export interface ReplayedBlock {
  journalCopy: number;
  /** The copy's first 4 bytes were the jbd2 magic, zeroed when logged: put it back. */
  escaped: boolean;
}

export interface JournalReplay {
  /** Committed transactions replayed. */
  transactions: number;
  /** File-system block -> its newest committed copy. */
  blocks: Map<number, ReplayedBlock>;
  /** Checksum failures the replay stepped around, as the kernel does. */
  warnings: string[];
}

interface LoggedCopy {
  target: number;
  /** The file-system block (inside the journal) holding the copy. */
  copy: number;
  escaped: boolean;
  /** The tag's checksum (csum v2: 16 bits, v3: 32) and the transaction it belongs to. */
  checksum: number;
  sequence: number;
}

/** What the commands report: the journal was replayed in memory. */
export interface JournalReplayNote {
  /** The image (and partition) whose journal it was. */
  file: string;
  transactions: number;
  blocks: number;
}

interface JournalGeometry {
  first: number;
  /** One past the last block of the circular log. */
  last: number;
  tagBytes: number;
  csumV3: boolean;
  is64: boolean;
  tailBytes: number;
  /** v1 journal_checksum: commit blocks hold a crc32_be of the transaction's blocks. */
  checksumV1: boolean;
  /** The journal's UUID: seeds its checksums. */
  uuid: Uint8Array;
}

/** Sequence numbers wrap at 2^32: a after b? (the kernel's tid_gt) */
function seqAfter(a: number, b: number): boolean {
  return ((a - b) | 0) > 0;
}

function geometry(volume: ExtVolume, sb: DataView, refuse: (why: string) => UbdcowError): JournalGeometry & { start: number; sequence: number } {
  const u32 = (o: number) => sb.getUint32(o, false);
  if (u32(0) !== JBD2_MAGIC) throw refuse(`its journal superblock has magic 0x${u32(0).toString(16)}, expected 0x${JBD2_MAGIC.toString(16)}`);
  const type = u32(4);
  if (type !== BLOCK_SUPERBLOCK_V1 && type !== BLOCK_SUPERBLOCK_V2) throw refuse(`its journal superblock has block type ${type}`);
  const blockSize = u32(0xc);
  if (blockSize !== volume.sb.blockSize) throw refuse(`its journal's block size is ${blockSize}, the file system's ${volume.sb.blockSize}`);
  const maxLen = u32(0x10);
  const first = u32(0x14);
  const incompat = type === BLOCK_SUPERBLOCK_V2 ? u32(0x28) : 0;
  const checksumV1 = type === BLOCK_SUPERBLOCK_V2 && (u32(0x24) & COMPAT_CHECKSUM) !== 0;
  const unknown = incompat & ~KNOWN_INCOMPAT;
  if (unknown) throw refuse(`its journal uses unknown incompatible journal feature 0x${unknown.toString(16)}`);
  if (incompat & INCOMPAT_FAST_COMMIT) throw refuse('its journal uses fast commits (fast_commit), which ubdcow cannot replay');
  const csumV3 = (incompat & INCOMPAT_CSUM_V3) !== 0;
  const csumV2 = (incompat & INCOMPAT_CSUM_V2) !== 0;
  const is64 = (incompat & INCOMPAT_64BIT) !== 0;
  // journal_tag_bytes() in the kernel.
  const tagBytes = csumV3 ? 16 : 12 + (csumV2 ? 2 : 0) - (is64 ? 0 : 4);
  if (first < 1 || first >= maxLen) throw refuse(`its journal superblock says the log runs from block ${first} to ${maxLen}`);
  return { first, last: maxLen, tagBytes, csumV3, is64, tailBytes: csumV2 || csumV3 ? 4 : 0, checksumV1, uuid: new Uint8Array(sb.buffer, sb.byteOffset + 0x30, 16).slice(), start: u32(0x1c), sequence: u32(0x18) };
}

/** Replays the internal journal of `volume` (opened on the disk as it is) in memory. */
export async function replayJournal(volume: ExtVolume): Promise<JournalReplay> {
  const refuse = (why: string) =>
    new UbdcowError(
      'unsupported-fs',
      `${volume.label}: the journal needs recovery (the guest did not unmount cleanly), but ${why}; replay it by booting the guest or with e2fsck on a copy`,
      { file: volume.source.disk.path },
    );
  const { sb } = volume;
  if (sb.journalInode === 0) {
    // Linux's dev_t encoding (new_decode_dev), as `ls -l /dev` shows it: major:minor.
    const dev = sb.journalDevice;
    const device = `${(dev & 0xfff00) >>> 8}:${(dev & 0xff) | ((dev >>> 12) & 0xfff00)}`;
    throw refuse(`the journal is on an external journal device (UUID ${sb.journalUuid}, device ${device}), and ubdcow replays internal journals only`);
  }
  const journalInode = await volume.readInode(sb.journalInode);
  const map = await volume.blockMap(journalInode);
  const bs = sb.blockSize;
  /** The file-system block holding journal block `n`. */
  const physical = (n: number): number => {
    for (const extent of map.extents) {
      if (n >= extent.logical && n < extent.logical + extent.length && !extent.unwritten) return extent.physical + (n - extent.logical);
    }
    throw refuse(`journal block ${n} is not mapped in journal inode ${sb.journalInode}`);
  };
  const readJournal = async (n: number) => {
    const bytes = await volume.readBlock(physical(n));
    return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };
  const geo = geometry(volume, await readJournal(0), refuse);
  const replay: JournalReplay = { transactions: 0, blocks: new Map(), warnings: [] };
  if (geo.start === 0) return replay; // the log is empty: nothing to replay
  if (geo.start < geo.first || geo.start >= geo.last) throw refuse(`its journal starts at block ${geo.start}, outside its log (${geo.first}..${geo.last - 1})`);

  const next = (n: number) => (n + 1 >= geo.last ? geo.first : n + 1);
  const checksummed = geo.tailBytes > 0;
  const seed = crc32c(0xffffffff, geo.uuid);
  /** Descriptor and revoke blocks end in crc32c(seed, block with the tail zeroed). */
  const tailOk = (block: DataView) => {
    const bytes = new Uint8Array(block.buffer, block.byteOffset, block.byteLength).slice();
    const stored = block.getUint32(bs - 4, false);
    bytes.fill(0, bs - 4);
    return crc32c(seed, bytes) === stored;
  };
  /** Commit blocks carry crc32c(seed, block with h_chksum[0] zeroed) in h_chksum[0]. */
  const commitOk = (block: DataView) => {
    const bytes = new Uint8Array(block.buffer, block.byteOffset, block.byteLength).slice();
    const stored = block.getUint32(16, false);
    bytes.fill(0, 16, 20);
    return crc32c(seed, bytes) === stored;
  };
  const pending: LoggedCopy[] = [];
  const committed: Array<{ sequence: number; copies: LoggedCopy[] }> = [];
  const revoked = new Map<number, number>();
  let pendingRevokes: Array<{ block: number; sequence: number }> = [];
  let sequence = geo.sequence;
  let position = geo.start;
  // As the kernel: a descriptor or revoke block failing its checksum is stale only if the commit
  // block after it is older than the last good one; otherwise the journal is corrupt.
  let needCheckCommitTime = false;
  let lastCommitTime = 0;
  let transactionCrc = 0xffffffff;
  for (let steps = 0; steps < geo.last - geo.first; steps++) {
    const block = await readJournal(position);
    if (block.getUint32(0, false) !== JBD2_MAGIC || block.getUint32(8, false) !== sequence) break;
    const type = block.getUint32(4, false);
    if (type === BLOCK_DESCRIPTOR) {
      if (checksummed && !tailOk(block)) needCheckCommitTime = true;
      if (geo.checksumV1 && !needCheckCommitTime) transactionCrc = crc32be(transactionCrc, new Uint8Array(block.buffer, block.byteOffset, block.byteLength));
      let at = 12;
      let tags = 0;
      while (at + geo.tagBytes <= bs - geo.tailBytes) {
        const low = block.getUint32(at, false);
        const flags = geo.csumV3 ? block.getUint32(at + 4, false) : block.getUint16(at + 6, false);
        const high = geo.is64 ? block.getUint32(at + 8, false) : 0;
        const checksum = geo.csumV3 ? block.getUint32(at + 12, false) : block.getUint16(at + 4, false);
        at += geo.tagBytes;
        if (!(flags & TAG_SAME_UUID)) at += 16;
        position = next(position);
        tags++;
        if (geo.checksumV1 && !needCheckCommitTime) transactionCrc = crc32be(transactionCrc, await volume.readBlock(physical(position)));
        pending.push({ target: high * 2 ** 32 + low, copy: physical(position), escaped: (flags & TAG_ESCAPE) !== 0, checksum, sequence });
        if (flags & TAG_LAST) break;
      }
      steps += tags;
    } else if (type === BLOCK_REVOKE) {
      if (checksummed && !tailOk(block)) needCheckCommitTime = true;
      const used = Math.min(block.getUint32(12, false), bs);
      const size = geo.is64 ? 8 : 4;
      for (let at = 16; at + size <= used; at += size) {
        const target = geo.is64 ? block.getUint32(at, false) * 2 ** 32 + block.getUint32(at + 4, false) : block.getUint32(at, false);
        pendingRevokes.push({ block: target, sequence });
      }
    } else if (type === BLOCK_COMMIT) {
      const commitTime = block.getUint32(48, false) * 2 ** 32 + block.getUint32(52, false);
      let corrupt = false;
      if (geo.checksumV1) {
        // The commit block names the CRC type; "none" (all zero) is accepted, as by the kernel.
        const found = block.getUint32(16, false);
        const typeByte = block.getUint8(12);
        const sizeByte = block.getUint8(13);
        corrupt = !((found === transactionCrc && typeByte === CHECKSUM_TYPE_CRC32 && sizeByte === 4) || (typeByte === 0 && sizeByte === 0 && found === 0));
        transactionCrc = 0xffffffff;
      }
      if (!corrupt && needCheckCommitTime) {
        if (commitTime >= lastCommitTime) throw refuse(`its transaction ${sequence} fails its checksum (the kernel refuses to mount such a file system)`);
        break; // a stale block of an older log: the log ends here
      }
      if (corrupt || (checksummed && !commitOk(block))) {
        // Older than the last good commit: stale. Otherwise this transaction is corrupt and the
        // replay stops before it, as the kernel and e2fsck do ("journal transaction N is corrupt").
        if (commitTime >= lastCommitTime) replay.warnings.push(`journal transaction ${sequence} fails its commit checksum: replayed only the transactions before it, as the kernel and e2fsck do`);
        break;
      }
      lastCommitTime = commitTime;
      committed.push({ sequence, copies: pending.splice(0) });
      for (const revoke of pendingRevokes) {
        const known = revoked.get(revoke.block);
        if (known === undefined || seqAfter(revoke.sequence, known)) revoked.set(revoke.block, revoke.sequence);
      }
      pendingRevokes = [];
      sequence = (sequence + 1) >>> 0;
    } else {
      break;
    }
    position = next(position);
  }
  for (const transaction of committed) {
    for (const copy of transaction.copies) {
      const revokedAt = revoked.get(copy.target);
      if (revokedAt !== undefined && !seqAfter(transaction.sequence, revokedAt)) continue;
      if (!(copy.target >= 0 && copy.target < sb.blocksCount)) throw refuse(`its journal logs block ${copy.target}, outside the file system`);
      if (checksummed && !(await copyOk(copy))) {
        replay.warnings.push(`the journal's copy of block ${copy.target} in transaction ${transaction.sequence} fails its checksum: not replayed, as the kernel and e2fsck skip it`);
        continue;
      }
      replay.blocks.set(copy.target, { journalCopy: copy.copy, escaped: copy.escaped });
    }
  }
  replay.transactions = committed.length;
  return replay;

  /** A logged block's tag checksum: crc32c over the transaction's sequence, then the block as logged (v2 keeps the low 16 bits). */
  async function copyOk(copy: LoggedCopy): Promise<boolean> {
    const sequenceBytes = new Uint8Array(4);
    new DataView(sequenceBytes.buffer).setUint32(0, copy.sequence, false);
    const sum = crc32c(crc32c(seed, sequenceBytes), await volume.readBlock(copy.copy));
    return geo.csumV3 ? sum === copy.checksum : (sum & 0xffff) === copy.checksum;
  }
}

/** The file system's bytes with the replayed blocks in place (the same source when nothing was replayed). */
export function journalOverlay(source: FsSource, replay: JournalReplay, blockSize: number): FsSource {
  if (replay.blocks.size === 0) return source;
  return {
    ...source,
    async read(at, length, into) {
      const bytes = await source.read(at, length, into);
      const firstBlock = Math.floor(at / blockSize);
      const endBlock = Math.ceil((at + length) / blockSize);
      for (let block = firstBlock; block < endBlock; block++) {
        const replayed = replay.blocks.get(block);
        if (!replayed) continue;
        const copy = await source.read(replayed.journalCopy * blockSize, blockSize);
        if (replayed.escaped) new DataView(copy.buffer, copy.byteOffset, copy.byteLength).setUint32(0, JBD2_MAGIC, false);
        const from = Math.max(at, block * blockSize);
        const to = Math.min(at + length, (block + 1) * blockSize);
        bytes.set(copy.subarray(from - block * blockSize, to - block * blockSize), from - at);
      }
      return bytes;
    },
  };
}
