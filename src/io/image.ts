import * as path from 'node:path';
import { CowFormatError, UbdcowError, fromSystemError } from '../errors.js';
import { type CowHeader, MAX_HEADER_SIZE, parseHeader } from '../format/header.js';
import { type CowGeometry, computeGeometry } from '../format/geometry.js';
import { SectorBitmap } from '../format/bitmap.js';
import { type FileHandleLike, type FileStat, type FileSystem, type OpenMode, describeKind, nodeFileSystem, readExactly, sizeOf } from './file.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** An open COW file: its parsed header, geometry and handle. */
export interface CowImage {
  path: string;
  file: FileHandleLike;
  header: CowHeader;
  geometry: CowGeometry;
  warnings: string[];
  /** Length of the COW file when it was opened. */
  fileSize: number;
  /** Bytes allocated on disk when it was opened. */
  allocatedBytes: number;
  /** The data area ends before the header's size says it should. */
  dataAreaTruncated: boolean;
}

export interface OpenImageOptions {
  fs?: FileSystem;
  mode?: Extract<OpenMode, 'r' | 'r+'>;
}

/** Refuses what cannot be a disk image before opening it (opening a FIFO would block). */
export async function statImageFile(fs: FileSystem, file: string, what: string): Promise<FileStat> {
  if (file === '-' || file === '') {
    throw new UbdcowError(
      'usage',
      `no file name given for the ${what} ('-', standard input, is not supported: images are read at random offsets); save it to a file and name that`,
    );
  }
  let stat: FileStat;
  try {
    stat = await fs.stat(file);
  } catch (err) {
    throw fromSystemError(err, file, `open ${what}`);
  }
  if (stat.kind === 'directory') throw new UbdcowError('not-a-file', `${file}: is a directory, expected a ${what}`, { file });
  if (stat.kind !== 'file' && stat.kind !== 'block-device') {
    throw new UbdcowError('not-a-file', `${file}: is ${describeKind(stat.kind)}, expected a ${what} (a regular file or block device)`, { file });
  }
  return stat;
}

/** statImageFile, then open; an error opening names the file and `action`. The caller closes the handle. */
export async function openImageFile(
  fs: FileSystem,
  file: string,
  what: string,
  mode: OpenMode = 'r',
  action = `open ${what}`,
): Promise<{ handle: FileHandleLike; stat: FileStat }> {
  const stat = await statImageFile(fs, file, what);
  try {
    return { handle: await fs.open(file, mode), stat };
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
}

/** Proves `file` can be opened for reading (opened and closed again); errors say "read <what>". */
export async function probeReadable(fs: FileSystem, file: string, what: string): Promise<void> {
  try {
    const probe = await fs.open(file, 'r');
    await probe.close();
  } catch (err) {
    throw fromSystemError(err, file, `read ${what}`);
  }
}

/** Opens and validates a COW file; the caller closes `image.file`. */
const openImageOptionKeys: OptionKeys<OpenImageOptions> = { fs: true, mode: true };

export async function openImage(file: string, options: OpenImageOptions = {}): Promise<CowImage> {
  checkOptions('openImage', options, openImageOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  const { handle } = await openImageFile(fs, file, 'COW file', options.mode ?? 'r');
  try {
    return await readImage(file, handle);
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}

async function readImage(file: string, handle: FileHandleLike): Promise<CowImage> {
  let stat: FileStat;
  let start: Uint8Array;
  try {
    stat = await handle.stat();
    start = new Uint8Array(MAX_HEADER_SIZE);
    const got = await handle.read(start, 0, start.length, 0);
    start = start.subarray(0, got);
  } catch (err) {
    throw fromSystemError(err, file, 'read COW header');
  }
  if (start.length === 0) throw new CowFormatError('empty', 'file', 'empty', 'a UML COW file', file);
  let parsed;
  let geometry: CowGeometry;
  try {
    parsed = parseHeader(start);
    geometry = computeGeometry(parsed.header);
  } catch (err) {
    if (err instanceof CowFormatError) throw err.inFile(file);
    throw err;
  }
  const fileSize = await sizeOf(stat).catch((err) => {
    throw fromSystemError(err, file, 'find the size of');
  });
  const bitmapEnd = geometry.bitmapOffset + geometry.bitmapLength;
  if (fileSize < bitmapEnd) {
    throw new CowFormatError('truncated-bitmap', 'file length', fileSize, `at least ${bitmapEnd} bytes (the bitmap ends there)`, file);
  }
  return {
    path: file,
    file: handle,
    header: parsed.header,
    geometry,
    warnings: parsed.warnings,
    fileSize,
    allocatedBytes: stat.allocated,
    dataAreaTruncated: fileSize < geometry.fileLength,
  };
}

/** 1 MiB of bitmap covers 4 GiB of disk: big enough to be fast, small enough for any image. */
export const BITMAP_CHUNK_BYTES = 1 << 20;

/**
 * Streams the bitmap a chunk at a time; each slice's sector numbers are relative to
 * `slice.firstSector`. Only covered sectors (see CowGeometry) are included.
 */
export async function* bitmapSlices(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorBitmap> {
  const { bitmapOffset, bitmapLength, coveredSectors } = image.geometry;
  const buffer = new Uint8Array(Math.min(chunkBytes, Math.max(bitmapLength, 1)));
  for (let byte = 0; byte < bitmapLength; byte += buffer.length) {
    const length = Math.min(buffer.length, bitmapLength - byte);
    await readExactly(image.file, image.path, 'read the bitmap of', { buffer, offset: 0, length, position: bitmapOffset + byte }, (got) =>
      new CowFormatError('truncated-bitmap', 'bitmap', `${bitmapOffset + byte + got} bytes into the file`, `${bitmapLength} bytes from offset ${bitmapOffset}`, image.path),
    );
    const firstSector = byte * 8;
    const bits = Math.min(length * 8, coveredSectors - firstSector);
    yield new SectorBitmap(buffer.subarray(0, length), bits, firstSector);
  }
}

/** An allocated extent in sectors: [start, end) of the virtual disk. */
export interface SectorExtent {
  start: number;
  end: number;
}

/** Allocated extents of the whole disk, merged across chunk boundaries. */
export async function* allocatedExtents(image: CowImage, chunkBytes = BITMAP_CHUNK_BYTES): AsyncGenerator<SectorExtent> {
  let pending: SectorExtent | undefined;
  for await (const slice of bitmapSlices(image, chunkBytes)) {
    for (const run of slice.allocatedRuns()) {
      const start = slice.firstSector + run.start;
      const end = slice.firstSector + run.end;
      if (pending && pending.end === start) {
        pending.end = end;
        continue;
      }
      if (pending) yield pending;
      pending = { start, end };
    }
  }
  if (pending) yield pending;
}

/** Reads the whole bitmap into memory (the engine keeps it live, as the kernel does). */
export async function readWholeBitmap(image: CowImage): Promise<SectorBitmap> {
  const { bitmapOffset, bitmapLength, coveredSectors } = image.geometry;
  const bytes = new Uint8Array(bitmapLength);
  await readExactly(image.file, image.path, 'read the bitmap of', { buffer: bytes, offset: 0, length: bitmapLength, position: bitmapOffset }, (got) =>
    new CowFormatError('truncated-bitmap', 'bitmap', `${got} bytes`, `${bitmapLength} bytes`, image.path),
  );
  return new SectorBitmap(bytes, coveredSectors);
}

export type BackingState = 'ok' | 'missing' | 'unreadable' | 'size-mismatch' | 'mtime-mismatch' | 'not-a-file';

export interface BackingReport {
  /** The path checked: the override if one was given, else the header's. */
  path: string;
  /** The header's path, resolved as the kernel would (relative to the current folder). */
  state: BackingState;
  expected: { size: number; mtime: number };
  actual?: { size: number; mtime: number };
  /** One line saying what is wrong, when something is. */
  problem?: string;
}

/** The kernel's open-time checks on the backing file: size and mtime must match the header. */
export async function checkBacking(header: CowHeader, override?: string, fs: FileSystem = nodeFileSystem): Promise<BackingReport> {
  const backingPath = path.resolve(override ?? header.backingFile);
  const expected = { size: header.size, mtime: header.mtime };
  let stat: FileStat;
  try {
    stat = await fs.stat(backingPath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const state: BackingState = code === 'ENOENT' || code === 'ENOTDIR' ? 'missing' : 'unreadable';
    return { path: backingPath, state, expected, problem: fromSystemError(err, backingPath, 'open backing file').message };
  }
  if (stat.kind !== 'file' && stat.kind !== 'block-device') {
    return { path: backingPath, state: 'not-a-file', expected, problem: `${backingPath}: backing file is ${describeKind(stat.kind)}` };
  }
  const actual = { size: await sizeOf(stat), mtime: stat.mtime };
  if (actual.size !== expected.size) {
    return {
      path: backingPath,
      state: 'size-mismatch',
      expected,
      actual,
      problem: `${backingPath}: backing size is ${actual.size} bytes, header says ${expected.size}`,
    };
  }
  if (actual.mtime !== expected.mtime) {
    return {
      path: backingPath,
      state: 'mtime-mismatch',
      expected,
      actual,
      problem: `${backingPath}: backing mtime is ${actual.mtime} (${isoTime(actual.mtime)}), header says ${expected.mtime} (${isoTime(expected.mtime)})`,
    };
  }
  return { path: backingPath, state: 'ok', expected, actual };
}

/**
 * What to do about a backing file whose mtime differs from the header's. One rule for every
 * command: reading goes on with a warning (the bytes are most likely right: a copy, a touch), while
 * writing, like the kernel, refuses; both name this way out.
 */
export function mtimeMismatchFix(cowPath: string, backingPath: string): string {
  return `if ${backingPath} is a copy or was only touched, "ubdcow rebase ${cowPath} ${backingPath} --compare" records its mtime; -b FILE names another backing file`;
}

export function isoTime(seconds: number): string {
  return new Date(seconds * 1000).toISOString();
}
