import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createCow } from '../../src/commands/create.js';
import { type ByteRange, diffImages } from '../../src/commands/diff.js';
import { type FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { type SectorWrite, writeCowSectors } from '../helpers/cow-writes.js';
import { ensureBuiltCli, run } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { wrapHandle } from '../helpers/wrap-handle.js';
import { mergedDisk, pickedWrites } from '../helpers/sector-writes.js';

/** A planned COW write: which sectors, and whether to write the backing's own bytes back. */
interface Pick {
  at: number;
  count: number;
  same: boolean;
}

const pickArb = fc.record({ at: fc.nat(), count: fc.integer({ min: 1, max: 24 }), same: fc.boolean() });
const picksArb = fc.array(pickArb, { maxLength: 10 });
/** Disk sizes from one byte to ~160 sectors, often not a whole number of sectors. */
const sizeArb = fc.oneof(fc.integer({ min: 1, max: 160 * 512 + 511 }), fc.integer({ min: 1, max: 160 }).map((n) => n * 512));
const chunkArb = fc.constantFrom(512, 1536, 4096, 1 << 20);
const windowArb = fc.constantFrom(4, 1 << 20);

/** Random writes, or (`same`) writes of the bytes the backing already holds there. */
function writesFor(backing: Uint8Array, sectorSize: number, picks: Pick[]): SectorWrite[] {
  return pickedWrites(backing.length, picks, {
    sectorSize,
    fill: (pick, start, end) => (pick.same ? backing.slice(start, end) : randomBytes(end - start)),
  });
}

/** Sector-aligned byte ranges covered by the writes, merged, clipped to the disk size. */
function writtenRanges(size: number, sectorSize: number, writes: SectorWrite[]): ByteRange[] {
  const sectors = new Set<number>();
  for (const { sector, data } of writes) for (let s = sector; s < sector + Math.ceil(data.length / sectorSize); s++) sectors.add(s);
  const ranges: ByteRange[] = [];
  for (const s of [...sectors].sort((x, y) => x - y)) {
    const offset = s * sectorSize;
    const length = Math.min(sectorSize, size - offset);
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else ranges.push({ offset, length });
  }
  return ranges;
}

/**
 * The reference: compare two whole disks sector by sector. When sizes differ, everything from the
 * sector holding the end of the smaller disk onward differs (the documented rule).
 */
function naiveDiff(a: Uint8Array, b: Uint8Array, sectorSize: number): ByteRange[] {
  const ranges: ByteRange[] = [];
  const add = (offset: number, length: number) => {
    if (length <= 0) return;
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else ranges.push({ offset, length });
  };
  const smaller = Math.min(a.length, b.length);
  const comparedEnd = a.length === b.length ? smaller : Math.floor(smaller / sectorSize) * sectorSize;
  for (let offset = 0; offset < comparedEnd; offset += sectorSize) {
    const end = Math.min(offset + sectorSize, comparedEnd);
    if (!Buffer.from(a.subarray(offset, end)).equals(b.subarray(offset, end))) add(offset, end - offset);
  }
  add(comparedEnd, Math.max(a.length, b.length) - comparedEnd);
  return ranges;
}

/** Every byte changed, so byte and sector granularity agree on these writes. */
function inverted(bytes: Uint8Array): Uint8Array {
  return bytes.map((byte) => byte ^ 0xff);
}

/** The byte-granularity reference: runs of differing bytes; past the smaller disk's end, all differ. */
function naiveByteDiff(a: Uint8Array, b: Uint8Array): ByteRange[] {
  const ranges: ByteRange[] = [];
  const smaller = Math.min(a.length, b.length);
  for (let at = 0; at < smaller; at++) {
    if (a[at] === b[at]) continue;
    const start = at;
    while (at < smaller && a[at] !== b[at]) at++;
    ranges.push({ offset: start, length: at - start });
  }
  const tail = Math.max(a.length, b.length) - smaller;
  if (tail > 0) {
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === smaller) last.length += tail;
    else ranges.push({ offset: smaller, length: tail });
  }
  return ranges;
}

const total = (ranges: ByteRange[]) => ranges.reduce((sum, range) => sum + range.length, 0);

function expectResult(result: Awaited<ReturnType<typeof diffImages>>, expected: ByteRange[]): void {
  expect(result.ranges).toEqual(expected);
  expect(result.identical).toBe(expected.length === 0);
  expect(result.extents).toBe(expected.length);
  expect(result.differingBytes).toBe(total(expected));
}

/** A FileSystem counting bytes read per file. */
function countingFs(): { fs: FileSystem; bytesRead: Map<string, number> } {
  const bytesRead = new Map<string, number>();
  const fs: FileSystem = {
    ...nodeFileSystem,
    async open(file, mode) {
      const handle = await nodeFileSystem.open(file, mode);
      return wrapHandle(handle, {
        read: async (buffer, offset, length, position) => {
          const got = await handle.read(buffer, offset, length, position);
          bytesRead.set(file, (bytesRead.get(file) ?? 0) + got);
          return got;
        },
      });
    },
  };
  return { fs, bytesRead };
}

describe('diffImages', () => {
  const tmp = useTempDir('file');
  let caseNumber = 0;

  /** A fresh folder per generated case, removed after it. */
  async function inCase<T>(fn: (dir: string) => Promise<T>): Promise<T> {
    const dir = path.join(tmp.path, `case-${caseNumber++}`);
    fs.mkdirSync(dir);
    try {
      return await fn(dir);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }

  async function cowWith(dir: string, name: string, backingFile: string, backing: Uint8Array, picks: Pick[], sectorSize = 512) {
    const file = path.join(dir, name);
    await createCow(file, backingFile, { sectorSize });
    const writes = writesFor(backing, sectorSize, picks);
    await writeCowSectors(file, writes);
    return { file, writes, disk: mergedDisk(backing, writes, sectorSize) };
  }

  function writeBacking(dir: string, size: number): { file: string; bytes: Buffer } {
    const file = path.join(dir, 'base.img');
    const bytes = randomBytes(size);
    fs.writeFileSync(file, bytes);
    return { file, bytes };
  }

  it('one COW: lists exactly the sectors whose contents differ from the backing (rewritten-but-equal sectors are not differences)', async () => {
    await fc.assert(
      fc.asyncProperty(sizeArb, picksArb, chunkArb, windowArb, fc.constantFrom(512, 1024), async (size, picks, chunkBytes, windowBytes, sectorSize) =>
        inCase(async (dir) => {
          const backing = writeBacking(dir, size);
          const cow = await cowWith(dir, 'a.cow', backing.file, backing.bytes, picks, sectorSize);
          const result = await diffImages(cow.file, undefined, { chunkBytes, bitmapWindowBytes: windowBytes, granularity: 'sector' });
          expect(result.mode).toBe('cow-vs-backing');
          expect(result.sectorSize).toBe(sectorSize);
          expectResult(result, naiveDiff(cow.disk, backing.bytes, sectorSize));

          const allocation = await diffImages(cow.file, undefined, { allocated: true, bitmapWindowBytes: windowBytes });
          expect(allocation.mode).toBe('allocation');
          expectResult(allocation, writtenRanges(size, sectorSize, cow.writes));
        }),
      ),
      { numRuns: 60 },
    );
  });

  it('two COWs over the same backing: equals a full sector-by-sector comparison, reading only allocated sectors', async () => {
    await fc.assert(
      fc.asyncProperty(sizeArb, picksArb, picksArb, chunkArb, windowArb, async (size, picksA, picksB, chunkBytes, windowBytes) =>
        inCase(async (dir) => {
          const backing = writeBacking(dir, size);
          const a = await cowWith(dir, 'a.cow', backing.file, backing.bytes, picksA);
          // b sometimes repeats a's writes exactly, so identical COWs come up too.
          const b = await cowWith(dir, 'b.cow', backing.file, backing.bytes, []);
          const bWrites = picksB.length % 3 === 0 ? a.writes : writesFor(backing.bytes, 512, picksB);
          await writeCowSectors(b.file, bWrites);
          const diskB = mergedDisk(backing.bytes, bWrites);
          const { fs: counting, bytesRead } = countingFs();
          const result = await diffImages(a.file, b.file, { chunkBytes, bitmapWindowBytes: windowBytes, fs: counting, granularity: 'sector' });
          expect(result.mode).toBe('same-backing');
          expectResult(result, naiveDiff(a.disk, diskB, 512));
          const union = writtenRanges(size, 512, [...a.writes, ...bWrites]);
          // Backing reads: at most the allocated union once per side (the backing is read for each COW).
          expect(bytesRead.get(backing.file) ?? 0).toBeLessThanOrEqual(2 * total(union));
        }),
      ),
      { numRuns: 60 },
    );
  });

  it('two COWs over two hard links of one backing file share it (same-backing, by inode), with the same answer', async () => {
    await inCase(async (dir) => {
      const backing = writeBacking(dir, 64 * 512);
      const twin = path.join(dir, 'twin.img');
      fs.linkSync(backing.file, twin);
      const a = await cowWith(dir, 'a.cow', backing.file, backing.bytes, [{ at: 3, count: 2, same: false }]);
      const b = await cowWith(dir, 'b.cow', twin, backing.bytes, [{ at: 40, count: 1, same: false }]);
      const result = await diffImages(a.file, b.file, { granularity: 'sector' });
      expect(result.mode).toBe('same-backing');
      expectResult(result, naiveDiff(a.disk, b.disk, 512));
    });
  });

  it('a COW against a raw image: equals the naive comparison (same size, other sizes, and the COW\'s own backing)', async () => {
    await fc.assert(
      fc.asyncProperty(
        sizeArb,
        picksArb,
        fc.constantFrom('edited-copy', 'other-size', 'own-backing'),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 700 })), { maxLength: 4 }),
        fc.integer({ min: -700, max: 700 }),
        chunkArb,
        fc.boolean(),
        async (size, picks, rawKind, edits, sizeChange, chunkBytes, cowFirst) =>
          inCase(async (dir) => {
            const backing = writeBacking(dir, size);
            const cow = await cowWith(dir, 'a.cow', backing.file, backing.bytes, picks);
            let raw: Buffer;
            let rawFile = path.join(dir, 'raw.img');
            if (rawKind === 'own-backing') {
              raw = backing.bytes;
              rawFile = backing.file;
            } else {
              raw = Buffer.from(cow.disk);
              for (const [at, length] of edits) randomBytes(Math.min(length, size)).copy(raw, at % size);
              if (rawKind === 'other-size') {
                const newSize = Math.max(0, size + sizeChange);
                raw = newSize <= size ? raw.subarray(0, newSize) : Buffer.concat([raw, randomBytes(newSize - size)]);
              }
              fs.writeFileSync(rawFile, raw);
            }
            const [first, second, diskFirst, diskSecond] = cowFirst ? [cow.file, rawFile, cow.disk, raw] : [rawFile, cow.file, raw, cow.disk];
            const result = await diffImages(first, second, { chunkBytes, granularity: 'sector' });
            expect(result.mode).toBe(rawKind === 'own-backing' ? 'same-backing' : 'full');
            expect([result.sizeA, result.sizeB]).toEqual([diskFirst.length, diskSecond.length]);
            expectResult(result, naiveDiff(diskFirst, diskSecond, 512));
          }),
      ),
      { numRuns: 60 },
    );
  });

  it('two raw images of any sizes: equals the naive comparison; the tail of the larger one differs', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ maxLength: 5000 }),
        fc.uint8Array({ maxLength: 5000 }),
        fc.boolean(),
        chunkArb,
        async (bytesA, bytesB, shareStart, chunkBytes) =>
          inCase(async (dir) => {
            // Sharing a prefix makes equal sectors likely, so ranges have gaps.
            const b = shareStart ? Buffer.concat([Buffer.from(bytesA.subarray(0, bytesB.length)), Buffer.from(bytesB.subarray(bytesA.length))]) : Buffer.from(bytesB);
            if (shareStart && b.length > 600) b[600] ^= 0xff;
            const fileA = path.join(dir, 'a.img');
            const fileB = path.join(dir, 'b.img');
            fs.writeFileSync(fileA, bytesA);
            fs.writeFileSync(fileB, b);
            const result = await diffImages(fileA, fileB, { chunkBytes, granularity: 'sector' });
            expect(result.mode).toBe('full');
            expectResult(result, naiveDiff(bytesA, b, 512));
            // The default: exactly the differing bytes.
            const exact = await diffImages(fileA, fileB, { chunkBytes });
            expect(exact.granularity).toBe('byte');
            expectResult(exact, naiveByteDiff(bytesA, b));
          }),
      ),
      { numRuns: 80 },
    );
  });

  it('documents the size rule on a concrete case: the sector holding the smaller disk\'s end starts the tail', async () => {
    await inCase(async (dir) => {
      const a = Buffer.alloc(2000, 1);
      const b = Buffer.alloc(1100, 1);
      fs.writeFileSync(path.join(dir, 'a.img'), a);
      fs.writeFileSync(path.join(dir, 'b.img'), b);
      const result = await diffImages(path.join(dir, 'a.img'), path.join(dir, 'b.img'), { granularity: 'sector' });
      expect(result.ranges).toEqual([{ offset: 1024, length: 976 }]);
      expect([result.sizeA, result.sizeB]).toEqual([2000, 1100]);
    });
  });

  it('falls back to a full comparison when two COWs name one backing file that has changed since', async () => {
    await inCase(async (dir) => {
      const backing = writeBacking(dir, 64 * 512);
      const a = await cowWith(dir, 'a.cow', backing.file, backing.bytes, [{ at: 3, count: 2, same: false }]);
      const b = await cowWith(dir, 'b.cow', backing.file, backing.bytes, []);
      fs.utimesSync(backing.file, 1_000_000, 1_000_000);
      const result = await diffImages(a.file, b.file, { granularity: 'sector' });
      expect(result.mode).toBe('full');
      expectResult(result, naiveDiff(a.disk, backing.bytes, 512));
      expect(result.warnings.join('\n')).toMatch(/a\.cow: .*base\.img: backing mtime is 1000000 /);
    });
  });

  it('refuses what it cannot answer: a raw file alone, --allocated with two images, a backing file that is too short', async () => {
    await inCase(async (dir) => {
      const backing = writeBacking(dir, 16 * 512);
      await expect(diffImages(backing.file)).rejects.toThrow(/base\.img: is not a UML COW file \(no COW magic\); give a second image/);
      const cow = await cowWith(dir, 'a.cow', backing.file, backing.bytes, [{ at: 10, count: 6, same: false }]);
      await expect(diffImages(cow.file, backing.file, { allocated: true })).rejects.toThrow(/--allocated\) takes one COW file/);
      await expect(diffImages(cow.file, undefined, { backingB: backing.file })).rejects.toThrow(/needs a second image/);
      fs.truncateSync(backing.file, 12 * 512);
      await expect(diffImages(cow.file)).rejects.toThrow(/base\.img: file length is 6144, expected at least 8192 bytes \(the backing file of .*a\.cow\)/);
    });
  });
});

describe('ubdcow diff (CLI)', () => {
  const tmp = useTempDir();
  const cli = ensureBuiltCli();

  async function fixture() {
    const backingFile = path.join(tmp.path, 'base.img');
    const backing = randomBytes(64 * 512);
    fs.writeFileSync(backingFile, backing);
    const cowFile = path.join(tmp.path, 'vm.cow');
    await createCow(cowFile, backingFile);
    // Sectors 4-5 rewritten with the same bytes, 8-11 with new ones, 12 with the same again.
    await writeCowSectors(cowFile, [
      { sector: 4, data: backing.subarray(4 * 512, 6 * 512) },
      { sector: 8, data: inverted(backing.subarray(8 * 512, 12 * 512)) },
      { sector: 12, data: backing.subarray(12 * 512, 13 * 512) },
      { sector: 40, data: inverted(backing.subarray(40 * 512, 41 * 512)) },
    ]);
    return { backingFile, cowFile };
  }

  it('exits 1 and prints one "offset length" line per range when the images differ', async () => {
    const { cowFile } = await fixture();
    const result = run('node', [cli, 'diff', cowFile]);
    expect(result.status).toBe(1);
    expect(result.stdout).toBe(`${8 * 512} ${4 * 512}\n${40 * 512} 512\n`);
    expect(result.stderr).toBe('');
    const sectors = run('node', [cli, 'diff', cowFile, '--sectors']);
    expect(sectors.stdout).toBe('8 4\n40 1\n');
    const allocated = run('node', [cli, 'diff', cowFile, '--allocated', '--sectors']);
    expect(allocated.status).toBe(1);
    expect(allocated.stdout).toBe('4 2\n8 5\n40 1\n');
  });

  it('reports the exact bytes by default: one changed byte of a raw image is "offset 1"', async () => {
    const { backingFile } = await fixture();
    const copy = path.join(tmp.path, 'copy.img');
    const bytes = fs.readFileSync(backingFile);
    bytes[4097] ^= 0x5a;
    bytes[4098] ^= 0x5a;
    bytes[9000] ^= 0x01;
    fs.writeFileSync(copy, bytes);
    const result = run('node', [cli, 'diff', backingFile, copy]);
    expect(result.status).toBe(1);
    expect(result.stdout).toBe('4097 2\n9000 1\n');
    const sectors = run('node', [cli, 'diff', backingFile, copy, '--sectors']);
    expect(sectors.stdout).toBe('8 1\n17 1\n');
    const stat = run('node', [cli, 'diff', backingFile, copy, '--stat']);
    expect(stat.stdout).toMatch(/differing: +3 B \(3 bytes\) in 2 ranges, of 32\.0 KiB/);
    const same = run('node', [cli, 'diff', backingFile, backingFile, '--stat']);
    expect(same.status).toBe(0);
    expect(same.stdout).toMatch(/result: +identical \(32\.0 KiB compared\)/);
    expect(same.stdout).not.toMatch(/0 bytes/);
  });

  it('exits 0 with no output for identical images', async () => {
    const { backingFile } = await fixture();
    const copy = path.join(tmp.path, 'copy.img');
    fs.copyFileSync(backingFile, copy);
    const result = run('node', [cli, 'diff', backingFile, copy]);
    expect(result).toMatchObject({ status: 0, stdout: '', stderr: '' });
    const fresh = path.join(tmp.path, 'fresh.cow');
    await createCow(fresh, backingFile);
    expect(run('node', [cli, 'diff', fresh]).status).toBe(0);
  });

  it('prints one JSON object with --json, with sector numbers added by --sectors', async () => {
    const { cowFile, backingFile } = await fixture();
    const result = run('node', [cli, 'diff', cowFile, backingFile, '--json', '--sectors']);
    expect(result.status).toBe(1);
    const parsed = JSON.parse(result.stdout);
    expect(parsed).toEqual({
      schemaVersion: 1,
      a: cowFile,
      b: backingFile,
      identical: false,
      mode: 'same-backing',
      sectorSize: 512,
      granularity: 'sector',
      sizeA: 64 * 512,
      sizeB: 64 * 512,
      differingBytes: 5 * 512,
      extents: 2,
      warnings: [],
      ranges: [
        { offset: 8 * 512, length: 4 * 512, sector: 8, sectors: 4 },
        { offset: 40 * 512, length: 512, sector: 40, sectors: 1 },
      ],
    });
  });

  it('summarises with --stat', async () => {
    const { cowFile } = await fixture();
    const result = run('node', [cli, 'diff', cowFile, '--stat']);
    expect(result.status).toBe(1);
    expect(result.stdout).toMatch(/mode: +cow-vs-backing/);
    expect(result.stdout).toMatch(/differing: +2\.50 KiB \(2560 bytes\) in 2 ranges, of 32\.0 KiB/);
  });

  it('exits 2 with one line naming the file when it cannot compare', async () => {
    const missing = path.join(tmp.path, 'missing.cow');
    const result = run('node', [cli, 'diff', missing]);
    expect(result.status).toBe(2);
    expect(result.stdout).toBe('');
    expect(result.stderr).toBe(`ubdcow diff: ${missing}: cannot open disk image: no such file or directory (ENOENT)\n`);
    const { cowFile } = await fixture();
    const badBacking = run('node', [cli, 'diff', cowFile, '--backing-a', path.join(tmp.path, 'nope.img')]);
    expect(badBacking.status).toBe(2);
    expect(badBacking.stderr.trim().split('\n')).toHaveLength(1);
    expect(badBacking.stderr).toMatch(/nope\.img: cannot open backing file: no such file or directory/);
  });
});
