import { SectorBitmap } from '../format/bitmap.js';
import { DEFAULT_ALLOCATION_UNIT, defaultUnitSectors } from '../io/engine/index.js';
import type { CowImage, OpenedFile } from '../io/image/index.js';
import { fileEndsEarly, fromSystemError } from '../errors.js';
import { readExactly, writeAll } from '../io/file/index.js';
import { planRead } from '../format/read-plan.js';
import { readCowRun } from './commit/shared.js';

/*
 * What sparsify and rebase --rewrite share: the 4 KiB page as the unit a COW gains or loses
 * sectors in (Debian's UML 6.1 kernel misreads a page that mixes backing and COW sectors, so
 * these commands never leave one behind that was not there before), a window of the bitmap read
 * and written back in place, and reading the disk as the guest sees it over a window.
 */

/** The page these commands work in: the engine's default allocation unit, so both keep the same pages whole. */
export const PAGE_BYTES = DEFAULT_ALLOCATION_UNIT;

/** Sectors per page, as the engine counts them for its default unit. */
export const sectorsPerPage = defaultUnitSectors;

/** A window of the bitmap in memory: sectors [firstSector, firstSector + bits.bitCount), whole bytes. */
export interface BitmapWindow {
  bits: SectorBitmap;
  firstByte: number;
  /** The lowest and one past the highest byte changed since read (for the write back). */
  dirtyFrom: number;
  dirtyTo: number;
}

/**
 * Reads the bitmap bytes covering sectors [firstSector, endSector) (firstSector a multiple of 8):
 * just those bytes, with a blocking read where the handle has one (a window's bitmap is a few
 * hundred bytes, read once per window: a thread-pool round trip, or a 64 KiB slice, costs more).
 * Bytes past the file's end read as zeros (nothing allocated), as the bitmap readers treat them.
 */
export async function readBitmapWindow(image: CowImage, firstSector: number, endSector: number): Promise<BitmapWindow> {
  const { coveredSectors, bitmapLength, bitmapOffset } = image.geometry;
  const firstByte = firstSector / 8;
  const end = Math.min(endSector, coveredSectors);
  const length = Math.max(0, Math.min(bitmapLength, Math.ceil(end / 8)) - firstByte);
  const bytes = new Uint8Array(length);
  if (length > 0) {
    const { handle } = image;
    let got: number;
    try {
      got = handle.readSync ? handle.readSync(bytes, 0, length, bitmapOffset + firstByte) : await handle.read(bytes, 0, length, bitmapOffset + firstByte);
    } catch (err) {
      throw fromSystemError(err, image.path, 'read the bitmap of');
    }
    bytes.fill(0, got);
  }
  const bits = new SectorBitmap(bytes, Math.max(0, Math.min(length * 8, coveredSectors - firstSector)), firstSector);
  return { bits, firstByte, dirtyFrom: Infinity, dirtyTo: -Infinity };
}

/** Sets or clears the bits of disk sectors [start, end) in the window, noting the bytes changed. */
export function setWindowBits(window: BitmapWindow, start: number, end: number, value: boolean): void {
  const { bits } = window;
  const from = Math.max(start, bits.firstSector) - bits.firstSector;
  const to = Math.min(end, bits.firstSector + bits.bitCount) - bits.firstSector;
  if (to <= from) return;
  bits.setRange(from, to, value);
  window.dirtyFrom = Math.min(window.dirtyFrom, Math.floor(from / 8));
  window.dirtyTo = Math.max(window.dirtyTo, Math.ceil(to / 8));
}

/** Writes the window's changed bytes to `target`'s bitmap (the image's own file, or a copy with its layout). */
export async function writeBitmapWindow(image: CowImage, window: BitmapWindow, target = image.handle, targetPath = image.path): Promise<boolean> {
  if (window.dirtyTo <= window.dirtyFrom) return false;
  const position = image.geometry.bitmapOffset + window.firstByte + window.dirtyFrom;
  await writeAll(target, targetPath, 'write the bitmap of', {
    buffer: window.bits.bytes,
    offset: window.dirtyFrom,
    length: window.dirtyTo - window.dirtyFrom,
    position,
  });
  window.dirtyFrom = Infinity;
  window.dirtyTo = -Infinity;
  return true;
}

/** Reads `length` bytes of a raw file (a backing) at `position` into `into` at `at`; a short file is `truncated`. */
export async function readBase(base: Pick<OpenedFile, 'handle' | 'path'>, into: Uint8Array, at: number, length: number, position: number): Promise<void> {
  await readExactly(base.handle, base.path, 'read', { buffer: into, offset: at, length, position }, (got) =>
    fileEndsEarly(base.path, position, got, position + length, 'the backing file'),
  );
}

/**
 * Fills `into` (from `at`) with disk bytes [start, end) as the guest sees them over `base`: the
 * COW's data area where `bits` has the sector's bit set, the base everywhere else. `bits` must
 * cover the range's covered sectors.
 */
export async function readGuestRange(image: CowImage, base: Pick<OpenedFile, 'handle' | 'path'>, bits: SectorBitmap, start: number, end: number, into: Uint8Array, at = 0): Promise<void> {
  const { sectorSize } = image.header;
  const { coveredSectors } = image.geometry;
  for (let position = start; position < end; ) {
    const plan = planRead(bits, sectorSize, coveredSectors, position, end);
    for (const span of plan.spans) {
      const offset = at + span.diskOffset - start;
      if (span.fromCow) await readCowRun(image, into, offset, span.diskOffset, span.diskOffset + span.length);
      else await readBase(base, into, offset, span.length, span.diskOffset);
    }
    if (plan.end <= position) throw new RangeError(`bitmap window does not cover byte ${position}`);
    position = plan.end;
  }
}

/** Reads disk bytes [start, end) as the guest sees them, loading the bitmap bytes the range needs. */
export async function readGuestBytes(image: CowImage, base: Pick<OpenedFile, 'handle' | 'path'>, start: number, end: number, into: Uint8Array): Promise<void> {
  const { sectorSize } = image.header;
  const firstSector = Math.floor(start / sectorSize / 8) * 8;
  const window = await readBitmapWindow(image, firstSector, Math.ceil(end / sectorSize));
  await readGuestRange(image, base, window.bits, start, end, into);
}

/**
 * The data area behind disk bytes [start, end) into `into` at `at`. Bytes past the file's end
 * read as zeros: only allocated sectors are looked at, and the caller's summarizeAllocation has proved those lie
 * inside the file.
 */
export async function readDataArea(image: CowImage, into: Uint8Array, at: number, start: number, end: number): Promise<void> {
  const position = image.geometry.dataOffset + start;
  let got: number;
  try {
    got = await image.handle.read(into, at, end - start, position);
  } catch (err) {
    throw fromSystemError(err, image.path, 'read');
  }
  if (got < end - start) into.fill(0, at + got, at + end - start);
}
