/**
 * `ubdcow import SRC COW BACKING`: the reverse of convert. SRC (any image qemu-img reads) is
 * turned into a sparse raw copy beside COW, compared with BACKING, and only what differs is
 * written into a new COW over BACKING, through the engine. The COW is built under a temporary
 * name and appears only once complete (writeNewFile: synced, then linked, or renamed with -f);
 * the raw copy is removed on every path, on SIGINT/SIGTERM/SIGHUP too (qemu-img is killed then),
 * and a later import sweeps the leftovers of one killed outright. COW may not be SRC or BACKING.
 */
import * as path from 'node:path';
import { UbdcowError, backingMismatch, fileEndsEarly } from '../errors.js';
import { openCow, sectorsPerUnit } from '../io/engine/index.js';
import {
  type FileHandleLike,
  type FileSystem,
  nodeFileSystem,
  readExactly,
  refuseExisting,
  refuseOutputOverInput,
  removeOnSignal,
  removeStaleTemporaries,
  temporaryNameFor,
  writeNewFile,
} from '../io/file/index.js';
import { planCow, writeCowHeader } from './create.js';
import { qemuImageInfo, qemuSizeFits, runToolOk } from './qemu-img.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface ImportOptions {
  /** Replace an existing COW file. */
  force?: boolean;
  /** qemu-img's progress (-p) while reading SRC. */
  progress?: boolean;
  /** Bytes compared and stored at once (default 4096; see OpenCowOptions.allocationUnit). */
  allocationUnit?: number;
}

export interface ImportResult {
  source: string;
  sourceFormat: string;
  cow: string;
  backing: string;
  size: number;
  /** Sectors written into the COW (those where SRC differs from BACKING). */
  sectors: number;
  bytes: number;
  /** About the new COW, as `create` gives them (e.g. a backing path UML's ubd option cannot take). */
  warnings: string[];
}

const CHUNK = 4 << 20;

const importImageOptionKeys: OptionKeys<ImportOptions> = { force: true, progress: true, allocationUnit: true };

export async function importImage(source: string, cowPath: string, backing: string, options: ImportOptions = {}): Promise<ImportResult> {
  checkOptions('importImage', options, importImageOptionKeys);
  const fileSystem = nodeFileSystem;
  // Before anything is written: the new COW may replace neither what it is made from nor its backing.
  await refuseOutputOverInput(fileSystem, cowPath, [
    { file: source, role: 'the image being imported' },
    { file: backing, role: 'the backing file of the new COW' },
  ]);
  if (!options.force) await refuseExisting(fileSystem, cowPath);
  // The backing file's checks and the header, as `create` makes them.
  const plan = await planCow(cowPath, backing, { force: options.force, fs: fileSystem });
  const size = plan.header.size;
  sectorsPerUnit(cowPath, options.allocationUnit, plan.header.sectorSize); // refused before qemu-img runs
  const info = await qemuImageInfo(source, 'import');
  if (!qemuSizeFits(info.virtualSize, size)) {
    throw backingMismatch(source, `${source}: its disk is ${info.virtualSize} bytes but ${backing} is ${size}; a COW has its backing file's size: import over a backing file of the disk's size`);
  }
  // The raw copy is named like writeNewFile's temporaries (for COW.raw), so a later import sweeps
  // the copy a killed one left.
  const rawFor = `${path.resolve(cowPath)}.raw`;
  await removeStaleTemporaries(fileSystem, rawFor);
  // Imports before these names left `.COW.ubdcow-import-PID.raw` and `.COW.ubdcow-import-PID`.
  await removeStaleTemporaries(fileSystem, path.resolve(cowPath), /^import-(\d+)(?:\.raw)?$/);
  const rawCopy = temporaryNameFor(rawFor);
  const forgetRawCopy = removeOnSignal(rawCopy);
  try {
    const args = ['convert', '-O', 'raw'];
    if (options.progress) args.push('-p');
    args.push(source, rawCopy);
    await runToolOk('qemu-img', args, 'import', source, { inheritStdout: options.progress });
    await checkTailIsZero(fileSystem, rawCopy, source, size, info.virtualSize);
    let written = { sectors: 0, bytes: 0 };
    await writeNewFile(fileSystem, cowPath, options.force ?? false, async (file, temporary) => {
      await writeCowHeader(file, plan);
      written = await copyDifferences(fileSystem, rawCopy, backing, temporary, plan.header.sectorSize, options.allocationUnit);
    });
    return { source, sourceFormat: info.format, cow: cowPath, backing, size, sectors: written.sectors, bytes: written.bytes, warnings: plan.warnings };
  } finally {
    await fileSystem.unlink(rawCopy).catch(() => undefined);
    forgetRawCopy();
  }
}

/**
 * qemu gives a disk whose size is not a multiple of 512 a size rounded up to one (qemuVirtualSize):
 * SRC of BACKING's size so rounded fits when the bytes past BACKING's size are zeros, as qemu pads
 * them (ubdcow convert writes such images). Anything else there would be lost: refused.
 */
async function checkTailIsZero(fileSystem: FileSystem, rawCopy: string, source: string, size: number, virtualSize: number): Promise<void> {
  if (virtualSize <= size) return;
  const tail = Buffer.alloc(virtualSize - size);
  const handle = await fileSystem.open(rawCopy, 'r');
  try {
    await readExactly(handle, rawCopy, 'read the raw copy', { buffer: tail, offset: 0, length: tail.length, position: size }, (got) =>
      fileEndsEarly(rawCopy, size, got, virtualSize, 'qemu-img\'s raw copy'),
    );
  } finally {
    await handle.close();
  }
  if (tail.some((byte) => byte !== 0)) {
    throw backingMismatch(source, `${source}: its disk is ${virtualSize} bytes, and the ${virtualSize - size} bytes past ${size} (the backing file's size) are not all zero; import over a backing file of ${virtualSize} bytes`);
  }
}

/**
 * Writes into the COW every run of allocation units (4 KiB pages by default) where `raw` differs
 * from `backing`: a page differing in any sector is stored whole, as UML 6.1 needs (docs/nbd.md).
 */
async function copyDifferences(
  fileSystem: FileSystem,
  raw: string,
  backing: string,
  cowPath: string,
  sectorSize: number,
  allocationUnit: number | undefined,
): Promise<{ sectors: number; bytes: number }> {
  const unit = sectorsPerUnit(cowPath, allocationUnit, sectorSize) * sectorSize;
  const [rawFile, backingFile] = await Promise.all([fileSystem.open(raw, 'r'), fileSystem.open(backing, 'r')]);
  const cow = await openCow(cowPath, { backing, allocationUnit: unit, fs: fileSystem });
  let bytes = 0;
  try {
    const size = cow.size;
    // Chunks of whole units, so no unit is split between two comparisons.
    const chunk = Math.ceil(CHUNK / unit) * unit;
    const a = Buffer.alloc(chunk);
    const b = Buffer.alloc(chunk);
    for (let position = 0; position < size; position += chunk) {
      const length = Math.min(chunk, size - position);
      await Promise.all([readFully(rawFile, a, length, position, raw), readFully(backingFile, b, length, position, backing)]);
      if (a.subarray(0, length).equals(b.subarray(0, length))) continue;
      let runStart = -1;
      for (let at = 0; ; at += unit) {
        const finished = at >= length;
        const differs = !finished && !a.subarray(at, Math.min(at + unit, length)).equals(b.subarray(at, Math.min(at + unit, length)));
        if (differs && runStart < 0) runStart = at;
        if (!differs && runStart >= 0) {
          const runEnd = Math.min(at, length);
          // The engine may keep the buffer until the write resolves: give it its own copy.
          await cow.write(position + runStart, Buffer.from(a.subarray(runStart, runEnd)));
          bytes += runEnd - runStart;
          runStart = -1;
        }
        if (finished) break;
      }
    }
    await cow.flush();
  } finally {
    await cow.close().catch(() => undefined);
    await rawFile.close();
    await backingFile.close();
  }
  return { sectors: Math.ceil(bytes / sectorSize), bytes };
}

async function readFully(file: FileHandleLike, into: Buffer, length: number, position: number, name: string): Promise<void> {
  await readExactly(file, name, 'read', { buffer: into, offset: 0, length, position }, (got) =>
    new UbdcowError('truncated', `${name}: ends at ${position + got}, expected ${position + length} bytes`, { file: name }),
  );
}
