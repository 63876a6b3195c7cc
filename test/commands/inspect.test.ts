import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { SectorBitmap } from '../../src/format/bitmap.js';
import { createCow } from '../../src/commands/create.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { repoRoot } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { FIXTURE_MTIME, TINY_BASE_NAME, fixtureSpecs, writeFixtures } from '../../fixtures/make-fixtures.js';

const tmp = useTempDir();
const MTIME = 1_650_000_000;

function makeBacking(file: string, size: number): void {
  fs.writeFileSync(file, Buffer.alloc(size, 0x42));
  fs.utimesSync(file, MTIME, MTIME);
}

/** Sets the bits of `sectors` in a COW file's bitmap and writes a marker into their data sectors. */
function allocate(cow: string, bitmapOffset: number, bitmapLength: number, dataOffset: number, sectors: number[]): void {
  const fd = fs.openSync(cow, 'r+');
  try {
    const bytes = Buffer.alloc(bitmapLength);
    fs.readSync(fd, bytes, 0, bitmapLength, bitmapOffset);
    const bitmap = new SectorBitmap(bytes);
    for (const sector of sectors) {
      bitmap.set(sector);
      fs.writeSync(fd, Buffer.alloc(512, 0xcc), 0, 512, dataOffset + sector * 512);
    }
    fs.writeSync(fd, bytes, 0, bitmapLength, bitmapOffset);
  } finally {
    fs.closeSync(fd);
  }
}

async function newCow(size: number) {
  const backing = path.join(tmp.path, 'base.img');
  const cow = path.join(tmp.path, 'disk.cow');
  makeBacking(backing, size);
  const created = await createCow(cow, backing);
  return { backing, cow, geometry: created.geometry };
}

describe('inspectCow on files ubdcow creates', () => {
  it('a fresh COW: everything from the header, nothing allocated, backing ok', async () => {
    const { backing, cow } = await newCow(8 * 1024 * 1024);
    const report = await inspectCow(cow);
    expect(report).toMatchObject({
      file: cow,
      version: 3,
      layout: 'v3',
      byteOrder: 'big-endian',
      backingFile: backing,
      mtime: MTIME,
      mtimeIso: '2022-04-15T05:20:00.000Z',
      size: 8388608,
      sectorSize: 512,
      alignment: 4096,
      cowFormat: 0,
      headerSize: 4128,
      bitmapOffset: 8192,
      bitmapLength: 2048,
      dataOffset: 12288,
      sectors: 16384,
      coveredSectors: 16384,
      allocated: { sectors: 0, bytes: 0, percent: 0 },
      extents: 0,
      fileSize: 8400896,
      expectedFileSize: 8400896,
      truncated: false,
      warnings: [],
    });
    expect(report.backing).toEqual({ path: backing, state: 'ok', expected: { size: 8388608, mtime: MTIME }, actual: { size: 8388608, mtime: MTIME } });
    expect(report.diskUsage).toBeLessThan(report.fileSize);
  });

  it('counts allocated sectors, bytes, percent and extents', async () => {
    const { cow, geometry } = await newCow(1024 * 1024);
    allocate(cow, geometry.bitmapOffset, geometry.bitmapLength, geometry.dataOffset, [0, 1, 2, 100, 1000, 1001, 2047]);
    const report = await inspectCow(cow);
    expect(report.allocated).toEqual({ sectors: 7, bytes: 7 * 512, percent: 0.34 });
    expect(report.extents).toBe(4);
  });

  it('an allocated partial last sector counts only the bytes the disk has', async () => {
    const { cow, geometry } = await newCow(1000);
    allocate(cow, geometry.bitmapOffset, geometry.bitmapLength, geometry.dataOffset, [1]);
    // The marker write went past the data area end; put the length back to what the kernel makes.
    fs.truncateSync(cow, geometry.fileLength);
    const report = await inspectCow(cow);
    expect(report.sectors).toBe(2);
    expect(report.allocated).toEqual({ sectors: 1, bytes: 1000 - 512, percent: 48.8 });
    allocate(cow, geometry.bitmapOffset, geometry.bitmapLength, geometry.dataOffset, [0]);
    expect((await inspectCow(cow)).allocated).toEqual({ sectors: 2, bytes: 1000, percent: 100 });
  });

  it('a whole-sector disk with only its first sector allocated counts 512 bytes', async () => {
    const { cow, geometry } = await newCow(4096);
    allocate(cow, geometry.bitmapOffset, geometry.bitmapLength, geometry.dataOffset, [0, 7]);
    expect((await inspectCow(cow)).allocated).toEqual({ sectors: 2, bytes: 1024, percent: 25 });
  });

  it('a data area shorter than the header says: truncated, with a warning (never silent zeros)', async () => {
    const { cow, geometry } = await newCow(1024 * 1024);
    fs.truncateSync(cow, geometry.dataOffset + 4096);
    const report = await inspectCow(cow);
    expect(report.truncated).toBe(true);
    expect(report.fileSize).toBe(geometry.dataOffset + 4096);
    expect(report.expectedFileSize).toBe(geometry.fileLength);
    expect(report.warnings).toEqual([`file is ${geometry.dataOffset + 4096} bytes, its data area needs ${geometry.fileLength}: truncated`]);
  });

  it('a file cut inside the bitmap is an error, not a report', async () => {
    const { cow, geometry } = await newCow(1024 * 1024);
    fs.truncateSync(cow, geometry.bitmapOffset + 10);
    const err = (await inspectCow(cow).catch((e: unknown) => e)) as UbdcowError;
    expect(err).toBeInstanceOf(UbdcowError);
    expect(err.code).toBe('truncated-bitmap');
    expect(err.message).toContain(cow);
  });

  it('a file that is not a COW: bad magic naming the file', async () => {
    const file = path.join(tmp.path, 'plain.img');
    fs.writeFileSync(file, Buffer.alloc(8192, 0x11));
    const err = (await inspectCow(file).catch((e: unknown) => e)) as UbdcowError;
    expect(err.code).toBe('bad-magic');
    expect(err.message).toBe(`${file}: magic is 0x11111111, expected 0x4f4f4f4d ("MOOO"): not a UML COW file`);
  });

  describe('the backing check', () => {
    it('size mismatch', async () => {
      const { backing, cow } = await newCow(4096);
      fs.appendFileSync(backing, 'x');
      fs.utimesSync(backing, MTIME, MTIME);
      const report = await inspectCow(cow);
      expect(report.backing.state).toBe('size-mismatch');
      expect(report.backing.actual).toEqual({ size: 4097, mtime: MTIME });
      expect(report.backing.problem).toBe(`${backing}: backing size is 4097 bytes, header says 4096`);
    });

    it('mtime mismatch', async () => {
      const { backing, cow } = await newCow(4096);
      fs.utimesSync(backing, MTIME + 1, MTIME + 1);
      const report = await inspectCow(cow);
      expect(report.backing.state).toBe('mtime-mismatch');
      expect(report.backing.problem).toBe(
        `${backing}: backing mtime is ${MTIME + 1} (2022-04-15T05:20:01.000Z), header says ${MTIME} (2022-04-15T05:20:00.000Z)`,
      );
    });

    it('missing', async () => {
      const { backing, cow } = await newCow(4096);
      fs.unlinkSync(backing);
      const report = await inspectCow(cow);
      expect(report.backing.state).toBe('missing');
      expect(report.backing.actual).toBeUndefined();
      expect(report.backing.problem).toContain('ENOENT');
    });

    it('a directory where the backing file should be', async () => {
      const { backing, cow } = await newCow(4096);
      fs.unlinkSync(backing);
      fs.mkdirSync(backing);
      expect((await inspectCow(cow)).backing.state).toBe('not-a-file');
    });

    it('an override is checked instead of the header path, resolved to an absolute path', async () => {
      const { backing, cow } = await newCow(4096);
      const moved = path.join(tmp.path, 'moved.img');
      fs.renameSync(backing, moved);
      expect((await inspectCow(cow)).backing.state).toBe('missing');
      const report = await inspectCow(cow, { backing: moved });
      expect(report.backing).toMatchObject({ path: moved, state: 'ok' });
      expect(report.backingFile).toBe(backing);
    });
  });
});

describe('inspectCow on the committed fixtures', () => {
  const fixtureDir = path.join(repoRoot, 'fixtures');
  const expected = {
    'v1-le.cow': { version: 1, layout: 'v1', byteOrder: 'little-endian', headerSize: 280, bitmapOffset: 280, bitmapLength: 16, dataOffset: 512, coveredSectors: 128, fileSize: 66348, sectors: 13, extents: 4 },
    'v1-be.cow': { version: 1, layout: 'v1', byteOrder: 'big-endian', headerSize: 280, bitmapOffset: 280, bitmapLength: 16, dataOffset: 512, coveredSectors: 128, fileSize: 66348, sectors: 10, extents: 3 },
    'v2.cow': { version: 2, layout: 'v2', byteOrder: 'big-endian', headerSize: 4120, bitmapOffset: 4120, bitmapLength: 16, dataOffset: 4608, coveredSectors: 128, fileSize: 70444, sectors: 13, extents: 3 },
    'v3-broken.cow': { version: 3, layout: 'v3-broken', byteOrder: 'big-endian', headerSize: 4136, bitmapOffset: 8192, bitmapLength: 17, dataOffset: 12288, coveredSectors: 129, fileSize: 78124, sectors: 34, extents: 3 },
    'v3.cow': { version: 3, layout: 'v3', byteOrder: 'big-endian', headerSize: 4128, bitmapOffset: 8192, bitmapLength: 17, dataOffset: 12288, coveredSectors: 129, fileSize: 78124, sectors: 12, extents: 3 },
  } as const;

  it('covers every fixture the generator makes', () => {
    expect(fixtureSpecs.map((s) => s.file).sort()).toEqual(Object.keys(expected).sort());
  });

  it.each(Object.entries(expected))('%s: header, geometry and allocation', async (file, want) => {
    const report = await inspectCow(path.join(fixtureDir, file));
    expect(report).toMatchObject({
      version: want.version,
      layout: want.layout,
      byteOrder: want.byteOrder,
      backingFile: 'fixtures/tiny-base.img',
      mtime: FIXTURE_MTIME,
      size: 65836,
      sectorSize: 512,
      cowFormat: 0,
      headerSize: want.headerSize,
      bitmapOffset: want.bitmapOffset,
      bitmapLength: want.bitmapLength,
      dataOffset: want.dataOffset,
      sectors: 129,
      coveredSectors: want.coveredSectors,
      extents: want.extents,
      fileSize: want.fileSize,
      expectedFileSize: want.fileSize,
      truncated: false,
      warnings: [],
    });
    expect(report.allocated.sectors).toBe(want.sectors);
    expect(report.alignment).toBe(want.version === 3 ? 4096 : 512);
    // A checkout resets the backing file's mtime, so only size is certain here.
    expect(['ok', 'mtime-mismatch']).toContain(report.backing.state);
    expect(report.backing.actual?.size).toBe(65836);
  });

  it.each(fixtureSpecs)('$file: allocated sectors hold their marker text at data_offset + N * 512', async (spec) => {
    const report = await inspectCow(path.join(fixtureDir, spec.file));
    const bytes = fs.readFileSync(path.join(fixtureDir, spec.file));
    for (const [start, end] of spec.extents) {
      for (const sector of [start, end - 1]) {
        const at = report.dataOffset + sector * 512;
        expect(bytes.subarray(at, at + 40).toString('latin1')).toMatch(new RegExp(`^${spec.file} cow sector ${sector}\\n`));
      }
    }
  });

  it('with the backing mtime restored (copied to a temp folder), the backing check is ok', async () => {
    const base = path.join(tmp.path, TINY_BASE_NAME);
    fs.copyFileSync(path.join(fixtureDir, TINY_BASE_NAME), base);
    fs.utimesSync(base, FIXTURE_MTIME, FIXTURE_MTIME);
    for (const spec of fixtureSpecs) {
      const copy = path.join(tmp.path, spec.file);
      fs.copyFileSync(path.join(fixtureDir, spec.file), copy);
      const report = await inspectCow(copy, { backing: base });
      expect(report.backing, spec.file).toMatchObject({ state: 'ok', path: base });
    }
  });

  it('the committed files are exactly what make-fixtures.ts generates', () => {
    const fresh = path.join(tmp.path, 'fresh');
    const written = writeFixtures(fresh);
    expect(written.length).toBe(fixtureSpecs.length + 1);
    for (const file of written) {
      const name = path.basename(file);
      expect(fs.readFileSync(file).equals(fs.readFileSync(path.join(fixtureDir, name))), name).toBe(true);
    }
  });
});
