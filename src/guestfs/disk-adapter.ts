/**
 * The one place the guest file-system code touches the virtual disk (src/io/engine/virtual-disk.ts):
 * a COW seen through its backing file, or a raw image, as a read-only byte source. If the virtual
 * disk's shape changes, only this file adapts.
 *
 * Invariant: nothing here can write: the only operations offered are reads.
 */
import { UbdcowError } from '../errors.js';
import { allocatedByteExtents, type BaseFile, openVirtualDisk, sameBaseFile, type VirtualDisk } from '../io/engine/index.js';

export interface ByteRange {
  start: number;
  end: number;
}

/** A read-only guest disk: a raw image, or a COW seen through its backing file. */
export interface GuestDisk {
  path: string;
  kind: 'raw' | 'cow';
  size: number;
  /** The file unwritten sectors come from (the raw file itself, or the COW's backing), compared with sameBaseFile. */
  base: BaseFile;
  warnings: string[];
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
  /** COW only: the byte ranges of the virtual disk the COW holds (everything else is the backing's). */
  writtenRanges?(): Promise<ByteRange[]>;
  /** COW only: the backing file as its own raw disk (what the disk held before the COW). */
  backing?: GuestDisk;
  close(): Promise<void>;
}

/** Whether two guest disks read their unwritten sectors from the same file (by identity, hard links included). */
export function sameBase(a: GuestDisk, b: GuestDisk): boolean {
  return sameBaseFile(a.base, b.base);
}

function wrap(disk: VirtualDisk, owner?: VirtualDisk): GuestDisk {
  const guest: GuestDisk = {
    path: disk.path,
    kind: disk.kind,
    size: disk.size,
    base: disk.base,
    warnings: disk.warnings,
    read: (offset, length, into) => disk.read(offset, length, into),
    // The backing is closed with its COW.
    close: owner ? async () => undefined : () => disk.close(),
  };
  if (disk.kind === 'cow') {
    guest.writtenRanges = async () => {
      const ranges: ByteRange[] = [];
      for await (const range of allocatedByteExtents(disk)) ranges.push(range);
      return ranges;
    };
    if (disk.backing) guest.backing = wrap(disk.backing, disk);
  }
  return guest;
}

export async function openGuestDisk(image: string, options: { backing?: string } = {}): Promise<GuestDisk> {
  return wrap(await openVirtualDisk(image, { backing: options.backing }));
}

/** A byte source limited to one partition (or the whole disk at offset 0). */
export interface FsSource {
  disk: GuestDisk;
  offset: number;
  size: number;
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
}

export function partitionSource(disk: GuestDisk, offset: number, size: number): FsSource {
  return {
    disk,
    offset,
    size,
    read(at, length, into) {
      if (at < 0 || at + length > size) {
        throw new UbdcowError('corrupt-fs', `${disk.path}: the file system points at bytes ${at}..${at + length}, past its end (${size} bytes)`, { file: disk.path });
      }
      return disk.read(offset + at, length, into);
    },
  };
}
