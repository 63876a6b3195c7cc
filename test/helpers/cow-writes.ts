/* Test fixtures: COW files with chosen contents, and reproducible randomness. The benchmarks use them too. */
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createCow } from '../../src/commands/create.js';
import { openImage } from '../../src/io/image/image.js';

/** Sectors to put into a COW: `data.length` must be a whole number of sectors (the last may be partial at the disk end). */
export interface SectorWrite {
  sector: number;
  data: Uint8Array;
}

/**
 * Writes data into a COW's data area and sets the matching bitmap bits, as the kernel would
 * after guest writes. Bitmap bytes are read, OR-ed and written back one write at a time.
 */
export async function writeCowSectors(cowPath: string, writes: Iterable<SectorWrite>): Promise<void> {
  const image = await openImage(cowPath, { mode: 'r+' });
  try {
    const { sectorSize } = image.header;
    const { bitmapOffset, dataOffset } = image.geometry;
    for (const { sector, data } of writes) {
      const sectors = Math.ceil(data.length / sectorSize);
      await image.handle.write(data, 0, data.length, dataOffset + sector * sectorSize);
      const firstByte = Math.floor(sector / 8);
      const lastByte = Math.floor((sector + sectors - 1) / 8);
      const bits = new Uint8Array(lastByte - firstByte + 1);
      await image.handle.read(bits, 0, bits.length, bitmapOffset + firstByte);
      for (let s = sector; s < sector + sectors; s++) bits[Math.floor(s / 8) - firstByte] |= 1 << (s & 7);
      await image.handle.write(bits, 0, bits.length, bitmapOffset + firstByte);
    }
  } finally {
    await image.handle.close();
  }
}

/** A fresh COW (folder/disk.cow) over a sparse, all-zero base of `size` bytes, holding `writes`. */
export async function cowOverEmptyBase(folder: string, size: number, writes: Iterable<SectorWrite>): Promise<string> {
  const backing = path.join(folder, 'base.img');
  fs.writeFileSync(backing, '');
  fs.truncateSync(backing, size);
  const cow = path.join(folder, 'disk.cow');
  fs.rmSync(cow, { force: true });
  await createCow(cow, backing);
  await writeCowSectors(cow, writes);
  return cow;
}

/** A reproducible pseudo-random generator (mulberry32), so runs place extents alike. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Writes `bytes` of random data to `file` (a backing image that is all data), 4 MiB at a time. */
export function writeRandomFile(file: string, bytes: number): void {
  const chunk = new Uint8Array(4 << 20);
  const fd = fs.openSync(file, 'w');
  try {
    for (let at = 0; at < bytes; at += chunk.length) fs.writeSync(fd, randomFillSync(chunk), 0, Math.min(chunk.length, bytes - at));
  } finally {
    fs.closeSync(fd);
  }
}
