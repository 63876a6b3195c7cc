import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createCow } from '../../src/commands/create.js';
import { parseHeader, serializeV2 } from '../../src/format/header.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { type FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { openImage } from '../../src/io/image/image.js';
import { openVirtualDisk } from '../../src/io/engine/virtual-disk.js';
import { writeCowSectors } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';
import { mergedDisk, pickedWrites } from '../helpers/sector-writes.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const SECTOR = 512;

/** A FileSystem that remembers every read: file, position, length. */
function recordingFs(): { fs: FileSystem; reads: Array<{ file: string; position: number; length: number }> } {
  const reads: Array<{ file: string; position: number; length: number }> = [];
  const fs: FileSystem = {
    ...nodeFileSystem,
    async open(file, mode) {
      const handle = await nodeFileSystem.open(file, mode);
      return wrapHandle(handle, {
        read: (buffer, offset, length, position) => {
          reads.push({ file, position, length });
          return handle.read(buffer, offset, length, position);
        },
      });
    },
  };
  return { fs, reads };
}

describe('openVirtualDisk', () => {
  const tmp = useTempDir();

  it('reads a raw file as it is and refuses reads past its end', async () => {
    const file = path.join(tmp.path, 'raw.img');
    const bytes = randomBytes(5000);
    fs.writeFileSync(file, bytes);
    const disk = await openVirtualDisk(file);
    try {
      expect(disk.kind).toBe('raw');
      expect(disk.size).toBe(5000);
      expect('allocatedExtents' in disk).toBe(false);
      expect(Buffer.from(await disk.read(0, 5000)).equals(bytes)).toBe(true);
      expect(Buffer.from(await disk.read(1234, 777)).equals(bytes.subarray(1234, 2011))).toBe(true);
      await expect(disk.read(4000, 1001)).rejects.toThrow(/raw\.img: read of 1001 bytes at offset 4000: is outside the disk \(0 to 5000 bytes\): at most 1000 bytes fit there/);
    } finally {
      await disk.close();
    }
  });

  it('reads a COW through its backing: any range equals the merged image (small bitmap windows)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 300 * SECTOR + 511 }),
        fc.array(fc.record({ at: fc.nat(), count: fc.integer({ min: 1, max: 40 }) }), { maxLength: 12 }),
        fc.constantFrom(4, 8, 64, 1 << 20),
        fc.array(fc.tuple(fc.nat(), fc.nat()), { minLength: 1, maxLength: 8 }),
        async (size, picks, windowBytes, reads) => {
          const dir = fs.mkdtempSync(path.join(tmp.path, 'case-'));
          const backingFile = path.join(dir, 'base.img');
          const backing = randomBytes(size);
          fs.writeFileSync(backingFile, backing);
          const cowFile = path.join(dir, 'disk.cow');
          await createCow(cowFile, backingFile);
          const writes = pickedWrites(size, picks);
          await writeCowSectors(cowFile, writes);
          const expected = mergedDisk(backing, writes);
          const disk = await openVirtualDisk(cowFile, { bitmapWindowBytes: windowBytes });
          try {
            expect(disk.kind).toBe('cow');
            expect(disk.size).toBe(size);
            expect(Buffer.from(await disk.read(0, size)).equals(expected)).toBe(true);
            for (const [a, b] of reads) {
              const offset = a % size;
              const length = b % (size - offset + 1);
              const got = await disk.read(offset, length);
              expect(Buffer.from(got).equals(expected.subarray(offset, offset + length))).toBe(true);
            }
          } finally {
            await disk.close();
            fs.rmSync(dir, { recursive: true });
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it('keeps only a window of the bitmap in memory, never the whole of it', async () => {
    const backingFile = path.join(tmp.path, 'base.img');
    const size = 64 * 8 * SECTOR * 16; // 16 windows of 64 bitmap bytes
    fs.writeFileSync(backingFile, randomBytes(size));
    const cowFile = path.join(tmp.path, 'disk.cow');
    await createCow(cowFile, backingFile);
    await writeCowSectors(cowFile, [{ sector: 3, data: randomBytes(SECTOR) }, { sector: 8000, data: randomBytes(4 * SECTOR) }]);
    const { fs: recording, reads } = recordingFs();
    const disk = await openVirtualDisk(cowFile, { fs: recording, bitmapWindowBytes: 64 });
    try {
      if (disk.kind !== 'cow') throw new Error('expected a COW disk');
      const { bitmapOffset, bitmapLength, dataOffset } = disk.cow.geometry;
      expect(bitmapLength).toBe(64 * 16);
      for (let offset = 0; offset < size; offset += 1 << 16) await disk.read(offset, Math.min(1 << 16, size - offset));
      const bitmapReads = reads.filter((read) => read.file === cowFile && read.position >= bitmapOffset && read.position < dataOffset);
      expect(bitmapReads.length).toBeGreaterThanOrEqual(16);
      expect(Math.max(...bitmapReads.map((read) => read.length))).toBe(64);
    } finally {
      await disk.close();
    }
  });

  it('treats a backing file shorter than the header size as an error, not as zeros', async () => {
    const backingFile = path.join(tmp.path, 'base.img');
    fs.writeFileSync(backingFile, randomBytes(8 * SECTOR));
    const cowFile = path.join(tmp.path, 'disk.cow');
    await createCow(cowFile, backingFile);
    const mtime = fs.statSync(backingFile).mtime;
    fs.truncateSync(backingFile, 5 * SECTOR);
    fs.utimesSync(backingFile, mtime, mtime);
    const disk = await openVirtualDisk(cowFile);
    try {
      expect(disk.warnings.join('\n')).toMatch(/backing size is 2560 bytes, header says 4096/);
      expect((await disk.read(0, 5 * SECTOR)).length).toBe(5 * SECTOR);
      await expect(disk.read(4 * SECTOR, 2 * SECTOR)).rejects.toThrow(/base\.img: file length is 2560, expected at least 3072 bytes \(the backing file of .*disk\.cow\)/);
    } finally {
      await disk.close();
    }
    // Allocated sectors past the backing's end still read from the COW.
    await writeCowSectors(cowFile, [{ sector: 6, data: Buffer.alloc(2 * SECTOR, 7) }]);
    const again = await openVirtualDisk(cowFile);
    try {
      expect(Buffer.from(await again.read(6 * SECTOR, 2 * SECTOR)).equals(Buffer.alloc(2 * SECTOR, 7))).toBe(true);
    } finally {
      await again.close();
    }
  });

  it('warns when the backing mtime differs from the header, and uses a backing override', async () => {
    const backingFile = path.join(tmp.path, 'base.img');
    const other = path.join(tmp.path, 'moved.img');
    const bytes = randomBytes(4 * SECTOR);
    fs.writeFileSync(backingFile, bytes);
    const cowFile = path.join(tmp.path, 'disk.cow');
    await createCow(cowFile, backingFile);
    fs.renameSync(backingFile, other);
    await expect(openVirtualDisk(cowFile)).rejects.toThrow(/base\.img: cannot open backing file: no such file or directory/);
    fs.utimesSync(other, 1_000_000, 1_000_000);
    const disk = await openVirtualDisk(cowFile, { backing: other });
    try {
      expect(disk.warnings.join('\n')).toMatch(/moved\.img: backing mtime is 1000000 \(.*\), header says \d+/);
      expect(disk.base.realPath).toBe(other);
      expect(Buffer.from(await disk.read(0, 4 * SECTOR)).equals(bytes)).toBe(true);
    } finally {
      await disk.close();
    }
  });

  it('opens a COW without its backing when asked, and then refuses reads that need it', async () => {
    const backingFile = path.join(tmp.path, 'base.img');
    fs.writeFileSync(backingFile, randomBytes(16 * SECTOR));
    const cowFile = path.join(tmp.path, 'disk.cow');
    await createCow(cowFile, backingFile);
    const data = randomBytes(2 * SECTOR);
    await writeCowSectors(cowFile, [{ sector: 2, data }]);
    fs.rmSync(backingFile);
    const disk = await openVirtualDisk(cowFile, { openBacking: false });
    try {
      expect(Buffer.from(await disk.read(2 * SECTOR, 2 * SECTOR)).equals(data)).toBe(true);
      await expect(disk.read(0, 3 * SECTOR)).rejects.toThrow(/byte 0 is not in the COW and the backing file was not opened/);
      const extents = [];
      if (disk.kind !== 'cow') throw new Error('expected a COW disk');
      for await (const extent of disk.allocatedExtents()) extents.push(extent);
      expect(extents).toEqual([{ start: 2, end: 4 }]);
    } finally {
      await disk.close();
    }
  });

  it('reads the sectors a V2 bitmap has no bit for from the backing file', async () => {
    // 13 sectors: V2 rounds the bitmap down to 1 byte, so sectors 8-12 have no bit.
    const size = 13 * SECTOR;
    const backingFile = path.join(tmp.path, 'base.img');
    const backing = randomBytes(size);
    fs.writeFileSync(backingFile, backing);
    const mtime = Math.floor(fs.statSync(backingFile).mtimeMs / 1000);
    const header = serializeV2({ backingFile, mtime, size, sectorSize: SECTOR });
    const cowFile = path.join(tmp.path, 'old.cow');
    const { dataOffset, coveredSectors } = computeGeometry(parseHeader(header).header);
    expect(coveredSectors).toBe(8);
    const cow = Buffer.alloc(dataOffset + size);
    cow.set(header);
    cow.fill(0xaa, dataOffset);
    cow[header.length] = 0b0000_0010; // sector 1 allocated
    fs.writeFileSync(cowFile, cow);
    const disk = await openVirtualDisk(cowFile);
    try {
      const expected = Buffer.from(backing);
      expected.fill(0xaa, SECTOR, 2 * SECTOR);
      expect(Buffer.from(await disk.read(0, size)).equals(expected)).toBe(true);
    } finally {
      await disk.close();
    }
  });

  it('reports a COW whose data area was cut short instead of reading zeros', async () => {
    const backingFile = path.join(tmp.path, 'base.img');
    fs.writeFileSync(backingFile, randomBytes(64 * SECTOR));
    const cowFile = path.join(tmp.path, 'disk.cow');
    await createCow(cowFile, backingFile);
    await writeCowSectors(cowFile, [{ sector: 60, data: randomBytes(SECTOR) }]);
    const image = await openImage(cowFile);
    const { dataOffset } = image.geometry;
    await image.handle.close();
    fs.truncateSync(cowFile, dataOffset + 10 * SECTOR);
    const disk = await openVirtualDisk(cowFile);
    try {
      await expect(disk.read(60 * SECTOR, SECTOR)).rejects.toThrow(
        new RegExp(`disk\\.cow: file length is at most ${dataOffset + 60 * SECTOR}, expected at least ${dataOffset + 61 * SECTOR} bytes \\(the data area\\)`),
      );
    } finally {
      await disk.close();
    }
  });

  it('rejects a backing override for a raw file and a missing file', async () => {
    const file = path.join(tmp.path, 'raw.img');
    fs.writeFileSync(file, randomBytes(SECTOR));
    await expect(openVirtualDisk(file, { backing: file })).rejects.toThrow(/raw\.img: is not a UML COW file/);
    await expect(openVirtualDisk(path.join(tmp.path, 'none.img'))).rejects.toThrow(/none\.img: .*no such file or directory \(ENOENT\)/);
  });
});
