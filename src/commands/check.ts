import { CowFormatError, fromSystemError } from '../errors.js';
import { describeBitmapOverlap, describeHangingDisk } from '../format/kernel-traps.js';
import { allocatedExtents } from '../io/bitmap/index.js';
import { type BackingReport, checkBacking, type CowImage, withImage } from '../io/image/index.js';
import { commitJournalExists, interruptedCommitMessage } from '../io/journal/index.js';
import { type FileSystem, nodeFileSystem, readExactly, writeAll } from '../io/file/index.js';
import { isCowFileLocked } from '../io/lock/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface CheckOptions {
  /** Fix what can be fixed safely: bitmap bits set past the last sector. Nothing else is changed. */
  repair?: boolean;
  /** Check this backing file instead of the one the header names. */
  backing?: string;
  fs?: FileSystem;
}

export type CheckProblemCode =
  | 'header'
  | 'truncated'
  | 'bits-beyond-end'
  | 'backing-missing'
  | 'backing-unreadable'
  | 'backing-not-a-file'
  | 'backing-size'
  | 'backing-mtime'
  | 'commit-interrupted'
  | 'kernel-bitmap-overlap';

export interface CheckProblem {
  code: CheckProblemCode;
  /** One line: file, what is wrong, value and expectation. */
  message: string;
  /** --repair can fix it. */
  repairable: boolean;
  /** --repair fixed it in this run. */
  repaired?: boolean;
  /** For header problems: the format error's own code (bad-magic, bad-version, ...). */
  detail?: string;
}

export interface CheckResult {
  file: string;
  problems: CheckProblem[];
  /** What --repair did, one line each. */
  repaired: string[];
  /** No problems left (after repairs). */
  clean: boolean;
  /** Another process (a running UML) holds a lock on the file: what was read may be changing. */
  inUse: boolean;
  warnings: string[];
  backing?: BackingReport;
}

const backingProblemCodes: Record<Exclude<BackingReport['state'], 'ok'>, CheckProblemCode> = {
  missing: 'backing-missing',
  unreadable: 'backing-unreadable',
  'not-a-file': 'backing-not-a-file',
  'size-mismatch': 'backing-size',
  'mtime-mismatch': 'backing-mtime',
};

const checkCowOptionKeys: OptionKeys<CheckOptions> = { repair: true, backing: true, fs: true };

/**
 * Checks a COW file the way the kernel would meet it: header, geometry, file length, stray bitmap
 * bits, backing file presence and size/mtime, and a leftover in-place commit journal. Problems are
 * returned, not thrown; only failures to read the file at all throw.
 */
export async function checkCow(cowPath: string, options: CheckOptions = {}): Promise<CheckResult> {
  checkOptions('checkCow', options, checkCowOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  const result: CheckResult = { file: cowPath, problems: [], repaired: [], clean: true, inUse: false, warnings: [] };
  // Set once the file is open: a format error before that is the answer, after it a failure.
  let opened = false;
  try {
    await withImage(cowPath, { fs, mode: options.repair ? 'r+' : 'r', lock: options.repair ? 'write' : 'none' }, async (image) => {
      opened = true;
      if (!options.repair) result.inUse = await isCowFileLocked(image.handle, cowPath, { exclusive: false });
      result.warnings.push(...image.warnings);
      checkKernelTraps(image, result);
      await checkLength(image, result);
      await checkBitsBeyondEnd(image, result, options.repair ?? false);
      const backing = await checkBacking(image.header, options.backing, fs);
      result.backing = backing;
      if (backing.state !== 'ok') {
        result.problems.push({
          code: backingProblemCodes[backing.state],
          message: `${cowPath}: ${backing.problem ?? `backing file ${backing.state}`}`,
          repairable: false,
        });
      }
      // A journal that is there but unreadable as one still means an interrupted commit; an I/O
      // error is not an answer, so it propagates (exit 2: could not check).
      if (await commitJournalExists(fs, cowPath)) {
        result.problems.push({ code: 'commit-interrupted', message: interruptedCommitMessage(cowPath), repairable: false });
      }
    });
  } catch (err) {
    if (opened || !(err instanceof CowFormatError)) throw err;
    const code: CheckProblemCode = err.code === 'truncated-bitmap' ? 'truncated' : 'header';
    result.problems.push({ code, message: err.message, repairable: false, detail: err.code });
    result.clean = false;
    return result;
  }
  result.clean = result.problems.every((problem) => problem.repaired);
  return result;
}

/**
 * Issue 15 items 6 and 7: an alignment whose data area the kernel's bitmap writes overlap is a
 * problem (guest writes corrupt sector 0); a disk too small for the kernel is a warning.
 */
function checkKernelTraps(image: CowImage, result: CheckResult): void {
  const overlap = describeBitmapOverlap(image.geometry, image.header.alignment);
  if (overlap) result.problems.push({ code: 'kernel-bitmap-overlap', message: `${image.path}: ${overlap}`, repairable: false });
  const hanging = describeHangingDisk(image.geometry);
  if (hanging) result.warnings.push(`${image.path}: ${hanging}`);
}

/** A file shorter than its data area: sectors allocated past the end have lost their data. */
async function checkLength(image: CowImage, result: CheckResult): Promise<void> {
  const { fileLength, dataOffset } = image.geometry;
  if (!image.dataAreaTruncated) return;
  const { sectorSize } = image.header;
  let lostSectors = 0;
  // A sector with any byte past the end is lost: only the whole sectors before the end survive
  // (issue 15 item 2: this rounded up, calling a sector cut 1-511 bytes in intact).
  const firstLost = Math.floor((image.fileSize - dataOffset) / sectorSize);
  for await (const extent of allocatedExtents(image)) {
    const firstPastEnd = Math.max(extent.start, firstLost);
    if (extent.end > firstPastEnd) lostSectors += extent.end - firstPastEnd;
  }
  const consequence =
    lostSectors > 0
      ? `; ${lostSectors} allocated sectors lie past the end and their data is lost`
      : '; no allocated sector lies past the end';
  result.problems.push({
    code: 'truncated',
    message: `${image.path}: file length is ${image.fileSize} bytes, expected ${fileLength} (data_offset ${dataOffset} + size ${image.header.size})${consequence}`,
    repairable: false,
  });
}

/**
 * The bitmap's last byte has bits for sectors past the end of the disk; the kernel never sets
 * them, so a set one means the bitmap was written by something else (or damaged).
 */
async function checkBitsBeyondEnd(image: CowImage, result: CheckResult, repair: boolean): Promise<void> {
  const { bitmapOffset, bitmapLength, sectors } = image.geometry;
  const firstByte = Math.floor(sectors / 8);
  if (firstByte >= bitmapLength) return;
  const tail = new Uint8Array(bitmapLength - firstByte);
  const position = bitmapOffset + firstByte;
  await readExactly(image.handle, image.path, 'read the bitmap of', { buffer: tail, offset: 0, length: tail.length, position }, (got) =>
    new CowFormatError('truncated-bitmap', 'bitmap', `${position + got - bitmapOffset} bytes long`, `${bitmapLength} bytes from offset ${bitmapOffset}`, image.path),
  );
  const strayBits: number[] = [];
  const cleaned = tail.slice();
  for (let bit = sectors; bit < bitmapLength * 8; bit++) {
    const index = Math.floor(bit / 8) - firstByte;
    const mask = 1 << (bit & 7);
    if (tail[index] & mask) {
      strayBits.push(bit);
      cleaned[index] &= ~mask;
    }
  }
  if (strayBits.length === 0) return;
  const where = strayBits.length === 1 ? `bit ${strayBits[0]} is` : `bits ${strayBits.join(', ')} are`;
  const problem: CheckProblem = {
    code: 'bits-beyond-end',
    message: `${image.path}: bitmap ${where} set, expected clear (the disk has ${sectors} sectors, 0-${sectors - 1})`,
    repairable: true,
  };
  result.problems.push(problem);
  if (!repair) return;
  await writeAll(image.handle, image.path, 'repair the bitmap of', { buffer: cleaned, offset: 0, length: cleaned.length, position });
  await image.handle.sync().catch((err: unknown) => {
    throw fromSystemError(err, image.path, 'repair the bitmap of');
  });
  problem.repaired = true;
  result.repaired.push(`${image.path}: cleared ${strayBits.length} bitmap bit(s) past the last sector (${strayBits.join(', ')})`);
}
