import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SectorBitmap } from '../../src/format/bitmap.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { type HeaderFields, parseHeader, serializeV1, serializeV2, serializeV3, serializeV3Broken } from '../../src/format/header.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * uml_moo is the reference reader of the format: if it merges a COW that ubdcow's format code
 * built (header serializer, geometry, bitmap bit order, data offsets) into exactly the image the
 * test expects, that code writes what UML reads.
 */

const missing = missingTools('uml_moo');
const SECTOR = 512;
const MTIME = 1_600_000_000;

type Serializer = (fields: HeaderFields) => Uint8Array;

const layouts: Array<[string, Serializer]> = [
  ['V3', serializeV3],
  ['broken V3', serializeV3Broken],
  ['V2', serializeV2],
  ['V1 little-endian', (f) => serializeV1(f, true)],
];

/** Backing sector s: every fifth one all zeros (so merges meet holes), the rest a pattern. */
function backingSector(s: number): Buffer {
  if (s % 5 === 0) return Buffer.alloc(SECTOR);
  return Buffer.alloc(SECTOR, `backing ${s};`);
}

/** Sectors the COW holds, and what: chosen to cross bitmap byte and 64-bit word boundaries. */
function cowContents(sectors: number): Map<number, Buffer> {
  const chosen = new Map<number, Buffer>();
  const put = (s: number, data: Buffer) => {
    if (s < sectors) chosen.set(s, data);
  };
  for (const s of [0, 1, 7, 8, 9, 60, 61, 62, 63, 64, 65, 66, 127, 128, 500, sectors - 1]) put(s, Buffer.alloc(SECTOR, `cow ${s}|`));
  // Pseudo-random extra sectors, the same on every run.
  let x = 12345;
  for (let i = 0; i < 40; i++) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    put(x % sectors, Buffer.alloc(SECTOR, `rnd ${x % sectors}/`));
  }
  // A zeroed sector over non-zero backing data must come out as zeros, and the reverse.
  put(3, Buffer.alloc(SECTOR));
  put(10, Buffer.alloc(SECTOR, 'over a zero backing sector'));
  return chosen;
}

function writeBacking(file: string, size: number): void {
  const bytes = Buffer.alloc(size);
  for (let s = 0; s * SECTOR < size; s++) backingSector(s).copy(bytes, s * SECTOR, 0, Math.min(SECTOR, size - s * SECTOR));
  fs.writeFileSync(file, bytes);
  fs.utimesSync(file, MTIME, MTIME);
}

/** Builds a COW file with ubdcow's format code only: header, geometry, SectorBitmap, data at data_offset + s * 512. */
function writeCow(file: string, serialize: Serializer, backingFile: string, size: number, contents: Map<number, Buffer>): void {
  const headerBytes = serialize({ backingFile, mtime: MTIME, size, sectorSize: SECTOR, alignment: 4096 });
  const geometry = computeGeometry(parseHeader(headerBytes).header);
  const bitmapBytes = new Uint8Array(geometry.bitmapLength);
  const bitmap = new SectorBitmap(bitmapBytes, geometry.coveredSectors);
  const fd = fs.openSync(file, 'w');
  try {
    fs.writeSync(fd, headerBytes, 0, headerBytes.length, 0);
    for (const [sector, data] of contents) {
      bitmap.set(sector);
      fs.writeSync(fd, data, 0, SECTOR, geometry.dataOffset + sector * SECTOR);
    }
    fs.writeSync(fd, bitmapBytes, 0, bitmapBytes.length, geometry.bitmapOffset);
    fs.ftruncateSync(fd, geometry.fileLength);
  } finally {
    fs.closeSync(fd);
  }
}

/** What a merge must produce: whole sectors only (uml_moo stops at size / 512, rounded down). */
function expectedImage(size: number, contents: Map<number, Buffer>): Buffer {
  const sectors = Math.floor(size / SECTOR);
  const image = Buffer.alloc(sectors * SECTOR);
  for (let s = 0; s < sectors; s++) (contents.get(s) ?? backingSector(s)).copy(image, s * SECTOR);
  return image;
}

function moo(args: string[]): { status: number | null; stdout: string; stderr: string } {
  return run('uml_moo', args);
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('uml_moo merges COW files built by ubdcow format code', missing), () => {
  const tmp = useTempDir();
  const size = 2048 * SECTOR; // 1 MiB: a bitmap of whole 64-bit words, as uml_moo reads it

  describe.each(layouts)('%s', (_name, serialize) => {
    it('uml_moo COW OUT writes the expected image', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      const out = path.join(tmp.path, 'merged.img');
      const contents = cowContents(size / SECTOR);
      writeBacking(backing, size);
      writeCow(cow, serialize, backing, size, contents);
      expect((await inspectCow(cow)).backing.state).toBe('ok');

      const result = moo([cow, out]);
      expect(result.status, result.stderr).toBe(0);
      expect(fs.readFileSync(out).equals(expectedImage(size, contents))).toBe(true);
    });

    it('uml_moo -d COW merges in place into (a copy of) the backing file', () => {
      const backing = path.join(tmp.path, 'base-copy.img');
      const cow = path.join(tmp.path, 'disk.cow');
      const contents = cowContents(size / SECTOR);
      writeBacking(backing, size);
      writeCow(cow, serialize, backing, size, contents);

      const result = moo(['-d', cow]);
      expect(result.status, result.stderr).toBe(0);
      expect(fs.readFileSync(backing).equals(expectedImage(size, contents))).toBe(true);
    });
  });

  it('says it is recovering a broken V3 file', () => {
    const backing = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'disk.cow');
    writeBacking(backing, size);
    writeCow(cow, serializeV3Broken, backing, size, new Map());
    const result = moo([cow, path.join(tmp.path, 'out.img')]);
    expect(result.status).toBe(0);
    expect(result.stdout + result.stderr).toContain('broken V3 file with 64-bit layout - recovering content');
  });

  it('a big-endian V1 file is misread: uml_moo reads V1 fields in host order and sees a byte-swapped size', () => {
    const backing = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'disk.cow');
    writeBacking(backing, size);
    writeCow(cow, (f) => serializeV1(f, false), backing, size, cowContents(size / SECTOR));
    const result = moo([cow, path.join(tmp.path, 'out.img')]);
    const swapped = Buffer.alloc(8);
    swapped.writeBigUInt64BE(BigInt(size));
    expect(result.status).not.toBe(0);
    expect(result.stderr).toContain(`Size mismatch (${swapped.readBigUInt64LE()} vs ${size})`);
    expect(fs.existsSync(path.join(tmp.path, 'out.img'))).toBe(false);
  });

  it('a V3 disk with a partial last sector: uml_moo leaves that sector out of the merged image', () => {
    const partialSize = size + 300;
    const backing = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'disk.cow');
    const out = path.join(tmp.path, 'merged.img');
    const contents = cowContents(size / SECTOR);
    contents.set(size / SECTOR, Buffer.alloc(SECTOR, 'partial'));
    writeBacking(backing, partialSize);
    // writeCow cuts the file at the data area end, so the last sector keeps only its 300 bytes.
    writeCow(cow, serializeV3, backing, partialSize, contents);
    const result = moo([cow, out]);
    expect(result.status, result.stderr).toBe(0);
    expect(fs.statSync(out).size).toBe(size);
    expect(fs.readFileSync(out).equals(expectedImage(partialSize, contents))).toBe(true);
  });

  it('-b overrides the backing path stored in the header', () => {
    const backing = path.join(tmp.path, 'moved.img');
    const cow = path.join(tmp.path, 'disk.cow');
    const out = path.join(tmp.path, 'merged.img');
    const contents = cowContents(size / SECTOR);
    writeBacking(backing, size);
    writeCow(cow, serializeV3, '/nonexistent/base.img', size, contents);
    expect(moo([cow, out]).status).not.toBe(0);
    const result = moo(['-b', backing, cow, out]);
    expect(result.status, result.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(expectedImage(size, contents))).toBe(true);
  });

  it('refuses a COW whose backing mtime does not match', () => {
    const backing = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'disk.cow');
    writeBacking(backing, size);
    writeCow(cow, serializeV3, backing, size, new Map());
    fs.utimesSync(backing, MTIME + 1, MTIME + 1);
    const result = moo([cow, path.join(tmp.path, 'out.img')]);
    expect(result.status).not.toBe(0);
    expect(result.stderr).toContain('mtime mismatch');
  });
});
