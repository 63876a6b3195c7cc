import { UbdcowError, fromSystemError } from '../errors.js';
import { allocatedWindows } from '../io/bitmap/index.js';
import {
  backingError,
  checkBacking,
  type CowImage,
  mtimeMismatchFix,
  openBacking,
  type OpenedFile,
  withImage,
} from '../io/image/index.js';
import { commitJournalExists, interruptedCommitError } from '../io/journal/index.js';
import { type FileSystem, nodeFileSystem, punchHole } from '../io/file/index.js';
import type { GuestDisk } from '../guestfs/disk-adapter.js';
import { type FreeBlocks, readFreeBlocks } from '../guestfs/ext-free-blocks.js';
import { openVolume } from '../guestfs/guest-fs.js';
import { type OptionKeys, checkOptions } from '../options.js';
import { summarizeAllocation } from './commit/shared.js';
import { type BitmapWindow, PAGE_BYTES, readBase, readBitmapWindow, readDataArea, readGuestBytes, sectorsPerPage, setWindowBits, writeBitmapWindow } from './disk-pages.js';

/*
 * `sparsify`: make a COW hold only what it must, in place (virt-sparsify --in-place, qemu-img
 * convert -S). A 4 KiB page the COW holds is dropped when each of its allocated sectors either
 * (a) equals the backing file's bytes, or (b) with the guest's ext2/3/4 read, lies wholly in
 * blocks the file system marks free. Whole pages only: a page is dropped with all its sectors or
 * kept as it is, so no page is left half in the COW and half in the backing by this command.
 *
 * Crash safety: a dropped page's bits are cleared (bitmap write, then fdatasync) before its data
 * is punched out of the data area. Killed at any moment, the COW reads as the same guest: a page
 * whose bit is clear reads from the backing (the same bytes for (a); a free block's contents the
 * guest never reads for (b)), and a page whose bit is still set still has its data. A bitmap
 * byte covers one page of 512-byte sectors, so no kill leaves a page half cleared. Data punched
 * late (or never, when a kill came first) only costs space.
 */

export interface SparsifyOptions {
  /**
   * Also drop sectors lying in blocks the guest's ext2/3/4 file system marks free: true requires
   * one (an error otherwise), false never reads it, undefined (default) uses it when the disk has one.
   */
  guestFs?: boolean;
  /** 1-based partition holding the file system (as `ls`/`get --partition`). */
  partition?: number;
  /** Use this backing file instead of the header's (it must still match the header's size and mtime). */
  backing?: string;
  /** Find and report what would be dropped; change nothing (takes only a read lock). */
  dryRun?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  fs?: FileSystem;
  /** Disk bytes compared per step (tests make it small). Default 8 MiB. */
  windowBytes?: number;
}

export interface SparsifyResult {
  cow: string;
  backing: string;
  dryRun: boolean;
  /** The guest file system whose free blocks were used, when one was. */
  fileSystem?: { location: string; kind: string; blockSize: number; freeBlocks: number };
  /** Why no file system was used (auto mode), when none was. */
  fileSystemSkipped?: string;
  /** Bytes of the disk the COW held before. */
  allocatedBytes: number;
  dropped: {
    pages: number;
    sectors: number;
    bytes: number;
    /** Sectors equal to the backing file's bytes. */
    equalSectors: number;
    equalBytes: number;
    /** Sectors (not equal to the backing) wholly in free file-system blocks. */
    freeSectors: number;
    freeBytes: number;
  };
  /** Space the COW file takes on the host disk; `after` is an estimate with dryRun. */
  onDisk: { before: number; after: number; estimated: boolean };
  /** False when the host file system cannot punch holes: the bits are cleared but no space is freed. */
  holesPunched: boolean;
  durationMs: number;
  warnings: string[];
}

const sparsifyOptionKeys: OptionKeys<SparsifyOptions> = {
  guestFs: true,
  partition: true,
  backing: true,
  dryRun: true,
  onProgress: true,
  fs: true,
  windowBytes: true,
};

const DEFAULT_WINDOW_BYTES = 8 << 20;
/** Bit clears are made durable and their pages punched every this many disk bytes. */
const BATCH_BYTES = 512 << 20;
/** Hole punches in flight at once. */
const PUNCHES_IN_FLIGHT = 8;
/** Neighbouring touched pages closer than this are read in one go (holes read cheaply). */
const READ_GAP_BYTES = 64 << 10;

export async function sparsifyCow(cowPath: string, options: SparsifyOptions = {}): Promise<SparsifyResult> {
  checkOptions('sparsifyCow', options, sparsifyOptionKeys);
  const started = Date.now();
  const fs = options.fs ?? nodeFileSystem;
  const dryRun = options.dryRun ?? false;
  return withImage(cowPath, { fs, mode: dryRun ? 'r' : 'r+', lock: dryRun ? 'read' : 'write' }, async (image) => {
    if (await commitJournalExists(fs, cowPath)) throw interruptedCommitError(cowPath, ' first');
    const report = await checkBacking(image.header, options.backing, fs);
    if (report.state === 'mtime-mismatch') throw backingError(cowPath, report, `refusing to compare against it (${mtimeMismatchFix(cowPath, report.path)})`);
    if (report.state !== 'ok') throw backingError(cowPath, report);
    const summary = await summarizeAllocation(image);
    const backing = await openBacking(fs, report.path, 'r');
    try {
      const warnings = [...image.warnings];
      const guest = options.guestFs === false ? { skipped: 'not asked for (--no-fs)' } : await guestFreeBlocks(image, backing, options, warnings);
      const scan = await dropPages(image, backing, guest.free, { dryRun, windowBytes: options.windowBytes ?? DEFAULT_WINDOW_BYTES, total: summary.allocatedBytes, onProgress: options.onProgress });
      let after: number;
      if (dryRun) after = Math.max(0, image.allocatedBytes - scan.dropped.pages * PAGE_BYTES);
      else {
        after = await image.handle.stat().then(
          (stat) => stat.allocated,
          (err) => {
            throw fromSystemError(err, cowPath, 'stat');
          },
        );
      }
      if (!scan.holesPunched) warnings.push(`${cowPath}: the host file system cannot punch holes: the pages were dropped from the bitmap, but their space is not freed`);
      return {
        cow: cowPath,
        backing: report.path,
        dryRun,
        fileSystem: guest.info,
        fileSystemSkipped: guest.skipped,
        allocatedBytes: summary.allocatedBytes,
        dropped: scan.dropped,
        onDisk: { before: image.allocatedBytes, after, estimated: dryRun },
        holesPunched: scan.holesPunched,
        durationMs: Date.now() - started,
        warnings,
      };
    } finally {
      await backing.handle.close().catch(() => undefined);
    }
  });
}

interface GuestFreeBlocks {
  free?: FreeBlocks;
  info?: SparsifyResult['fileSystem'];
  skipped?: string;
}

/** Codes that mean "no ext file system to use here": in auto mode the run goes on without one. */
const noFileSystem = new Set(['no-fs', 'which-partition', 'unsupported-fs', 'corrupt-fs', 'no-partition']);

/**
 * The guest's free blocks, read through this command's own handles (a second descriptor of the
 * COW would drop its lock when closed). A journal needing recovery is refused in any mode.
 */
async function guestFreeBlocks(image: CowImage, backing: OpenedFile, options: SparsifyOptions, warnings: string[]): Promise<GuestFreeBlocks> {
  const disk: GuestDisk = {
    path: image.path,
    kind: 'cow',
    size: image.header.size,
    base: { realPath: backing.path },
    warnings: [],
    async read(offset, length, into) {
      const target = into ?? new Uint8Array(length);
      await readGuestBytes(image, backing, offset, offset + length, target);
      return target;
    },
    close: async () => undefined,
  };
  let opened;
  let free: FreeBlocks;
  try {
    opened = await openVolume(disk, options.partition);
    free = await readFreeBlocks(opened.volume);
  } catch (err) {
    if (options.guestFs === undefined && options.partition === undefined && err instanceof UbdcowError && noFileSystem.has(err.code)) {
      if (err.code !== 'no-fs') warnings.push(`${err.message} (free blocks not used; pages equal to the backing file are still dropped)`);
      return { skipped: err.message };
    }
    throw err;
  }
  const { sb } = opened.volume;
  return { free, info: { location: opened.location, kind: sb.kind, blockSize: sb.blockSize, freeBlocks: free.freeBlocks } };
}

interface ScanOptions {
  dryRun: boolean;
  windowBytes: number;
  total: number;
  onProgress: SparsifyOptions['onProgress'];
}

interface ScanResult {
  dropped: SparsifyResult['dropped'];
  holesPunched: boolean;
}

/** Goes through the allocated windows, dropping (or, dry, counting) the pages that qualify. */
async function dropPages(image: CowImage, backing: OpenedFile, free: FreeBlocks | undefined, options: ScanOptions): Promise<ScanResult> {
  const { sectorSize, size } = image.header;
  const pageBytes = sectorsPerPage(sectorSize) * sectorSize;
  const windowBytes = Math.max(pageBytes * 8, Math.ceil(options.windowBytes / (pageBytes * 8)) * pageBytes * 8);
  const dropped = { pages: 0, sectors: 0, bytes: 0, equalSectors: 0, equalBytes: 0, freeSectors: 0, freeBytes: 0 };
  const cowData = new Uint8Array(windowBytes);
  const baseData = new Uint8Array(windowBytes);
  const punches: Array<{ start: number; end: number }> = [];
  let holesPunched = true;
  let batchStart = 0;
  let done = 0;
  options.onProgress?.(0, options.total);

  const settle = async () => {
    if (options.dryRun || punches.length === 0) return;
    // The cleared bits must be durable before any of their data goes.
    await image.handle.datasync().catch((err) => {
      throw fromSystemError(err, image.path, 'sync');
    });
    // Several in flight: a punch on a file system mounted with `discard` waits for the device
    // (0.6 ms each here); four threads at once did five times as many.
    let next = 0;
    const worker = async () => {
      while (next < punches.length) {
        const punch = punches[next++]!;
        const outcome = await punchHole(image.handle, punch.start, punch.end - punch.start, { fallback: 'skip' }).catch((err) => {
          throw fromSystemError(err, image.path, 'punch a hole in');
        });
        if (outcome === 'skipped') holesPunched = false;
      }
    };
    await Promise.all(Array.from({ length: PUNCHES_IN_FLIGHT }, worker));
    punches.length = 0;
  };

  for await (const { start, runs } of allocatedWindows(image, windowBytes)) {
    if (start - batchStart >= BATCH_BYTES) {
      await settle();
      batchStart = start;
    }
    const windowEnd = Math.min(start + windowBytes, size);
    const window = await readBitmapWindow(image, start / sectorSize, Math.ceil(windowEnd / sectorSize));
    for (const span of pageSpans(runs, pageBytes, windowEnd)) {
      await Promise.all([
        readDataArea(image, cowData, span.start - start, span.start, span.end),
        readBase(backing, baseData, span.start - start, span.end - span.start, span.start),
      ]);
      for (let page = span.start; page < span.end; page += pageBytes) {
        const verdict = judgePage(image, window, cowData, baseData, start, page, Math.min(page + pageBytes, windowEnd), free);
        if (!verdict) continue;
        const firstSector = page / sectorSize;
        setWindowBits(window, firstSector, firstSector + pageBytes / sectorSize, false);
        dropped.pages++;
        dropped.sectors += verdict.equal + verdict.free;
        dropped.equalSectors += verdict.equal;
        dropped.freeSectors += verdict.free;
        const dataStart = image.geometry.dataOffset + page;
        const dataEnd = Math.min(image.fileSize, dataStart + pageBytes);
        const last = punches[punches.length - 1];
        if (last && last.end === dataStart) last.end = dataEnd;
        else if (dataEnd > dataStart) punches.push({ start: dataStart, end: dataEnd });
      }
    }
    if (!options.dryRun) await writeBitmapWindow(image, window);
    for (const run of runs) done += run.end - run.start;
    options.onProgress?.(done, options.total);
  }
  await settle();
  dropped.equalBytes = sectorBytes(dropped.equalSectors, sectorSize);
  dropped.freeBytes = sectorBytes(dropped.freeSectors, sectorSize);
  dropped.bytes = dropped.equalBytes + dropped.freeBytes;
  return { dropped, holesPunched };
}

function sectorBytes(sectors: number, sectorSize: number): number {
  return sectors * sectorSize;
}

/** The pages the runs touch, as spans of whole pages (clipped to the disk), neighbours merged. */
function pageSpans(runs: Array<{ start: number; end: number }>, pageBytes: number, limit: number): Array<{ start: number; end: number }> {
  const spans: Array<{ start: number; end: number }> = [];
  for (const run of runs) {
    const start = Math.floor(run.start / pageBytes) * pageBytes;
    const end = Math.min(limit, Math.ceil(run.end / pageBytes) * pageBytes);
    const last = spans[spans.length - 1];
    if (last && start - last.end < READ_GAP_BYTES) last.end = Math.max(last.end, end);
    else spans.push({ start, end });
  }
  return spans;
}

/**
 * Whether the page [page, pageEnd) may be dropped: every allocated sector equals the backing's
 * bytes or lies wholly in free blocks. Returns how many sectors qualified each way, or undefined
 * to keep the page (or when it holds nothing).
 */
function judgePage(
  image: CowImage,
  window: BitmapWindow,
  cowData: Uint8Array,
  baseData: Uint8Array,
  windowStart: number,
  page: number,
  pageEnd: number,
  free: FreeBlocks | undefined,
): { equal: number; free: number } | undefined {
  const { sectorSize } = image.header;
  const { bits } = window;
  const first = Math.max(page / sectorSize, bits.firstSector);
  const end = Math.min(Math.ceil(pageEnd / sectorSize), bits.firstSector + bits.bitCount);
  if (end <= first || bits.noneSet(first - bits.firstSector, end - bits.firstSector)) return undefined;
  const at = page - windowStart;
  const length = pageEnd - page;
  if (bits.allSet(first - bits.firstSector, end - bits.firstSector) && Buffer.compare(cowData.subarray(at, at + length), baseData.subarray(at, at + length)) === 0) {
    return { equal: end - first, free: 0 };
  }
  const pageFree = free?.rangeFree(page, pageEnd) ?? false;
  const verdict = { equal: 0, free: 0 };
  for (let sector = first; sector < end; sector++) {
    if (!bits.get(sector - bits.firstSector)) continue;
    const from = sector * sectorSize - windowStart;
    const to = Math.min(from + sectorSize, pageEnd - windowStart);
    if (Buffer.compare(cowData.subarray(from, to), baseData.subarray(from, to)) === 0) verdict.equal++;
    else if (pageFree || free?.rangeFree(sector * sectorSize, sector * sectorSize + (to - from))) verdict.free++;
    else return undefined;
  }
  return verdict;
}
