import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../errors.js';
import { COW_MAGIC } from '../format/header.js';
import { SectorBitmap } from '../format/bitmap.js';
import { type FileHandleLike, type FileSystem, nodeFileSystem, readExactly, sizeOf } from './file.js';
import { BITMAP_CHUNK_BYTES, type CowImage, type SectorExtent, allocatedExtents, mtimeMismatchFix, openImage, openImageFile } from './image.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** Which file a virtual disk's unwritten sectors come from, for telling "same base" apart. */
export interface FileIdentity {
  /** The path with symlinks resolved. */
  realPath: string;
  size: number;
  mtime: number;
}

/**
 * A read-only view of the disk a guest would see: a raw image file as it is, or a COW file seen
 * through its backing file (allocated sectors from the COW's data area, the rest from the backing).
 */
export interface VirtualDisk {
  path: string;
  kind: 'raw' | 'cow';
  /** Virtual disk size in bytes (for a COW, the size its header records). */
  size: number;
  /** The COW's sector size; 512 for raw files, the unit the kernel uses. */
  sectorSize: number;
  /** For a raw disk the file itself; for a COW its backing file (as opened, after any override). */
  base: FileIdentity;
  /** Things worth telling the user that do not stop reading (e.g. a backing mtime mismatch). */
  warnings: string[];
  /**
   * Reads [offset, offset + length) of the virtual disk, into `into` when given (it must hold
   * `length` bytes). Reading past the end of the disk, or a backing or data area that ends too
   * early, is an error: a short file never reads as zeros.
   */
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
  /** COW only: allocated extents in sectors, merged, streamed from the bitmap. */
  allocatedExtents?(): AsyncIterable<SectorExtent>;
  /** COW only: the COW image itself (header, geometry, handle). */
  cow?: CowImage;
  /** COW only: the backing file as a raw disk, when it was opened. */
  backing?: VirtualDisk;
  /**
   * COW only: reads the backing file's bytes at these virtual disk offsets, whatever the bitmap
   * says (what the disk held before the COW was written).
   */
  readBacking?(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
  close(): Promise<void>;
}

export interface OpenVirtualDiskOptions {
  /** Backing file to use instead of the one a COW's header names (like uml_moo -b). */
  backing?: string;
  fs?: FileSystem;
  /**
   * Set to false when only the COW's own contents are needed (e.g. mapping): the backing file is
   * then not opened, and reading an unallocated sector is an error.
   */
  openBacking?: boolean;
  /** Bytes of bitmap kept in memory at a time (1 MiB covers 4 GiB of a 512-byte-sector disk). */
  bitmapWindowBytes?: number;
}

export const RAW_SECTOR_SIZE = 512;

/** Opens a raw file or a COW file (told apart by the COW magic number, in either byte order). */
const openVirtualDiskOptionKeys: OptionKeys<OpenVirtualDiskOptions> = { backing: true, fs: true, openBacking: true, bitmapWindowBytes: true };

export async function openVirtualDisk(file: string, options: OpenVirtualDiskOptions = {}): Promise<VirtualDisk> {
  checkOptions('openVirtualDisk', options, openVirtualDiskOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  if (await looksLikeCow(fs, file)) return openCowDisk(file, options, fs);
  if (options.backing !== undefined) {
    throw new UbdcowError('not-a-cow', `${file}: is not a UML COW file (no COW magic), so a backing file (${options.backing}) makes no sense for it`, { file });
  }
  return openRawDisk(file, fs, 'disk image');
}

/** True when the file starts with the COW magic (either byte order); parseHeader then decides whether it is valid. */
export async function looksLikeCow(fs: FileSystem, file: string): Promise<boolean> {
  const { handle } = await openImageFile(fs, file, 'disk image');
  try {
    const start = new Uint8Array(4);
    const got = await handle.read(start, 0, 4, 0).catch((err) => {
      throw fromSystemError(err, file, 'read disk image');
    });
    if (got < 4) return false;
    const view = new DataView(start.buffer);
    return view.getUint32(0, false) === COW_MAGIC || view.getUint32(0, true) === COW_MAGIC;
  } finally {
    await handle.close().catch(() => undefined);
  }
}

async function identityOf(fs: FileSystem, file: string, size: number, mtime: number): Promise<FileIdentity> {
  const realPath = await fs.realpath(file).catch((err) => {
    throw fromSystemError(err, file, 'resolve the path of');
  });
  return { realPath, size, mtime };
}

function checkRange(disk: { path: string; size: number }, offset: number, length: number, into?: Uint8Array): void {
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= disk.size)) {
    throw new UbdcowError('out-of-range', `${disk.path}: read of ${length} bytes at offset ${offset} is outside the disk (0 to ${disk.size} bytes)`, {
      file: disk.path,
    });
  }
  if (into && into.length < length) throw new RangeError(`buffer of ${into.length} bytes cannot hold ${length}`);
}

/** Reads exactly `length` bytes or says which file ended where. */
async function readDiskBytes(
  handle: FileHandleLike,
  file: string,
  what: string,
  into: Uint8Array,
  at: number,
  length: number,
  position: number,
): Promise<void> {
  await readExactly(handle, file, `read ${what}`, { buffer: into, offset: at, length, position }, (got) =>
    new UbdcowError(
      'short-read',
      `${file}: ${what} ends early: got ${got} of ${length} bytes at byte ${position}, expected all of them (is the file truncated?)`,
      { file },
    ),
  );
}

async function openRawDisk(file: string, fs: FileSystem, what: string): Promise<VirtualDisk> {
  const { handle, stat } = await openImageFile(fs, file, what);
  try {
    const size = await sizeOf(stat).catch((err) => {
      throw fromSystemError(err, file, `find the size of ${what}`);
    });
    const base = await identityOf(fs, file, size, stat.mtime);
    const disk: VirtualDisk = {
      path: file,
      kind: 'raw',
      size,
      sectorSize: RAW_SECTOR_SIZE,
      base,
      warnings: [],
      async read(offset, length, into) {
        checkRange(disk, offset, length, into);
        const buffer = into ?? new Uint8Array(length);
        await readDiskBytes(handle, file, what, buffer, 0, length, offset);
        return buffer.subarray(0, length);
      },
      close: () => handle.close(),
    };
    return disk;
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}

/** The part of the bitmap in memory: bits for sectors [firstSector, firstSector + bitCount). */
class BitmapWindow {
  private slice: SectorBitmap | undefined;
  private readonly buffer: Uint8Array;

  constructor(
    private readonly image: CowImage,
    windowBytes: number,
  ) {
    // A multiple of 4 keeps every window's words aligned for SectorBitmap's word scans.
    const bytes = Math.max(4, Math.ceil(windowBytes / 4) * 4);
    this.buffer = new Uint8Array(Math.min(bytes, Math.max(4, Math.ceil(image.geometry.bitmapLength / 4) * 4)));
  }

  /** The window holding `sector`'s bit, loading it if needed (sector must be covered). */
  async at(sector: number): Promise<SectorBitmap> {
    const current = this.slice;
    if (current && sector >= current.firstSector && sector < current.firstSector + current.bitCount) return current;
    const { bitmapOffset, bitmapLength, coveredSectors } = this.image.geometry;
    const windowBits = this.buffer.length * 8;
    const firstSector = Math.floor(sector / windowBits) * windowBits;
    const firstByte = firstSector / 8;
    const length = Math.min(this.buffer.length, bitmapLength - firstByte);
    this.slice = undefined;
    await readDiskBytes(this.image.file, this.image.path, 'the bitmap of', this.buffer, 0, length, bitmapOffset + firstByte);
    const bits = Math.min(length * 8, coveredSectors - firstSector);
    this.slice = new SectorBitmap(this.buffer.subarray(0, length), bits, firstSector);
    return this.slice;
  }
}

async function openCowDisk(file: string, options: OpenVirtualDiskOptions, fs: FileSystem): Promise<VirtualDisk> {
  const image = await openImage(file, { fs });
  let backing: VirtualDisk | undefined;
  try {
    const { header, geometry } = image;
    const warnings = [...image.warnings];
    const backingPath = path.resolve(options.backing ?? header.backingFile);
    let base: FileIdentity;
    if (options.openBacking === false) {
      base = { realPath: backingPath, size: header.size, mtime: header.mtime };
    } else {
      if (options.backing === undefined && header.backingFile === '') {
        throw new UbdcowError('no-backing', `${file}: the header names no backing file (give one with a backing option)`, { file });
      }
      backing = await openRawDisk(backingPath, fs, 'backing file');
      base = backing.base;
      if (backing.base.mtime !== header.mtime) {
        warnings.push(
          `backing file ${backingPath} has mtime ${backing.base.mtime}, the header says ${header.mtime} (the kernel would refuse it; ${mtimeMismatchFix(file, backingPath)})`,
        );
      }
      if (backing.size !== header.size) {
        warnings.push(`backing file ${backingPath} is ${backing.size} bytes, the header says ${header.size}`);
      }
    }
    const { sectorSize, size } = header;
    const window = new BitmapWindow(image, options.bitmapWindowBytes ?? BITMAP_CHUNK_BYTES);
    const backingDisk = backing;

    const readAllocated = (buffer: Uint8Array, at: number, length: number, offset: number) =>
      readDiskBytes(image.file, file, 'the COW data area', buffer, at, length, geometry.dataOffset + offset);

    const readFromBacking = async (buffer: Uint8Array, at: number, length: number, offset: number): Promise<void> => {
      if (!backingDisk) {
        throw new UbdcowError('no-backing', `${file}: byte ${offset} is not in the COW and the backing file was not opened`, { file });
      }
      if (offset + length > backingDisk.size) {
        throw new UbdcowError(
          'short-backing',
          `${backingDisk.path}: backing file is ${backingDisk.size} bytes, ${file} needs its bytes up to ${offset + length}`,
          { file: backingDisk.path },
        );
      }
      await backingDisk.read(offset, length, buffer.subarray(at, at + length));
    };

    const disk: VirtualDisk = {
      path: file,
      kind: 'cow',
      size,
      sectorSize,
      base,
      warnings,
      cow: image,
      backing,
      async read(offset, length, into) {
        checkRange(disk, offset, length, into);
        const buffer = into ?? new Uint8Array(length);
        const end = offset + length;
        let position = offset;
        while (position < end) {
          const sector = Math.floor(position / sectorSize);
          let runEndSector: number;
          let allocated: boolean;
          if (sector >= geometry.coveredSectors) {
            // V1/V2 bitmaps have no bit for the last few sectors: those always come from the backing.
            runEndSector = geometry.sectors;
            allocated = false;
          } else {
            const slice = await window.at(sector);
            const relative = sector - slice.firstSector;
            const lastWanted = Math.min(Math.ceil(end / sectorSize), slice.firstSector + slice.bitCount) - slice.firstSector;
            allocated = slice.get(relative);
            runEndSector = slice.firstSector + (allocated ? slice.nextClear(relative, lastWanted) : slice.nextSet(relative, lastWanted));
          }
          const runEnd = Math.min(end, runEndSector * sectorSize);
          const at = position - offset;
          if (allocated) await readAllocated(buffer, at, runEnd - position, position);
          else await readFromBacking(buffer, at, runEnd - position, position);
          position = runEnd;
        }
        return buffer.subarray(0, length);
      },
      async readBacking(offset, length, into) {
        checkRange(disk, offset, length, into);
        const buffer = into ?? new Uint8Array(length);
        await readFromBacking(buffer, 0, length, offset);
        return buffer.subarray(0, length);
      },
      allocatedExtents: () => allocatedExtents(image),
      async close() {
        await image.file.close();
        if (backingDisk) await backingDisk.close();
      },
    };
    return disk;
  } catch (err) {
    await image.file.close().catch(() => undefined);
    if (backing) await backing.close().catch(() => undefined);
    throw err;
  }
}

/** Allocated extents of a COW disk in bytes of the virtual disk: [start, end), clipped to its size. */
export async function* allocatedByteExtents(disk: VirtualDisk): AsyncGenerator<{ start: number; end: number }> {
  if (!disk.allocatedExtents) return;
  for await (const extent of disk.allocatedExtents()) {
    const start = extent.start * disk.sectorSize;
    const end = Math.min(extent.end * disk.sectorSize, disk.size);
    if (end > start) yield { start, end };
  }
}
