import * as path from 'node:path';
import { CowFormatError, UbdcowError, fromSystemError } from '../errors.js';
import {
  type CowHeader,
  DEFAULT_ALIGNMENT,
  DEFAULT_SECTOR_SIZE,
  V3_HEADER_SIZE,
  serializeV3,
  validateHeader,
} from '../format/header.js';
import { type CowGeometry, computeGeometry } from '../format/geometry.js';
import { describeBitmapOverlap, describeHangingDisk } from '../format/kernel-traps.js';
import {
  type FileHandleLike,
  type FileSystem,
  nodeFileSystem,
  refuseExisting,
  sameFile,
  writeNewFile,
} from '../io/file/index.js';
import { imageSize, probeReadable, statImageFile } from '../io/image/index.js';
import { looksLikeCow } from '../io/engine/index.js';
import { ubdOptionWarnings } from './ubd-option.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface CreateOptions {
  /** Replace an existing file (uml_mkcow -f). */
  force?: boolean;
  sectorSize?: number;
  alignment?: number;
  fs?: FileSystem;
}

export interface CreateResult {
  path: string;
  header: CowHeader;
  geometry: CowGeometry;
  warnings: string[];
}

/**
 * The path uml_mkcow stores: the folder part resolved through the file system (as chdir + getcwd
 * do), the last component kept as given, so a symlinked backing file keeps its link name.
 */
export async function absoluteBackingPath(backing: string, fs: FileSystem = nodeFileSystem): Promise<string> {
  const slash = backing.lastIndexOf('/');
  if (slash < 0) return path.join(await fs.realpath('.'), backing);
  const folder = await fs.realpath(backing.slice(0, slash) || '/');
  return folder === '/' ? backing.slice(slash) : folder + backing.slice(slash);
}

const createCowOptionKeys: OptionKeys<CreateOptions> = { force: true, sectorSize: true, alignment: true, fs: true };

/** What createCow decided before writing anything: the header, its geometry and bytes, and warnings. */
export interface CowPlan {
  header: CowHeader;
  geometry: CowGeometry;
  /** The serialized V3 header. */
  bytes: Uint8Array;
  warnings: string[];
}

/** Creates a V3 COW file over `backing`, byte for byte what uml_mkcow writes. */
export async function createCow(cowPath: string, backing: string, options: CreateOptions = {}): Promise<CreateResult> {
  checkOptions('createCow', options, createCowOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  const plan = await planCow(cowPath, backing, options);
  if (!options.force) await refuseExisting(fs, cowPath);
  else await refuseOverwritingBacking(fs, cowPath, backing);
  await writeNewFile(fs, cowPath, options.force ?? false, (file) => writeCowHeader(file, plan));
  return { path: cowPath, header: plan.header, geometry: plan.geometry, warnings: plan.warnings };
}

/** Writes a planned COW into a new, empty file: the header, then the length that holds the bitmap and data area. */
export async function writeCowHeader(file: FileHandleLike, plan: CowPlan): Promise<void> {
  await file.write(plan.bytes, 0, V3_HEADER_SIZE, 0);
  await file.truncate(plan.geometry.fileLength);
}

/**
 * The checks and header of createCow, without writing: the backing file must be an image this
 * process can read (and, unless `force`, not a COW nor one the kernel would corrupt). Used by
 * commands that build a COW into a temporary file of their own (import).
 */
export async function planCow(cowPath: string, backing: string, options: CreateOptions = {}): Promise<CowPlan> {
  const fs = options.fs ?? nodeFileSystem;
  const backingStat = await statImageFile(fs, backing, 'backing file');
  await probeReadable(fs, backing, 'backing file');
  if (!options.force && backingStat.kind === 'file' && (await looksLikeCow(fs, backing))) {
    throw new UbdcowError(
      'backing-is-cow',
      `${backing}: is itself a UML COW file, and the ubd driver cannot stack COW files (it would read the COW file as raw data); ` +
        `merge it first (ubdcow commit ${backing} merged.img) and create over merged.img, or use -f to create anyway`,
      { file: backing },
    );
  }
  const size = await imageSize(backingStat, backing, 'backing file');
  const backingFile = await absoluteBackingPath(backing, fs).catch((err) => {
    throw fromSystemError(err, backing, 'resolve backing file path');
  });
  const header: CowHeader = {
    version: 3,
    layout: 'v3',
    littleEndian: false,
    backingFile,
    mtime: backingStat.mtime,
    size,
    sectorSize: options.sectorSize ?? DEFAULT_SECTOR_SIZE,
    alignment: options.alignment ?? DEFAULT_ALIGNMENT,
    cowFormat: 0,
  };
  let bytes: Uint8Array;
  let geometry: CowGeometry;
  let warnings: string[];
  try {
    warnings = [...validateHeader(header), ...ubdOptionWarnings(cowPath, backingFile)];
    geometry = computeGeometry(header);
    bytes = serializeV3(header);
  } catch (err) {
    if (err instanceof CowFormatError) throw err.inFile(cowPath);
    throw err;
  }
  // Issue 15 items 6 and 7: files the UML kernel would corrupt or hang on.
  const overlap = describeBitmapOverlap(geometry, header.alignment);
  if (overlap && !options.force) {
    throw new UbdcowError('kernel-bitmap-overlap', `${cowPath}: ${overlap} (or --force to create it anyway)`, { file: cowPath });
  }
  if (overlap) warnings.push(overlap);
  const hanging = describeHangingDisk(geometry);
  if (hanging) warnings.push(hanging);
  return { header, geometry, bytes, warnings };
}

/**
 * With --force, `create base.img base.img` would replace the backing file by a COW of itself, by
 * any name that opens it: the same path, a symlinked folder on the way, a hard link (compared by
 * identity, as the kernel does). The COW path's last component is not followed: replacing a
 * symlink to the backing file is fine (the link goes, the file stays).
 */
async function refuseOverwritingBacking(fs: FileSystem, cowPath: string, backing: string): Promise<void> {
  const [replaced, reached] = await Promise.all([
    absoluteBackingPath(cowPath, fs).catch(() => undefined),
    fs.realpath(cowPath).catch(() => undefined),
  ]);
  // Missing (nothing to replace), or a symlink as its last component (only the link is replaced).
  if (replaced === undefined || reached === undefined || replaced !== reached) return;
  if (await sameFile(fs, cowPath, backing)) {
    throw new UbdcowError('same-file', `${cowPath}: is the backing file itself, refusing to overwrite it`, { file: cowPath });
  }
}
