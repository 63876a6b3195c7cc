import { CowFormatError, fromSystemError, notAFile, usageError } from '../../errors.js';
import { type CowHeader, MAX_HEADER_SIZE, type ParsedHeader, hasCowMagic, parseHeader, serializeSameLayout } from '../../format/header.js';
import { type CowGeometry, computeGeometry } from '../../format/geometry.js';
import {
  describeKind,
  type FileHandleLike,
  type FileStat,
  type FileSystem,
  nodeFileSystem,
  type OpenMode,
  sizeOf,
} from '../file/index.js';
import { type OptionKeys, checkOptions } from '../../options.js';
import { lockCowFile } from '../lock/index.js';

/*
 * Opening COW files (and the other image files commands touch): refuse what cannot be an image
 * before opening it, parse and validate the header, and hand back one handle the caller closes.
 * withImage is the prelude every command that works on a COW goes through: open, lock, work, close.
 */

/** An open COW file: its parsed header, geometry and handle. */
export interface CowImage {
  path: string;
  /** The open COW file; whoever opened the image closes it. */
  handle: FileHandleLike;
  /** @deprecated the same handle as `handle` (the old name). */
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
    throw usageError(
      `no file name given for the ${what} ('-', standard input, is not supported: images are read at random offsets); save it to a file and name that`,
    );
  }
  let stat: FileStat;
  try {
    stat = await fs.stat(file);
  } catch (err) {
    throw fromSystemError(err, file, `open ${what}`);
  }
  if (stat.kind === 'directory') throw notAFile(file, 'a directory', `a ${what}`);
  if (stat.kind !== 'file' && stat.kind !== 'block-device') throw notAFile(file, describeKind(stat.kind), `a ${what} (a regular file or block device)`);
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

/** Size in bytes of a regular file or block device; a failed look-up (sysfs for devices) names the file. */
export async function imageSize(stat: FileStat, file: string, what: string): Promise<number> {
  try {
    return await sizeOf(stat);
  } catch (err) {
    throw fromSystemError(err, file, `find the size of ${what}`);
  }
}

/**
 * What a file's first bytes say: no COW magic (a raw image, or anything else), a COW header that
 * parses, or COW magic with a header no reader accepts (`error` says why).
 */
export type HeaderProbe =
  | { magic: false; bytes: Uint8Array }
  | { magic: true; bytes: Uint8Array; parsed: ParsedHeader }
  | { magic: true; bytes: Uint8Array; error: CowFormatError };

/** Reads the first bytes of an open file and tells whether they are a COW header (the one header probe). */
export async function probeHeader(handle: FileHandleLike, file: string, action = 'read COW header'): Promise<HeaderProbe> {
  let bytes = new Uint8Array(MAX_HEADER_SIZE);
  try {
    bytes = bytes.subarray(0, await handle.read(bytes, 0, bytes.length, 0));
  } catch (err) {
    throw fromSystemError(err, file, action);
  }
  if (!hasCowMagic(bytes)) return { magic: false, bytes };
  try {
    return { magic: true, bytes, parsed: parseHeader(bytes) };
  } catch (err) {
    if (err instanceof CowFormatError) return { magic: true, bytes, error: err.inFile(file) };
    throw err;
  }
}

const openImageOptionKeys: OptionKeys<OpenImageOptions> = { fs: true, mode: true };

/** Opens and validates a COW file; the caller closes `image.handle`. */
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
  try {
    stat = await handle.stat();
  } catch (err) {
    throw fromSystemError(err, file, 'read COW header');
  }
  const probe = await probeHeader(handle, file);
  if (probe.bytes.length === 0) throw new CowFormatError('empty', 'file', 'empty', 'a UML COW file', file);
  let parsed: ParsedHeader;
  let geometry: CowGeometry;
  try {
    // Without the magic, parseHeader says so in its own words (bad-magic, truncated-header).
    parsed = 'parsed' in probe ? probe.parsed : parseHeader(probe.bytes);
    if ('error' in probe) throw probe.error;
    geometry = computeGeometry(parsed.header);
  } catch (err) {
    if (err instanceof CowFormatError) throw err.inFile(file);
    throw err;
  }
  const fileSize = await imageSize(stat, file, 'COW file');
  const bitmapEnd = geometry.bitmapOffset + geometry.bitmapLength;
  if (fileSize < bitmapEnd) {
    throw new CowFormatError('truncated-bitmap', 'file length', fileSize, `at least ${bitmapEnd} bytes (the bitmap ends there)`, file);
  }
  return {
    path: file,
    handle,
    file: handle,
    header: parsed.header,
    geometry,
    warnings: parsed.warnings,
    fileSize,
    allocatedBytes: stat.allocated,
    dataAreaTruncated: fileSize < geometry.fileLength,
  };
}

/** Writes a header over the old one (same layout) and makes it durable. */
export async function rewriteHeader(image: Pick<CowImage, 'handle' | 'path'>, header: CowHeader): Promise<void> {
  let bytes: Uint8Array;
  try {
    bytes = serializeSameLayout(header);
  } catch (err) {
    if (err instanceof CowFormatError) throw err.inFile(image.path);
    throw err;
  }
  try {
    await image.handle.write(bytes, 0, bytes.length, 0);
    await image.handle.sync();
  } catch (err) {
    throw fromSystemError(err, image.path, 'rewrite the header of');
  }
}

/**
 * The lock a command holds on the COW while it works: `write` (the kind the UML kernel takes,
 * needs mode r+), `read` (enough to keep a UML from starting, and to refuse one that runs), or
 * `none` (the caller decides, e.g. check only probes).
 */
export type ImageLock = 'write' | 'read' | 'none';

export interface WithImageOptions {
  fs?: FileSystem;
  mode?: Extract<OpenMode, 'r' | 'r+'>;
  lock: ImageLock;
}

const withImageOptionKeys: OptionKeys<WithImageOptions> = { fs: true, mode: true, lock: true };

/** Opens the COW and takes its lock; the caller closes `image.handle` (which drops the lock). */
export async function openLockedImage(file: string, options: WithImageOptions): Promise<CowImage> {
  const image = await openImage(file, { fs: options.fs, mode: options.mode });
  try {
    if (options.lock !== 'none') await lockCowFile(image.handle, file, { exclusive: options.lock === 'write' });
    return image;
  } catch (err) {
    await image.handle.close().catch(() => undefined);
    throw err;
  }
}

/**
 * The command prelude: open the COW, lock it, run `work`, close it (also on error; a close error
 * never hides the work's own). The lock lasts exactly as long as `work`.
 */
export async function withImage<T>(file: string, options: WithImageOptions, work: (image: CowImage) => Promise<T>): Promise<T> {
  checkOptions('withImage', options, withImageOptionKeys);
  const image = await openLockedImage(file, options);
  try {
    return await work(image);
  } finally {
    await image.handle.close().catch(() => undefined);
  }
}

export function isoTime(seconds: number): string {
  return new Date(seconds * 1000).toISOString();
}
