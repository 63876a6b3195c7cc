/**
 * Setting inode times, which the ext2fs package cannot do (it has no utimes): after libext2fs has
 * closed the file system, the inode records are edited in the staged pages and, with
 * metadata_csum, their checksums recomputed as e2fsprogs does (CRC-32C of the checksum seed, the
 * inode number, its generation and the record with both checksum fields zeroed). Only atime and
 * mtime (seconds, and nanoseconds where the record has room) change; nothing else of the record.
 */
import { UbdcowError } from '../errors.js';
import type { FsSource } from './disk-adapter.js';
import { ExtVolume } from './ext-reader.js';
import { SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE } from './ext-layout.js';

export interface InodeTimes {
  /** The directory the path is relative to (an inode number: symlinks above it are already resolved). */
  baseIno: number;
  /** Names below it, none of them a symlink but possibly the last. */
  names: string[];
  /** Seconds since the epoch, fractional (as Node's stat gives atimeMs / 1000). */
  atime: number;
  mtime: number;
}

const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32C as e2fsprogs' ext2fs_crc32c_le: no final inversion, the caller's seed. */
export function crc32cLe(seed: number, bytes: Uint8Array): number {
  let crc = seed >>> 0;
  for (let i = 0; i < bytes.length; i++) crc = CRC32C_TABLE[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return crc >>> 0;
}

const METADATA_CSUM = 0x400;
const CSUM_SEED = 0x2000;

function encodeTime(view: DataView, secondsAt: number, extraAt: number, extraRoom: boolean, value: number): void {
  const whole = Math.floor(value);
  const nanoseconds = Math.min(999_999_999, Math.round((value - whole) * 1e9));
  // The low 32 bits (signed before 2038); two epoch bits in the extra field carry the rest.
  view.setUint32(secondsAt, whole >>> 0, true);
  if (extraRoom) {
    const epoch = Math.floor((whole - (whole | 0)) / 2 ** 32) & 3;
    view.setUint32(extraAt, ((nanoseconds << 2) | epoch) >>> 0, true);
  }
}

/** Writes the times into the inode records on `source` (the staged file system); `write` takes file-system offsets. */
export async function setInodeTimes(source: FsSource, write: (offset: number, data: Uint8Array) => Promise<void>, label: string, times: InodeTimes[]): Promise<void> {
  if (times.length === 0) return;
  const volume = await ExtVolume.open(source, label);
  // Directory listings by inode, each read once (a tree copy has many files per directory).
  const listings = new Map<number, Map<string, number>>();
  const lookup = async (dir: number, name: string): Promise<number | undefined> => {
    let names = listings.get(dir);
    if (!names) {
      const inode = await volume.readInode(dir);
      names = new Map(inode.type === 'dir' ? (await volume.readDir(inode)).map((entry) => [entry.name, entry.ino] as [string, number]) : []);
      listings.set(dir, names);
    }
    return names.get(name);
  };
  const sbBytes = await source.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE);
  const sb = new DataView(sbBytes.buffer, sbBytes.byteOffset, sbBytes.byteLength);
  const checksummed = (volume.sb.featureRoCompat & METADATA_CSUM) !== 0;
  const seed = volume.sb.featureIncompat & CSUM_SEED ? sb.getUint32(0x270, true) : crc32cLe(0xffffffff, sbBytes.subarray(0x68, 0x78));
  const size = volume.sb.inodeSize;
  for (const { baseIno, names, atime, mtime } of times) {
    let ino: number | undefined = baseIno;
    for (const name of names) ino = ino === undefined ? undefined : await lookup(ino, name);
    if (ino === undefined) continue;
    const offset = volume.inodeOffset(ino);
    const record = new Uint8Array(size);
    await source.read(offset, size, record);
    const view = new DataView(record.buffer);
    const extra = size > 128 ? view.getUint16(0x80, true) : 0;
    if (view.getUint16(0x1a, true) === 0) throw new UbdcowError('corrupt-fs', `${label}: inode ${ino} was freed before its times could be set`);
    encodeTime(view, 0x08, 0x8c, extra >= 0x90 - 128, atime);
    encodeTime(view, 0x10, 0x88, extra >= 0x8c - 128, mtime);
    if (checksummed) {
      const hasHigh = extra >= 4;
      view.setUint16(0x7c, 0, true);
      if (hasHigh) view.setUint16(0x82, 0, true);
      const number = new Uint8Array(8);
      const numbers = new DataView(number.buffer);
      numbers.setUint32(0, ino, true);
      numbers.setUint32(4, view.getUint32(0x64, true), true);
      const crc = crc32cLe(crc32cLe(seed, number), record);
      view.setUint16(0x7c, crc & 0xffff, true);
      if (hasHigh) view.setUint16(0x82, crc >>> 16, true);
    }
    await write(offset, record);
  }
}
