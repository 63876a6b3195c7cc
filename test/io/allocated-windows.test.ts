import { describe, expect, it } from 'vitest';
import { type WindowRuns, allocatedExtents, allocatedWindows, extentBytes } from '../../src/io/bitmap/allocation.js';
import { type CowImage, withImage } from '../../src/io/image/image.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { cowOverEmptyBase, type SectorWrite, seededRandom } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * allocatedWindows finds runs slice by slice; its plain definition is the extent walk split at
 * window boundaries. They must agree exactly (the commit paths and sparsify read and write by
 * these runs): over several 64 KiB bitmap slices, runs across slice and window boundaries,
 * windows that do not divide a slice, and a partial last sector.
 */
async function byExtents(image: CowImage, windowBytes: number): Promise<WindowRuns[]> {
  const windows: WindowRuns[] = [];
  for await (const extent of allocatedExtents(image)) {
    const bytes = extentBytes(extent, image);
    for (let at = bytes.start; at < bytes.end; ) {
      const start = Math.floor(at / windowBytes) * windowBytes;
      const end = Math.min(bytes.end, start + windowBytes);
      if (windows.at(-1)?.start !== start) windows.push({ start, runs: [] });
      windows.at(-1)!.runs.push({ start: at, end });
      at = end;
    }
  }
  return windows;
}

async function collect(windows: AsyncGenerator<WindowRuns>): Promise<WindowRuns[]> {
  const all: WindowRuns[] = [];
  for await (const window of windows) all.push(window);
  return all;
}

describe('allocatedWindows', () => {
  const tmp = useTempDir();

  async function compare(size: number, writes: SectorWrite[], windowSizes: number[]): Promise<number> {
    const cow = await cowOverEmptyBase(tmp.path, size, writes);
    return withImage(cow, { fs: nodeFileSystem, mode: 'r', lock: 'read' }, async (image) => {
      let runs = 0;
      for (const windowBytes of windowSizes) {
        const expected = await byExtents(image, windowBytes);
        expect(await collect(allocatedWindows(image, windowBytes))).toEqual(expected);
        runs += expected.reduce((sum, window) => sum + window.runs.length, 0);
      }
      return runs;
    });
  }

  it('agrees with the extent walk over several slices, across slice and window boundaries', async () => {
    const size = 600 << 20;
    const sliceBytesOfDisk = 64 * 1024 * 8 * 512;
    const random = seededRandom(11);
    const writes: SectorWrite[] = [];
    for (let i = 0; i < 1500; i++) {
      const length = 1 + Math.floor(random() * 40);
      writes.push({ sector: Math.floor(random() * (size / 512 - length)), data: new Uint8Array(length * 512).fill(1) });
    }
    // A run over the first slice boundary, one ending at the second and one starting right after it.
    writes.push({ sector: sliceBytesOfDisk / 512 - 9, data: new Uint8Array(20 * 512).fill(2) });
    writes.push({ sector: (2 * sliceBytesOfDisk) / 512 - 4, data: new Uint8Array(4 * 512).fill(2) });
    writes.push({ sector: (2 * sliceBytesOfDisk) / 512, data: new Uint8Array(3 * 512).fill(2) });
    const runs = await compare(size, writes, [4 << 20, (3 << 20) + 4096, 12 * 1024, 4096]);
    expect(runs).toBeGreaterThan(1500);
  });

  it('agrees on an empty COW and on a disk whose last sector is partial and allocated', async () => {
    await compare(1 << 20, [], [4096, 4 << 20]);
    const size = 1_000_000;
    const writes = [
      { sector: 0, data: new Uint8Array(512).fill(3) },
      { sector: 1000, data: new Uint8Array(100 * 512).fill(3) },
      { sector: Math.floor(size / 512) - 2, data: new Uint8Array(3 * 512).fill(3) },
    ];
    await compare(size, writes, [4096, 64 * 1024, 4 << 20]);
  });
});
