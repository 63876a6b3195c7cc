import { UbdcowError, checkByteRange, fileEndsEarly, fileTooShort, fromSystemError, notACow } from '../../errors.js';
import type { SectorExtent } from '../bitmap/index.js';
import {
  type CowImage,
  openBacking,
  type OpenedFile,
  openImageFile,
  probeHeader,
  resolveBackingPath,
} from '../image/index.js';
import { openCowReader } from './engine.js';
import {
  type FileHandleLike,
  fileIdentityOrUndefined,
  type FileSystem,
  nodeFileSystem,
  readExactly,
} from '../file/index.js';
import { type OptionKeys, checkOptions } from '../../options.js';

/*
 * A read-only view of the disk a guest would see: a raw image file as it is (RawDisk), or a COW
 * file seen through its backing file (CowDisk). A CowDisk is a thin shape over the engine's
 * read-only mode (`openCowReader` in engine.ts): the same read lock, backing policy, LazyBitmap and
 * read plan as `ubdcow read`, so `cat`, `diff`, `map`, `ls` and `get` read exactly what it reads.
 */

/** Which file a virtual disk's unwritten sectors come from, for telling "same base" apart. */
export interface FileIdentity {
  /** The path with symlinks resolved. */
  realPath: string;
  /**
   * `dev:ino` of the file (fileIdentity): the same for every name of it, hard links included.
   * Absent only when the file cannot be reached (a missing backing with `openBacking: false`).
   */
  identity?: string;
  size: number;
  mtime: number;
}

/** What sameBaseFile needs of a disk's base. */
export type BaseFile = Pick<FileIdentity, 'realPath' | 'identity'>;

/**
 * Whether two disks' unwritten sectors come from the same file: by identity, as the kernel tells
 * files apart; by path only where a file could not be reached (then nothing better is known).
 */
export function sameBaseFile(a: BaseFile, b: BaseFile): boolean {
  return a.identity !== undefined && b.identity !== undefined ? a.identity === b.identity : a.realPath === b.realPath;
}

interface DiskBase {
  path: string;
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
  close(): Promise<void>;
}

/** A raw image file: the disk is the file. */
export interface RawDisk extends DiskBase {
  kind: 'raw';
}

/** A COW file seen through its backing file. */
export interface CowDisk extends DiskBase {
  kind: 'cow';
  /** The COW image itself (header, geometry, handle). */
  cow: CowImage;
  /** The backing file as a raw disk; undefined when it was not opened (openBacking: false). */
  backing: RawDisk | undefined;
  /** Allocated extents in sectors, merged, streamed from the bitmap. */
  allocatedExtents(): AsyncIterable<SectorExtent>;
  /**
   * Reads the backing file's bytes at these virtual disk offsets, whatever the bitmap says (what
   * the disk held before the COW was written). Without the backing file open: `no-backing`.
   */
  readBacking(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
}

export type VirtualDisk = RawDisk | CowDisk;

export interface OpenVirtualDiskOptions {
  /** Backing file to use instead of the one a COW's header names (like uml_moo -b). */
  backing?: string;
  fs?: FileSystem;
  /**
   * Set to false when only the COW's own contents are needed (e.g. mapping): the backing file is
   * then neither checked nor opened, reading an unallocated sector is an error, and the COW is not
   * locked (otherwise a COW opens with a read lock, refusing one another process holds).
   */
  openBacking?: boolean;
  /**
   * Bytes of bitmap read at a time to plan reads (the engine's bitmap slice; default 64 KiB, which covers 256 MiB of a
   * 512-byte-sector disk): small enough that reading a few scattered extents of a huge, mostly
   * empty COW does not read megabytes of bitmap holes per extent.
   */
  bitmapWindowBytes?: number;
}

const READ_PLAN_WINDOW_BYTES = 64 << 10;
/** The largest bitmap slice the engine's LazyBitmap takes. */
const MAX_WINDOW_BYTES = 1 << 24;

export const RAW_SECTOR_SIZE = 512;

const openVirtualDiskOptionKeys: OptionKeys<OpenVirtualDiskOptions> = { backing: true, fs: true, openBacking: true, bitmapWindowBytes: true };

/** Opens a raw file or a COW file (told apart by the COW magic number, in either byte order). */
export async function openVirtualDisk(file: string, options: OpenVirtualDiskOptions = {}): Promise<VirtualDisk> {
  checkOptions('openVirtualDisk', options, openVirtualDiskOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  if (await looksLikeCow(fs, file)) return openCowDisk(file, options, fs);
  if (options.backing !== undefined) {
    throw notACow(file, `, so a backing file (${options.backing}) makes no sense for it`);
  }
  return openRawDisk(file, fs, 'disk image');
}

/** True when the file starts with the COW magic (either byte order); openImage then decides whether it is valid. */
export async function looksLikeCow(fs: FileSystem, file: string): Promise<boolean> {
  const { handle } = await openImageFile(fs, file, 'disk image');
  try {
    return (await probeHeader(handle, file, 'read disk image')).magic;
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/** Reads exactly `length` bytes of `file` from `position` into `into` at `at`, or says where the file ended. */
async function readDiskBytes(handle: FileHandleLike, file: string, what: string, into: Uint8Array, at: number, length: number, position: number): Promise<void> {
  await readExactly(handle, file, `read ${what}`, { buffer: into, offset: at, length, position }, (got) =>
    fileEndsEarly(file, position, got, position + length, what),
  );
}

function checkRead(disk: DiskBase, offset: number, length: number, into?: Uint8Array): void {
  checkByteRange(disk.path, 'read', offset, length, disk.size);
  if (into && into.length < length) throw new RangeError(`buffer of ${into.length} bytes cannot hold ${length}`);
}

async function openRawDisk(file: string, fs: FileSystem, what: string): Promise<RawDisk> {
  const opened = await openBacking(fs, file, 'r', what);
  try {
    return await rawDiskOver(opened, fs, what, () => opened.handle.close());
  } catch (err) {
    await opened.handle.close().catch(() => undefined);
    throw err;
  }
}

/** A raw disk reading an opened file; `close` says what closing it does. */
async function rawDiskOver(opened: OpenedFile, fs: FileSystem, what: string, close: () => Promise<void>): Promise<RawDisk> {
  const { path: file, handle, size, mtime } = opened;
  const realPath = await fs.realpath(file).catch((err) => {
    throw fromSystemError(err, file, 'resolve the path of');
  });
  const identity = await fileIdentityOrUndefined(fs, file);
  const disk: RawDisk = {
    path: file,
    kind: 'raw',
    size,
    sectorSize: RAW_SECTOR_SIZE,
    base: { realPath, identity, size, mtime },
    warnings: [],
    async read(offset, length, into) {
      checkRead(disk, offset, length, into);
      const buffer = into ?? new Uint8Array(length);
      await readDiskBytes(handle, file, what, buffer, 0, length, offset);
      return buffer.subarray(0, length);
    },
    close,
  };
  return disk;
}

async function openCowDisk(file: string, options: OpenVirtualDiskOptions, fs: FileSystem): Promise<CowDisk> {
  const windowBytes = options.bitmapWindowBytes ?? READ_PLAN_WINDOW_BYTES;
  // A multiple of 4 keeps every slice's words aligned for SectorBitmap's word scans.
  const bitmapSliceBytes = Math.min(MAX_WINDOW_BYTES, Math.max(4, Math.ceil(windowBytes / 4) * 4));
  const { device, image, backing } = await openCowReader(file, { fs, backing: options.backing, openBacking: options.openBacking, bitmapSliceBytes });
  try {
    const { header } = image;
    const backingPath = resolveBackingPath(header, options.backing);
    let base: FileIdentity = { realPath: backingPath, identity: await fileIdentityOrUndefined(fs, backingPath), size: header.size, mtime: header.mtime };
    let backingDisk: RawDisk | undefined;
    if (backing) {
      // The engine owns the backing file's handle: this view of it is closed with the COW.
      backingDisk = await rawDiskOver(backing, fs, 'backing file', async () => undefined);
      base = backingDisk.base;
    }
    const disk: CowDisk = {
      path: file,
      kind: 'cow',
      size: header.size,
      sectorSize: header.sectorSize,
      base,
      warnings: [...image.warnings, ...device.warnings],
      cow: image,
      backing: backingDisk,
      async read(offset, length, into) {
        checkRead(disk, offset, length, into);
        return into ? device.readInto(offset, into.subarray(0, length)) : device.read(offset, length);
      },
      async readBacking(offset, length, into) {
        checkRead(disk, offset, length, into);
        if (!backingDisk) {
          throw new UbdcowError('no-backing', `${file}: byte ${offset} is not in the COW and the backing file was not opened`, { file });
        }
        if (offset + length > backingDisk.size) {
          throw fileTooShort(backingDisk.path, backingDisk.size, offset + length, `the backing file of ${file}`);
        }
        return backingDisk.read(offset, length, into);
      },
      async *allocatedExtents() {
        for await (const run of device.allocatedRuns()) yield { start: run.start, end: run.end };
      },
      close: () => device.close(),
    };
    return disk;
  } catch (err) {
    await device.close().catch(() => undefined);
    throw err;
  }
}

/** Allocated extents of a COW disk in bytes of the virtual disk: [start, end), clipped to its size. */
export async function* allocatedByteExtents(disk: VirtualDisk): AsyncGenerator<{ start: number; end: number }> {
  if (disk.kind !== 'cow') return;
  for await (const extent of disk.allocatedExtents()) {
    const start = extent.start * disk.sectorSize;
    const end = Math.min(extent.end * disk.sectorSize, disk.size);
    if (end > start) yield { start, end };
  }
}
