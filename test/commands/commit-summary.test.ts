import { describe, expect, it } from 'vitest';
import { summarizeAllocation, summarizeByExtents } from '../../src/commands/commit/shared.js';
import { withImage } from '../../src/io/image/image.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { cowOverEmptyBase, type SectorWrite, seededRandom } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * summarizeAllocation counts the bitmap a byte at a time; the extent walk (summarizeByExtents) is
 * the plain definition of its figures. They agree on scattered runs, runs across bytes and across
 * the 64 KiB bitmap slices (256 MiB of disk each), an empty COW, and a disk whose last sector is
 * partial (where the byte count hands over to the extent walk).
 */
describe('summarizeAllocation', () => {
  const tmp = useTempDir();

  async function summaries(size: number, writes: SectorWrite[]) {
    const cow = await cowOverEmptyBase(tmp.path, size, writes);
    return withImage(cow, { fs: nodeFileSystem, mode: 'r', lock: 'read' }, async (image) => [await summarizeAllocation(image), await summarizeByExtents(image)]);
  }

  function randomWrites(seed: number, sectors: number, count: number): SectorWrite[] {
    const random = seededRandom(seed);
    const writes: SectorWrite[] = [];
    for (let i = 0; i < count; i++) {
      const length = 1 + Math.floor(random() * 20);
      const sector = Math.floor(random() * (sectors - length));
      writes.push({ sector, data: new Uint8Array(length * 512).fill(1) });
    }
    return writes;
  }

  it('agrees with the extent walk on scattered runs over several bitmap slices', async () => {
    const size = 600 << 20;
    const sliceSectors = 64 * 1024 * 8;
    const writes = [
      ...randomWrites(7, size / 512, 3000),
      // Runs across a slice boundary, ending at one, and starting at one; the disk's last sector.
      { sector: sliceSectors - 5, data: new Uint8Array(10 * 512).fill(2) },
      { sector: 2 * sliceSectors - 3, data: new Uint8Array(3 * 512).fill(2) },
      { sector: 2 * sliceSectors + 8, data: new Uint8Array(512).fill(2) },
      { sector: size / 512 - 1, data: new Uint8Array(512).fill(2) },
    ];
    const [fast, walk] = await summaries(size, writes);
    expect(fast).toEqual(walk);
    expect(fast.extents).toBeGreaterThan(2000);
  });

  it('agrees on an empty COW, one sector, and every pattern of one byte of bits', async () => {
    expect(new Set((await summaries(1 << 20, [])).map((s) => JSON.stringify(s))).size).toBe(1);
    const [empty] = await summaries(1 << 20, []);
    expect(empty).toEqual({ extents: 0, allocatedBytes: 0, dataEnd: 0 });
    const patterns: SectorWrite[] = [];
    for (let value = 1; value < 256; value++) {
      for (let bit = 0; bit < 8; bit++) if (value & (1 << bit)) patterns.push({ sector: value * 16 + bit, data: new Uint8Array(512).fill(3) });
    }
    const [fast, walk] = await summaries(4 << 20, patterns);
    expect(fast).toEqual(walk);
  });

  it('agrees where the last sector is partial and allocated', async () => {
    const size = 1_000_000;
    const writes = [...randomWrites(3, Math.floor(size / 512), 200), { sector: Math.floor(size / 512), data: new Uint8Array(512).fill(4) }];
    const [fast, walk] = await summaries(size, writes);
    expect(fast).toEqual(walk);
    expect(fast.allocatedBytes % 512).toBe(size % 512);
  });

  it('agrees where the bitmap ends inside a byte (1,953 sectors), its last sector allocated', async () => {
    const size = 1953 * 512;
    const writes = [...randomWrites(5, 1953, 100), { sector: 1945, data: new Uint8Array(8 * 512).fill(5) }];
    const [fast, walk] = await summaries(size, writes);
    expect(fast).toEqual(walk);
    expect(fast.allocatedBytes).toBeGreaterThan(8 * 512);
  });
});
