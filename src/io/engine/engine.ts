/*
 * Opening the engine (cow-engine.ts): the COW under the lock its mode needs, the one backing
 * policy (backingPolicy: readers warn, writers refuse), the allocation unit and the lazy bitmap.
 * openCow is the read-write device; openCowReader the read-only mode every reading command uses.
 */
import { UbdcowError } from '../../errors.js';
import { backingPolicy, checkBacking, type CowImage, openBacking, type OpenedFile, openLockedImage } from '../image/index.js';
import { lazyBitmapOf } from '../bitmap/index.js';
import { type FileSystem, nodeFileSystem } from '../file/index.js';
import { sectorsPerUnit } from './allocation-unit.js';
import { type OptionKeys, checkOptions } from '../../options.js';
import type { CowDevice, OpenCowOptions } from './cow-device.js';
import { Engine } from './cow-engine.js';

export type { AllocatedRun, CowDevice, FileRange, OpenCowOptions } from './cow-device.js';

const openCowOptionKeys: OptionKeys<OpenCowOptions> = {
  backing: true,
  readOnly: true,
  sync: true,
  fs: true,
  lock: true,
  blockingReads: true,
  maxBitmapCacheBytes: true,
  bitmapSliceBytes: true,
  allocationUnit: true,
};

export async function openCow(cowPath: string, options: OpenCowOptions = {}): Promise<CowDevice> {
  checkOptions('openCow', options, openCowOptionKeys);
  // The file system is chosen here, at the API's edge; below it is given.
  return (await openEngine(cowPath, { ...options, fs: options.fs ?? nodeFileSystem }, true)).device;
}

/** What the read-only virtual disk needs besides the device: the image and the backing file as opened. */
export interface CowReader {
  device: CowDevice;
  image: CowImage;
  /** Undefined when it was not opened (`openBacking: false`). */
  backing: OpenedFile | undefined;
}

/**
 * The engine's read-only mode, as the virtual disk (cat, diff, ls, get) uses it: the same read
 * lock, backing policy, bitmap and read path as `openCow(path, { readOnly: true })`. Without
 * `openBacking` (map, diff --allocated: only the header and the bitmap are wanted, as inspect
 * reads them) the backing file is neither checked nor opened, no lock is taken, and a read of a
 * byte the COW does not hold is `no-backing`.
 */
export async function openCowReader(
  cowPath: string,
  options: Pick<OpenCowOptions, 'backing' | 'bitmapSliceBytes'> & { fs: FileSystem; openBacking?: boolean },
): Promise<CowReader> {
  const withBacking = options.openBacking ?? true;
  return openEngine(cowPath, { backing: options.backing, fs: options.fs, bitmapSliceBytes: options.bitmapSliceBytes, readOnly: true, lock: withBacking }, withBacking);
}

async function openEngine(cowPath: string, options: OpenCowOptions & { fs: FileSystem }, withBacking: boolean): Promise<CowReader> {
  const { fs } = options;
  const readOnly = options.readOnly ?? false;
  // The lock is held until the COW file is closed (close()), so not withImage's scope. Readers of
  // the disk's bytes take a read lock: a COW a running UML holds changes under them, so they refuse it.
  const lock = (options.lock ?? true) ? (readOnly ? 'read' : 'write') : 'none';
  const image = await openLockedImage(cowPath, { fs, mode: readOnly ? 'r' : 'r+', lock });
  let backing: OpenedFile | undefined;
  try {
    const warnings: string[] = [];
    if (withBacking) {
      if (options.backing === undefined && image.header.backingFile === '') {
        throw new UbdcowError('no-backing', `${cowPath}: the header names no backing file (give one with a backing option)`, { file: cowPath });
      }
      const report = await checkBacking(image.header, options.backing, fs);
      warnings.push(...backingPolicy(cowPath, report, readOnly ? 'read' : 'write'));
      backing = await openBacking(fs, report.path, 'r');
    }
    const unitSectors = sectorsPerUnit(cowPath, options.allocationUnit, image.header.sectorSize);
    const bitmap = lazyBitmapOf(image, { maxCachedBytes: options.maxBitmapCacheBytes, sliceBytes: options.bitmapSliceBytes });
    const device = new Engine(image, backing, bitmap, { readOnly, sync: options.sync ?? false, blockingReads: options.blockingReads ?? false, warnings, unitSectors });
    return { device, image, backing };
  } catch (err) {
    await image.handle.close().catch(() => undefined);
    await backing?.handle.close().catch(() => undefined);
    throw err;
  }
}
