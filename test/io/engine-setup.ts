import { createCow } from '../../src/commands/create.js';
import { openCow, type CowDevice, type OpenCowOptions } from '../../src/io/engine.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import { MemoryFileSystem } from './memory-fs.js';

export const COW = '/mem/disk.cow';
export const BASE = '/mem/base.img';

/** Deterministic pseudo-random generator (mulberry32), so failures can be replayed by seed. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytes(random: () => number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = Math.floor(random() * 256);
  return bytes;
}

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
