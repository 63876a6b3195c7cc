/**
 * MBR and GPT partition tables, numbered as the table numbers them (as Linux and `partx` do):
 * MBR primary slots 1-4 by slot, logical partitions in the extended partition's chain from 5;
 * GPT by entry index. A table with a gap (MBR slots 1 and 3, GPT using only entry 5) keeps the gap,
 * so `--partition 3` is always what the guest calls /dev/sda3.
 *
 * Invariant: pure reading of 512-byte sectors; anything that does not look like a table is "no
 * table" (undefined), and nothing a table points at outside the disk is returned unflagged.
 */
import { crc32 } from 'node:zlib';

export interface Partition {
  /** The number Linux gives it (sdaN). */
  number: number;
  /** Byte offset and size on the disk. */
  offset: number;
  size: number;
  /** MBR type byte, or GPT type GUID (upper case). */
  type: number | string;
}

/** An MBR extended partition: a container of logical partitions, never a file system. */
export function isExtendedPartition(partition: Partition): boolean {
  return typeof partition.type === 'number' && EXTENDED_TYPES.has(partition.type);
}

export interface PartitionTable {
  type: 'mbr' | 'gpt';
  partitions: Partition[];
}

const SECTOR = 512;
const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const GPT_PROTECTIVE = 0xee;
/** Logical partitions followed at most (a loop in the EBR chain ends here). */
const MAX_LOGICAL = 256;

type Read = (offset: number, length: number) => Promise<Uint8Array>;

function hasBootSignature(sector: Uint8Array): boolean {
  return sector.length >= SECTOR && sector[510] === 0x55 && sector[511] === 0xaa;
}

interface MbrSlot {
  type: number;
  first: number;
  count: number;
}

function mbrSlots(sector: Uint8Array): MbrSlot[] {
  const v = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  return [0, 1, 2, 3].map((i) => ({ type: sector[446 + i * 16 + 4]!, first: v.getUint32(446 + i * 16 + 8, true), count: v.getUint32(446 + i * 16 + 12, true) }));
}

function guidString(bytes: Uint8Array): string {
  const hex = (from: number, to: number, reverse: boolean) => {
    const part = [...bytes.subarray(from, to)];
    return (reverse ? part.reverse() : part).map((b) => b.toString(16).padStart(2, '0')).join('');
  };
  return `${hex(0, 4, true)}-${hex(4, 6, true)}-${hex(6, 8, true)}-${hex(8, 10, false)}-${hex(10, 16, false)}`.toUpperCase();
}

/** The GPT whose header sits at `lba`, if its signature and CRCs check out. */
async function gptAt(read: Read, lba: number, diskSize: number): Promise<Partition[] | undefined> {
  if ((lba + 1) * SECTOR > diskSize) return undefined;
  const header = await read(lba * SECTOR, SECTOR);
  if (new TextDecoder('latin1').decode(header.subarray(0, 8)) !== 'EFI PART') return undefined;
  const v = new DataView(header.buffer, header.byteOffset, header.byteLength);
  const headerSize = v.getUint32(12, true);
  if (headerSize < 92 || headerSize > SECTOR) return undefined;
  const copy = Uint8Array.from(header.subarray(0, headerSize));
  copy.fill(0, 16, 20);
  if (crc32(copy) !== v.getUint32(16, true)) return undefined;
  const entriesLba = Number(v.getBigUint64(72, true));
  const count = v.getUint32(80, true);
  const entrySize = v.getUint32(84, true);
  if (entrySize < 128 || entrySize % 8 !== 0 || count > 65536 || (entriesLba * SECTOR + count * entrySize) > diskSize) return undefined;
  const entries = await read(entriesLba * SECTOR, count * entrySize);
  if (crc32(entries) !== v.getUint32(88, true)) return undefined;
  const e = new DataView(entries.buffer, entries.byteOffset, entries.byteLength);
  const partitions: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const at = i * entrySize;
    const type = entries.subarray(at, at + 16);
    if (type.every((b) => b === 0)) continue;
    const first = Number(e.getBigUint64(at + 32, true));
    const last = Number(e.getBigUint64(at + 40, true));
    if (last < first) continue;
    partitions.push({ number: i + 1, offset: first * SECTOR, size: (last - first + 1) * SECTOR, type: guidString(type) });
  }
  return partitions;
}

/** Logical partitions: the chain of extended boot records inside the extended partition. */
async function logicalPartitions(read: Read, extendedFirst: number, diskSize: number): Promise<Partition[]> {
  const partitions: Partition[] = [];
  let ebr = extendedFirst;
  const seen = new Set<number>();
  while (partitions.length < MAX_LOGICAL && !seen.has(ebr) && (ebr + 1) * SECTOR <= diskSize) {
    seen.add(ebr);
    const sector = await read(ebr * SECTOR, SECTOR);
    if (!hasBootSignature(sector)) break;
    const [data, next] = mbrSlots(sector);
    // Linux numbers the logical partitions that exist, in chain order (an empty EBR takes no number).
    if (data!.type !== 0 && data!.count > 0) {
      partitions.push({ number: 5 + partitions.length, offset: (ebr + data!.first) * SECTOR, size: data!.count * SECTOR, type: data!.type });
    }
    if (!next || !EXTENDED_TYPES.has(next.type) || next.count === 0) break;
    ebr = extendedFirst + next.first;
  }
  return partitions;
}

/** The disk's partition table, or undefined when sector 0 holds none. */
export async function readPartitionTable(read: Read, diskSize: number): Promise<PartitionTable | undefined> {
  if (diskSize < SECTOR) return undefined;
  const mbr = await read(0, SECTOR);
  if (!hasBootSignature(mbr)) return undefined;
  const slots = mbrSlots(mbr);
  if (slots.some((slot) => slot.type === GPT_PROTECTIVE)) {
    const primary = await gptAt(read, 1, diskSize);
    const partitions = primary ?? (await gptAt(read, Math.floor(diskSize / SECTOR) - 1, diskSize));
    if (partitions) return { type: 'gpt', partitions };
    return undefined;
  }
  // A boot sector of a whole-disk FAT/NTFS file system also ends in 55 aa: its "slots" are code.
  // Linux accepts an MBR only when every boot flag is 0 or 0x80; so does this.
  if (slots.some((_, i) => (mbr[446 + i * 16]! & 0x7f) !== 0)) return undefined;
  const partitions: Partition[] = [];
  for (const [i, slot] of slots.entries()) {
    if (slot.type === 0 || slot.count === 0) continue;
    if (EXTENDED_TYPES.has(slot.type)) partitions.push(...(await logicalPartitions(read, slot.first, diskSize)));
    // The extended partition keeps its slot's number too (as in /proc/partitions); it holds no file system.
    partitions.push({ number: i + 1, offset: slot.first * SECTOR, size: slot.count * SECTOR, type: slot.type });
  }
  if (partitions.length === 0) return undefined;
  partitions.sort((x, y) => x.number - y.number);
  return { type: 'mbr', partitions };
}
