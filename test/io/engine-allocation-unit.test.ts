import { describe, expect, it } from 'vitest';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import type { OpenCowOptions } from '../../src/io/engine/engine.js';
import { BASE, COW, bitSet, bitmapOnDisk, memoryImage, openMemoryCow, randomBytes, seededRandom } from './engine-setup.js';
import type { LoggedWrite, MemoryFileSystem } from './memory-fs.js';

/** The I/O of `action`: reads of the backing file and writes to the COW's data area. */
async function ioOf(fs: MemoryFileSystem, action: () => Promise<void>) {
  const { header } = parseHeader(fs.contents(COW).subarray(0, 8192));
  const { dataOffset } = computeGeometry(header);
  const backingReads: Array<{ position: number; length: number }> = [];
  fs.failRule = (op) => {
    if (op.kind === 'read' && op.path === BASE) backingReads.push({ position: op.position, length: op.length });
    return undefined;
  };
  const before = fs.log.length;
  await action();
  fs.failRule = undefined;
  const dataWrites = fs.log
    .slice(before)
    .filter((op): op is LoggedWrite => op.kind === 'write' && op.path === COW && op.position >= dataOffset)
    .map((op) => ({ position: op.position - dataOffset, length: op.bytes.length }));
  return { backingReads, dataWrites };
}

function allocatedSectors(fs: MemoryFileSystem): number[] {
  const { bits, sectors } = bitmapOnDisk(fs.contents(COW));
  return Array.from({ length: sectors }, (_, s) => s).filter((s) => bitSet(bits, s));
}

const range = (start: number, end: number) => Array.from({ length: end - start }, (_, i) => start + i);

describe('allocationUnit: a write allocates whole units (4 KiB pages by default)', () => {
  it('a 512-byte write into a page allocates the whole page: one backing read of the page, one 4 KiB data write', async () => {
    const { fs, base } = await memoryImage(64 * 1024, seededRandom(1));
    const dev = await openMemoryCow(fs);
    const data = randomBytes(seededRandom(2), 512);
    const io = await ioOf(fs, () => dev.write(8192 + 1536, data));
    expect(io.backingReads).toEqual([{ position: 8192, length: 4096 }]);
    expect(io.dataWrites).toEqual([{ position: 8192, length: 4096 }]);
    expect(allocatedSectors(fs)).toEqual(range(16, 24));
    const expected = base.slice(8192, 12288);
    expected.set(data, 1536);
    expect(Buffer.from(await dev.read(8192, 4096)).equals(Buffer.from(expected))).toBe(true);
    // The COW alone (its data area) holds the page: the backing's bytes around the new ones.
    const { dataOffset } = bitmapOnDisk(fs.contents(COW));
    expect(Buffer.from(fs.contents(COW).subarray(dataOffset + 8192, dataOffset + 12288)).equals(Buffer.from(expected))).toBe(true);
    await dev.close();
  });

  it('a write inside the first sector of a page, or ending in its last, still reads the page once', async () => {
    const { fs } = await memoryImage(64 * 1024, seededRandom(15));
    const dev = await openMemoryCow(fs);
    for (const [offset, length] of [
      [100, 50],
      [4096 + 3000, 1096 - 7],
      [8192, 10],
    ]) {
      const page = offset - (offset % 4096);
      const io = await ioOf(fs, () => dev.write(offset, randomBytes(seededRandom(offset), length)));
      expect(io.backingReads, `write at ${offset}`).toEqual([{ position: page, length: 4096 }]);
      expect(io.dataWrites, `write at ${offset}`).toEqual([{ position: page, length: 4096 }]);
    }
    await dev.close();
  });

  it('a write within a page already whole in the COW copies nothing up (sector granularity there)', async () => {
    const { fs } = await memoryImage(64 * 1024, seededRandom(3));
    const dev = await openMemoryCow(fs);
    await dev.write(4096, randomBytes(seededRandom(4), 4096));
    const io = await ioOf(fs, () => dev.write(4096 + 512, randomBytes(seededRandom(5), 512)));
    expect(io.backingReads).toEqual([]);
    expect(io.dataWrites).toEqual([{ position: 4096 + 512, length: 512 }]);
    await dev.close();
  });

  it('an unaligned write across pages copies up the head and tail pages with one read each', async () => {
    const { fs, base } = await memoryImage(64 * 1024, seededRandom(6));
    const dev = await openMemoryCow(fs);
    const data = randomBytes(seededRandom(7), 10000);
    const io = await ioOf(fs, () => dev.write(5000, data));
    expect(io.backingReads).toEqual([
      { position: 4096, length: 4096 },
      { position: 12288, length: 4096 },
    ]);
    expect(io.dataWrites).toEqual([{ position: 4096, length: 12288 }]);
    expect(allocatedSectors(fs)).toEqual(range(8, 32));
    const expected = base.slice();
    expected.set(data, 5000);
    expect(Buffer.from(await dev.read(0, 64 * 1024)).equals(Buffer.from(expected))).toBe(true);
    await dev.close();
  });

  it('a page partly in the COW (written with sector granularity, or by UML) keeps its COW sectors when made whole', async () => {
    const { fs, base } = await memoryImage(16384, seededRandom(8));
    const old = await openMemoryCow(fs, { allocationUnit: 512 });
    const first = randomBytes(seededRandom(9), 512);
    await old.write(1024, first);
    await old.close();
    expect(allocatedSectors(fs)).toEqual([2]);
    const dev = await openMemoryCow(fs);
    const second = randomBytes(seededRandom(10), 100);
    await dev.write(3000, second);
    expect(allocatedSectors(fs)).toEqual(range(0, 8));
    const expected = base.slice(0, 4096);
    expected.set(first, 1024);
    expected.set(second, 3000);
    expect(Buffer.from(await dev.read(0, 4096)).equals(Buffer.from(expected))).toBe(true);
    await dev.close();
  });

  it('the last partial page ends with the disk (a partial last sector too)', async () => {
    const size = 16384 + 1024 + 300;
    const { fs, base } = await memoryImage(size, seededRandom(11));
    const dev = await openMemoryCow(fs);
    const io = await ioOf(fs, () => dev.write(size - 1, Uint8Array.of(0x5a)));
    // Sectors 32-34 (the last one 300 bytes) form the last page.
    expect(allocatedSectors(fs)).toEqual([32, 33, 34]);
    expect(io.backingReads).toEqual([{ position: 16384, length: 1324 }]);
    expect(io.dataWrites).toEqual([{ position: 16384, length: 1324 }]);
    const expected = base.slice(16384);
    expected[expected.length - 1] = 0x5a;
    expect(Buffer.from(await dev.read(16384, 1324)).equals(Buffer.from(expected))).toBe(true);
    await dev.close();
  });

  it('allocationUnit 512 keeps sector granularity; 8192 allocates 8 KiB units', async () => {
    for (const [unit, sectors] of [
      [512, [9]],
      [8192, range(0, 16)],
    ] as const) {
      const { fs } = await memoryImage(32768, seededRandom(12));
      const dev = await openMemoryCow(fs, { allocationUnit: unit });
      await dev.write(4608, randomBytes(seededRandom(13), 512));
      expect(allocatedSectors(fs), `allocationUnit ${unit}`).toEqual(sectors);
      await dev.close();
    }
  });

  it('refuses an allocation unit that is not a power of two multiple of the sector size, naming the file and the fix', async () => {
    const { fs } = await memoryImage(8192, seededRandom(14));
    for (const bad of [1000, 256, 3072, 0, -4096, 4096.5, '4096', Number.NaN]) {
      const err = await openMemoryCow(fs, { allocationUnit: bad } as unknown as OpenCowOptions).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err, `allocationUnit ${String(bad)}`).toMatchObject({ code: 'usage' });
      expect((err as Error).message).toContain(`${COW}: allocation unit ${String(bad)} is not a power of two multiple of its 512-byte sectors (use 4096, the default, or 512 for sector granularity)`);
    }
    // The COW was left unlocked and unchanged: it opens again.
    const dev = await openMemoryCow(fs, { allocationUnit: 65536 });
    await dev.close();
    await expect(openMemoryCow(fs, { allocationUnits: 4096 } as unknown as OpenCowOptions)).rejects.toThrow(/unknown option "allocationUnits" \(did you mean "allocationUnit"\?/);
  });
});
