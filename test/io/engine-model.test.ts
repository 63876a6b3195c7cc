import { describe, expect, it } from 'vitest';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import type { CowDevice, OpenCowOptions } from '../../src/io/engine/engine.js';
import { COW, bitSet, bitmapOnDisk, memoryImage, openMemoryCow, randomBytes, seededRandom } from './engine-setup.js';
import { watchInvariants } from './invariants.js';
import type { MemoryFileSystem } from './memory-fs.js';

interface WriteRecord {
  offset: number;
  data: Uint8Array;
}

interface ReadRecord {
  offset: number;
  length: number;
  snapshot: Uint8Array;
  candidates: WriteRecord[];
}

/** The reference: a plain byte array updated when writes resolve. */
class Model {
  readonly bytes: Uint8Array;
  readonly outstandingWrites = new Set<WriteRecord>();
  readonly outstandingReads = new Set<ReadRecord>();
  readonly errors: string[] = [];

  /**
   * `unitSectors`: sectors per allocation unit; each unit a write touches must be allocated whole
   * once it resolves (checked in memory, so only when the bitmap is never evicted).
   */
  constructor(base: Uint8Array, private readonly unitSectors = 0) {
    this.bytes = base.slice();
  }

  issueWrite(dev: CowDevice, offset: number, data: Uint8Array): Promise<void> {
    const record = { offset, data };
    this.outstandingWrites.add(record);
    for (const read of this.outstandingReads) read.candidates.push(record);
    return dev.write(offset, data).then(() => {
      this.outstandingWrites.delete(record);
      this.bytes.set(data, offset);
      const first = Math.floor(offset / 512);
      const end = Math.ceil((offset + data.length) / 512);
      const coveredEnd = this.unitSectors ? Math.ceil(dev.size / 512) : 0;
      for (let sector = first - (first % this.unitSectors); sector < Math.min(coveredEnd, Math.ceil(end / this.unitSectors) * this.unitSectors); sector++) {
        if (!dev.isAllocated(sector)) this.errors.push(`write at ${offset}+${data.length} resolved with sector ${sector} of its unit not allocated`);
      }
    });
  }

  issueRead(dev: CowDevice, offset: number, length: number): Promise<void> {
    const record: ReadRecord = {
      offset,
      length,
      snapshot: this.bytes.slice(offset, offset + length),
      candidates: [...this.outstandingWrites],
    };
    this.outstandingReads.add(record);
    return dev.read(offset, length).then((got) => {
      this.outstandingReads.delete(record);
      this.checkRead(record, got);
    });
  }

  /** Each byte must be the value at issue time or one written by a write in flight meanwhile. */
  private checkRead(read: ReadRecord, got: Uint8Array): void {
    if (got.length !== read.length) {
      this.errors.push(`read at ${read.offset} returned ${got.length} bytes, expected ${read.length}`);
      return;
    }
    for (let i = 0; i < read.length; i++) {
      if (got[i] === read.snapshot[i]) continue;
      const position = read.offset + i;
      const explained = read.candidates.some(
        (w) => position >= w.offset && position < w.offset + w.data.length && w.data[position - w.offset] === got[i],
      );
      if (!explained) {
        this.errors.push(`read at ${read.offset}+${read.length}: byte ${position} is ${got[i]}, expected ${read.snapshot[i]} or a concurrent write's value`);
        return;
      }
    }
  }
}

type Op = (dev: CowDevice, model: Model) => Promise<void>;

function randomOp(random: () => number, size: number): Op {
  const pick = random();
  const sizes = [1, 3, 7, 100, 511, 512, 513, 1024, 4096, 5000, 8192];
  let length = sizes[Math.floor(random() * sizes.length)];
  let offset: number;
  const where = random();
  if (where < 0.15) offset = size - Math.min(length, size);
  else if (where < 0.5) offset = Math.floor(random() * (size / 512)) * 512;
  else offset = Math.floor(random() * size);
  length = Math.max(1, Math.min(length, size - offset));
  if (pick < 0.55) {
    const data = randomBytes(random, length);
    return (dev, model) => model.issueWrite(dev, offset, data);
  }
  return (dev, model) => model.issueRead(dev, offset, length);
}

function layoutOf(fs: MemoryFileSystem) {
  const { header } = parseHeader(fs.contents(COW).subarray(0, 8192));
  const geometry = computeGeometry(header);
  return { ...geometry, sectorSize: header.sectorSize, size: header.size };
}

/** Issues `total` random operations keeping up to `depth` in flight, completing I/O in random order. */
async function runWorkload(seed: number, size: number, total: number, depth: number, sync = false, options: OpenCowOptions = {}, blockingWrites = false) {
  const random = seededRandom(seed);
  const { fs, base } = await memoryImage(size, random);
  fs.blockingWrites = blockingWrites;
  const unitSectors = (options.allocationUnit ?? 4096) / 512;
  const layout = { ...layoutOf(fs), unitSectors };
  const violations = watchInvariants(fs, layout);
  let bitmapLoads = 0;
  fs.failRule = (op) => {
    if (op.kind === 'read' && op.path === COW && op.position >= layout.bitmapOffset && op.position < layout.bitmapOffset + layout.bitmapLength) bitmapLoads++;
    return undefined;
  };
  const dev = await openMemoryCow(fs, { sync, ...options });
  fs.mode = 'random';
  fs.random = random;
  const model = new Model(base, options.maxBitmapCacheBytes === undefined ? unitSectors : 0);
  const outstanding = new Set<Promise<void>>();
  const failures: unknown[] = [];
  let issued = 0;
  let idle = 0;
  while (issued < total || outstanding.size > 0) {
    while (issued < total && outstanding.size < depth && (outstanding.size === 0 || random() < 0.6)) {
      const promise = randomOp(random, size)(dev, model).catch((err) => {
        failures.push(err);
      });
      outstanding.add(promise);
      void promise.finally(() => outstanding.delete(promise));
      issued++;
    }
    if (fs.step()) idle = 0;
    else if (++idle > 1000) throw new Error(`seed ${seed}: ${outstanding.size} requests never completed`);
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  fs.mode = 'immediate';
  expect(failures, `seed ${seed}`).toEqual([]);
  expect(model.errors, `seed ${seed}`).toEqual([]);
  expect(violations, `seed ${seed}`).toEqual([]);
  expect(Buffer.from(await dev.read(0, size)).equals(Buffer.from(model.bytes)), `seed ${seed}: final image`).toBe(true);
  await dev.close();
  fs.failRule = undefined;
  return { fs, model, base, bitmapLoads };
}

describe('engine against an in-memory model, I/O completing in random order', () => {
  const size = 64 * 1024 + 300; // a partial last sector on purpose

  it.each([
    ['4 KiB pages (the default)', {}, 30],
    ['sectors (allocationUnit 512)', { allocationUnit: 512 }, 12],
    ['1 KiB units', { allocationUnit: 1024 }, 6],
    ['16 KiB units', { allocationUnit: 16384 }, 6],
  ] as Array<[string, OpenCowOptions, number]>)('thousands of random concurrent reads and writes leave the exact image, allocating %s', async (_name, options, seeds) => {
    for (let seed = 1; seed <= seeds; seed++) {
      const { fs, model, base } = await runWorkload(seed, size, 400, 32, false, options);
      // Reopened from the bytes on "disk", the device reads the same.
      const again = await openMemoryCow(fs, options);
      expect(Buffer.from(await again.read(0, size)).equals(Buffer.from(model.bytes)), `seed ${seed}: after reopen`).toBe(true);
      // Every sector whose contents differ from the backing has its bit set on disk.
      const { bits } = bitmapOnDisk(fs.contents(COW));
      for (let sector = 0; sector * 512 < size; sector++) {
        const same = Buffer.from(model.bytes.subarray(sector * 512, sector * 512 + 512)).equals(
          Buffer.from(base.subarray(sector * 512, sector * 512 + 512)),
        );
        if (!same) expect(bitSet(bits, sector), `seed ${seed}: sector ${sector}`).toBe(true);
        expect(again.isAllocated(sector)).toBe(bitSet(bits, sector));
      }
      await again.close();
    }
  });

  it('holds with bitmap slices evicted under pressure (2-byte slices, a 4-byte cache)', async () => {
    const pressure: OpenCowOptions = { bitmapSliceBytes: 2, maxBitmapCacheBytes: 4 };
    const { bitmapLength } = layoutOf((await memoryImage(size, seededRandom(1))).fs);
    for (let seed = 300; seed < 312; seed++) {
      const { fs, model, bitmapLoads } = await runWorkload(seed, size, 400, 32, seed % 3 === 0, pressure);
      // Slices were read again after eviction: many more bitmap loads than slices.
      expect(bitmapLoads, `seed ${seed}: bitmap slice loads`).toBeGreaterThan(4 * Math.ceil(bitmapLength / 2));
      const again = await openMemoryCow(fs, pressure);
      expect(Buffer.from(await again.read(0, size)).equals(Buffer.from(model.bytes)), `seed ${seed}: after reopen`).toBe(true);
      const { bits } = bitmapOnDisk(fs.contents(COW));
      const runs: Array<{ start: number; end: number }> = [];
      for await (const run of again.allocatedRuns()) runs.push(run);
      const fromDisk: Array<{ start: number; end: number }> = [];
      for (let sector = 0; sector * 512 < size; sector++) {
        if (!bitSet(bits, sector)) continue;
        const last = fromDisk[fromDisk.length - 1];
        if (last && last.end === sector) last.end++;
        else fromDisk.push({ start: sector, end: sector + 1 });
      }
      expect(runs, `seed ${seed}: allocatedRuns`).toEqual(fromDisk);
      await again.close();
    }
  });

  it.each([
    ['4 KiB pages (the default)', {}],
    ['sectors (allocationUnit 512)', { allocationUnit: 512 }],
    ['evicted slices', { bitmapSliceBytes: 2, maxBitmapCacheBytes: 4 }],
  ] as Array<[string, OpenCowOptions]>)('holds with blocking writes (whole data pages and bitmap slices on the calling thread), %s', async (_name, options) => {
    let blockingData = 0;
    for (let seed = 400; seed < 410; seed++) {
      const { fs, model } = await runWorkload(seed, size, 400, 32, seed % 4 === 0, options, true);
      const { dataOffset } = layoutOf(fs);
      blockingData += fs.log.filter((op) => op.kind === 'write' && op.path === COW && op.position >= dataOffset && op.blocking).length;
      const again = await openMemoryCow(fs, options);
      expect(Buffer.from(await again.read(0, size)).equals(Buffer.from(model.bytes)), `seed ${seed}: after reopen`).toBe(true);
      await again.close();
    }
    expect(blockingData, 'data pages written the blocking way').toBeGreaterThan(0);
  });

  it('holds at queue depth 1 and with sync', async () => {
    for (let seed = 100; seed < 104; seed++) await runWorkload(seed, size, 200, 1);
    for (let seed = 200; seed < 204; seed++) await runWorkload(seed, size, 200, 16, true);
    for (let seed = 204; seed < 206; seed++) await runWorkload(seed, size, 200, 16, true, { allocationUnit: 512 });
  });

  it('a read racing the write that sets its bits sees old or new data, never garbage', async () => {
    for (let seed = 300; seed < 340; seed++) {
      const random = seededRandom(seed);
      const { fs, base } = await memoryImage(8192, random);
      const violations = watchInvariants(fs, layoutOf(fs));
      const dev = await openMemoryCow(fs);
      fs.mode = 'random';
      fs.random = random;
      const data = randomBytes(random, 1024);
      const write = dev.write(1024, data);
      const reads = [dev.read(1024, 1024), dev.read(1536, 512), dev.read(0, 4096)];
      const [r1, r2, r3] = await fs.drive(Promise.all(reads));
      await fs.drive(write);
      const after = await fs.drive(dev.read(1024, 1024));
      for (const [got, offset] of [[r1, 1024], [r2, 1536], [r3.subarray(1024, 2048), 1024]] as const) {
        const old = Buffer.from(base.subarray(offset, offset + got.length));
        const fresh = Buffer.from(data.subarray(offset - 1024, offset - 1024 + got.length));
        // Sector by sector: each sector is entirely old or entirely new.
        for (let s = 0; s < got.length; s += 512) {
          const piece = Buffer.from(got.subarray(s, s + 512));
          expect(piece.equals(old.subarray(s, s + 512)) || piece.equals(fresh.subarray(s, s + 512)), `seed ${seed}`).toBe(true);
        }
      }
      expect(Buffer.from(after).equals(Buffer.from(data))).toBe(true);
      expect(violations).toEqual([]);
      fs.mode = 'immediate';
      await dev.close();
    }
  });

  it('a read issued after a write resolves always sees it, even with other bitmap writes waiting', async () => {
    for (let seed = 400; seed < 440; seed++) {
      const random = seededRandom(seed);
      const { fs } = await memoryImage(16384, random);
      const dev = await openMemoryCow(fs);
      fs.mode = 'random';
      fs.random = random;
      // Sectors 0..7 share bitmap byte 0: their slice writes overlap.
      const writes = Array.from({ length: 8 }, (_, sector) => ({ sector, data: randomBytes(random, 512) }));
      const done = writes.map(({ sector, data }) =>
        dev.write(sector * 512, data).then(() => dev.read(sector * 512, 512)),
      );
      const results = await fs.drive(Promise.all(done));
      results.forEach((got, i) => expect(Buffer.from(got).equals(Buffer.from(writes[i].data)), `seed ${seed} sector ${i}`).toBe(true));
      fs.mode = 'immediate';
      await dev.close();
      const { bits } = bitmapOnDisk(fs.contents(COW));
      expect(bits[0]).toBe(0xff);
    }
  });

  it('two writes whose bitmap slices share a byte never overlap in flight and both land', async () => {
    for (let seed = 500; seed < 560; seed++) {
      const random = seededRandom(seed);
      const { fs } = await memoryImage(8192, random);
      const violations = watchInvariants(fs, layoutOf(fs));
      // Sector granularity: three writes into one 4 KiB page, each with its own bitmap update.
      const dev = await openMemoryCow(fs, { allocationUnit: 512 });
      fs.mode = 'random';
      fs.random = random;
      const a = randomBytes(random, 512);
      const b = randomBytes(random, 1024);
      await fs.drive(Promise.all([dev.write(0, a), dev.write(2048, b), dev.write(3584, a)]));
      fs.mode = 'immediate';
      await dev.close();
      expect(violations, `seed ${seed}`).toEqual([]);
      const { bits } = bitmapOnDisk(fs.contents(COW));
      expect(bits[0]).toBe(0b10110001);
    }
  });

  it('a partial-sector write racing another write to the same sector loses neither', async () => {
    for (let seed = 600; seed < 680; seed++) {
      const random = seededRandom(seed);
      const { fs, base } = await memoryImage(4096, random);
      const dev = await openMemoryCow(fs);
      fs.mode = 'random';
      fs.random = random;
      const first = randomBytes(random, 10);
      const second = randomBytes(random, 20);
      const third = randomBytes(random, 512);
      // Two copy-ups of sector 1 and a whole-sector write of sector 2 straddled by the second.
      await fs.drive(Promise.all([dev.write(600, first), dev.write(1020, second), dev.write(1024, third)]));
      const expected = base.slice();
      expected.set(first, 600);
      expected.set(second, 1020);
      expected.set(third, 1024);
      const got = await fs.drive(dev.read(0, 4096));
      expect(Buffer.from(got).equals(Buffer.from(expected)), `seed ${seed}`).toBe(true);
      fs.mode = 'immediate';
      await dev.close();
    }
  });

  it('defers a read whose clear bit is stale (data written, bitmap update waiting) until the update lands', async () => {
    const random = seededRandom(700);
    const { fs, base } = await memoryImage(8192, random);
    // Sector granularity, so the two writes of one page do not wait for each other.
    const dev = await openMemoryCow(fs, { allocationUnit: 512 });
    fs.mode = 'random';
    fs.random = () => 0; // complete the oldest operation first
    const a = randomBytes(random, 512);
    const b = randomBytes(random, 512);
    const writes = Promise.all([dev.write(0, a), dev.write(512, b)]);
    // Two turns: the bitmap writer starts the slice writes of a turn's updates in a setImmediate.
    const settle = async () => {
      for (let turn = 0; turn < 2; turn++) await new Promise<void>((resolve) => setImmediate(resolve));
    };
    await settle();
    // Complete both data writes: A's bitmap slice goes in flight, B's (same byte) must wait.
    const dataWrites = () => fs.log.filter((op) => op.kind === 'write' && op.position >= 12288).length;
    while (dataWrites() < 2) {
      expect(fs.step()).toBe(true);
      await settle();
    }
    expect(dev.isAllocated(1)).toBe(false);
    const read = dev.read(512, 512);
    const got = await fs.drive(read);
    await fs.drive(writes);
    expect(Buffer.from(got).equals(Buffer.from(b))).toBe(true);
    expect(Buffer.from(got).equals(Buffer.from(base.subarray(512, 1024)))).toBe(false);
    fs.mode = 'immediate';
    await dev.close();
  });

  it('no starvation: a read completes while writes to its sectors never stop, and a write completes while reads never stop', async () => {
    for (let seed = 800; seed < 810; seed++) {
      const random = seededRandom(seed);
      const { fs } = await memoryImage(8192, random);
      const dev = await openMemoryCow(fs);
      fs.mode = 'random';
      fs.random = random;
      let stop = false;
      const streams: Promise<void>[] = [];
      // Four endless writers over sectors 0-1, 3-4, 5-6 and 7, each issuing again as soon as it
      // resolves; the read spans all of them. It must not wait for a moment with no write active.
      const writers: Array<[number, number]> = [[0, 1024], [1536, 1024], [2560, 1024], [3584, 512]];
      for (const [offset, length] of writers) {
        streams.push(
          (async () => {
            while (!stop) await dev.write(offset, randomBytes(random, length));
          })(),
        );
      }
      let steps = 0;
      const read = dev.read(0, 4096);
      let readDone = false;
      void read.then(() => (readDone = true));
      while (!readDone && steps < 5000) {
        fs.step();
        steps++;
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
      expect(readDone, `seed ${seed}: read still waiting after ${steps} steps`).toBe(true);
      // Now endless readers, and one write that must get through.
      stop = true;
      await fs.drive(Promise.all(streams));
      let readersStop = false;
      const readers = Array.from({ length: 4 }, () =>
        (async () => {
          while (!readersStop) await dev.read(0, 4096);
        })(),
      );
      const write = dev.write(512, randomBytes(random, 1024));
      let writeDone = false;
      void write.then(() => (writeDone = true));
      steps = 0;
      while (!writeDone && steps < 5000) {
        fs.step();
        steps++;
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
      expect(writeDone, `seed ${seed}: write still waiting after ${steps} steps`).toBe(true);
      readersStop = true;
      await fs.drive(Promise.all(readers));
      fs.mode = 'immediate';
      await dev.close();
    }
  });
});
