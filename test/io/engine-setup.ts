import { createCow } from '../../src/commands/create.js';
import { openCow, type CowDevice, type OpenCowOptions } from '../../src/io/engine/engine.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import { MemoryFileSystem } from './memory-fs.js';
import { randomBytes, seededRandom } from '../helpers/cow-fixtures.js';

export { randomBytes, seededRandom };

export const COW = '/mem/disk.cow';
export const BASE = '/mem/base.img';

/** A memory file system with a backing file of random content and a fresh COW over it. */
export async function memoryImage(size: number, random: () => number): Promise<{ fs: MemoryFileSystem; base: Uint8Array }> {
  const fs = new MemoryFileSystem();
  const base = randomBytes(random, size);
  fs.addFile(BASE, base);
  await createCow(COW, BASE, { fs });
  return { fs, base };
}

export async function openMemoryCow(fs: MemoryFileSystem, options: OpenCowOptions = {}): Promise<CowDevice> {
  return openCow(COW, { fs, ...options });
}

/** The set bits of the COW file's bitmap as stored in `cow` bytes. */
export function bitmapOnDisk(cow: Uint8Array): { bits: Uint8Array; dataOffset: number; sectors: number } {
  const { header } = parseHeader(cow);
  const geometry = computeGeometry(header);
  return {
    bits: cow.subarray(geometry.bitmapOffset, geometry.bitmapOffset + geometry.bitmapLength),
    dataOffset: geometry.dataOffset,
    sectors: geometry.sectors,
  };
}

export function bitSet(bits: Uint8Array, sector: number): boolean {
  return (bits[sector >> 3] & (1 << (sector & 7))) !== 0;
}
