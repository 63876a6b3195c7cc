import { spawn } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import { BASE, COW, bitSet, bitmapOnDisk, memoryImage, openMemoryCow, randomBytes, seededRandom } from './engine-setup.js';
import { type LoggedWrite, MemoryFileSystem, stateAt } from './memory-fs.js';

interface AckedWrite {
  offset: number;
  data: Uint8Array;
  /** fs sequence number when the write resolved (or flush covering it resolved). */
  acked: number;
}

const SIZE = 32 * 1024 + 100;

/** Non-overlapping writes (so each one's expected contents are exact), unaligned on purpose. */
function plannedWrites(random: () => number, count: number): Array<{ offset: number; data: Uint8Array }> {
  const sectors = Math.floor(SIZE / 512);
  const slots = Array.from({ length: sectors }, (_, i) => i).sort(() => random() - 0.5);
  return slots.slice(0, count).map((sector) => {
    const offset = sector * 512 + Math.floor(random() * 100);
    const length = 1 + Math.floor(random() * (512 * 1 - (offset - sector * 512)));
    return { offset, data: randomBytes(random, Math.min(length, SIZE - offset)) };
  });
}

async function runRecorded(seed: number, sync: boolean, allocationUnit?: number, blockingWrites = false) {
  const random = seededRandom(seed);
  const { fs, base } = await memoryImage(SIZE, random);
  fs.blockingWrites = blockingWrites;
  const initial = new Map<string, Uint8Array>([[COW, fs.contents(COW)], [BASE, fs.contents(BASE)]]);
  const dev = await openMemoryCow(fs, { sync, allocationUnit });
  fs.mode = 'random';
  fs.random = random;
  const acked: AckedWrite[] = [];
  const writes = plannedWrites(random, 24);
  let flushedUpTo = -1;
  const issued = writes.map((w, i) =>
    dev.write(w.offset, w.data).then(() => {
      acked.push({ ...w, acked: fs.sequence++ });
      if (i === 12) {
        const before = acked.length;
        return dev.flush().then(() => {
          flushedUpTo = Math.max(flushedUpTo, before);
          acked.slice(0, before).forEach((a) => (a.acked = Math.min(a.acked, fs.sequence)));
        });
      }
      return undefined;
    }),
  );
  await fs.drive(Promise.all(issued));
  fs.mode = 'immediate';
  await dev.close();
  return { fs, base, initial, acked, writes, end: fs.sequence };
}

/** Every sector whose bit is set (and was not before) must have had a data write completed. */
function unbackedBits(state: Map<string, Uint8Array>, includedDataWrites: LoggedWrite[], dataOffset: number): number[] {
  const { bits, sectors } = bitmapOnDisk(state.get(COW)!);
  const written = new Uint8Array(sectors);
  for (const write of includedDataWrites) {
    if (write.path !== COW || write.position < dataOffset) continue;
    const first = Math.floor((write.position - dataOffset) / 512);
    written.fill(1, first, Math.ceil((write.position - dataOffset + write.bytes.length) / 512));
  }
  const bad: number[] = [];
  for (let s = 0; s < sectors; s++) if (bitSet(bits, s) && !written[s]) bad.push(s);
  return bad;
}

/** Units of `unitSectors` sectors partly allocated in the bitmap of `state` (the last one ends with the disk). */
function partialUnits(state: Map<string, Uint8Array>, unitSectors: number): number[] {
  const { bits, sectors } = bitmapOnDisk(state.get(COW)!);
  const bad: number[] = [];
  for (let unit = 0; unit < sectors; unit += unitSectors) {
    const set = bitSet(bits, unit);
    for (let s = unit + 1; s < Math.min(unit + unitSectors, sectors); s++) {
      if (bitSet(bits, s) !== set) {
        bad.push(unit);
        break;
      }
    }
  }
  return bad;
}

/** Bytes of the disk that are neither the backing's nor those of the (non-overlapping) write covering them. */
function neitherOldNorNew(disk: Uint8Array, base: Uint8Array, writes: Array<{ offset: number; data: Uint8Array }>): number[] {
  const expectedNew = base.slice();
  for (const w of writes) expectedNew.set(w.data, w.offset);
  const bad: number[] = [];
  for (let i = 0; i < disk.length && bad.length < 5; i++) if (disk[i] !== base[i] && disk[i] !== expectedNew[i]) bad.push(i);
  return bad;
}

async function readBack(state: Map<string, Uint8Array>, mtime: number, offset: number, length: number): Promise<Uint8Array> {
  const files = new Map([...state].map(([p, data]) => [p, { data, mtime }] as const));
  const fs = MemoryFileSystem.fromContents(files);
  const dev = await openCow(COW, { fs });
  try {
    return await dev.read(offset, length);
  } finally {
    await dev.close();
  }
}

describe('crash consistency: the recorded I/O cut at every point', () => {
  it.each([
    ['4 KiB pages (the default)', undefined, false],
    ['sectors (allocationUnit 512)', 512, false],
    ['4 KiB pages, blocking data and bitmap writes', undefined, true],
    ['sectors, blocking bitmap writes', 512, true],
  ])('a process crash (page cache survives) never leaves a set bit over unwritten data, nor loses an acknowledged write, allocating %s; every sector reads old or new, every unit is whole', async (_name, allocationUnit, blockingWrites) => {
    const unitSectors = (allocationUnit ?? 4096) / 512;
    let cuts = 0;
    for (let seed = 1; seed <= 6; seed++) {
      const { fs, initial, acked, end, base, writes } = await runRecorded(seed, false, allocationUnit, blockingWrites);
      const mtime = fs.files.get(BASE)!.mtime;
      const { dataOffset } = bitmapOnDisk(initial.get(COW)!);
      for (let cut = 0; cut <= end; cut++) {
        const included = (w: LoggedWrite) => w.completed < cut;
        const state = stateAt(initial, fs.log, included);
        expect(unbackedBits(state, fs.log.filter((op): op is LoggedWrite => op.kind === 'write' && included(op)), dataOffset), `seed ${seed} cut ${cut}`).toEqual([]);
        expect(partialUnits(state, unitSectors), `seed ${seed} cut ${cut}: partly allocated units`).toEqual([]);
        expect(neitherOldNorNew(await readBack(state, mtime, 0, SIZE), base, writes), `seed ${seed} cut ${cut}: bytes neither old nor new`).toEqual([]);
        for (const write of acked.filter((a) => a.acked < cut)) {
          const got = await readBack(state, mtime, write.offset, write.data.length);
          expect(Buffer.from(got).equals(Buffer.from(write.data)), `seed ${seed} cut ${cut}: acknowledged write at ${write.offset} lost`).toBe(true);
        }
        cuts++;
      }
    }
    expect(cuts).toBeGreaterThan(500);
  });

  it('with sync, a power loss (only fdatasync\'ed writes survive, the worst subset of the rest) loses nothing acknowledged', async () => {
    for (let seed = 20; seed <= 24; seed++) {
      const { fs, initial, acked, end } = await runRecorded(seed, true);
      const mtime = fs.files.get(BASE)!.mtime;
      const { dataOffset, bits: _bits } = bitmapOnDisk(initial.get(COW)!);
      const syncs = fs.log.filter((op) => op.kind === 'sync');
      for (let cut = 0; cut <= end; cut += 1) {
        // Durable: completed before the issue of a sync that completed before the cut.
        const durableBefore = Math.max(-1, ...syncs.filter((s) => s.completed < cut).map((s) => s.issued));
        const durable = (w: LoggedWrite) => w.completed < durableBefore;
        const isBitmap = (w: LoggedWrite) => w.position < dataOffset;
        // Adversary: every completed bitmap write survives, no data write that was not synced does.
        const included = (w: LoggedWrite) => w.completed < cut && (durable(w) || isBitmap(w));
        const state = stateAt(initial, fs.log, included);
        expect(unbackedBits(state, fs.log.filter((op): op is LoggedWrite => op.kind === 'write' && included(op)), dataOffset), `seed ${seed} cut ${cut}`).toEqual([]);
        expect(partialUnits(state, 8), `seed ${seed} cut ${cut}: partly allocated pages`).toEqual([]);
        const durableOnly = stateAt(initial, fs.log, (w) => w.completed < cut && durable(w));
        for (const write of acked.filter((a) => a.acked < cut)) {
          const got = await readBack(durableOnly, mtime, write.offset, write.data.length);
          expect(Buffer.from(got).equals(Buffer.from(write.data)), `seed ${seed} cut ${cut}: synced write at ${write.offset} lost`).toBe(true);
        }
      }
    }
  });

  it('a child process killed with SIGKILL mid-workload leaves every acknowledged write and no unbacked bit', async () => {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-kill-'));
    const engineUrl = new URL('../../dist/io/engine/engine.js', import.meta.url).href;
    try {
      for (let round = 0; round < 5; round++) {
        const base = path.join(dir, `base${round}.img`);
        const cow = path.join(dir, `disk${round}.cow`);
        // Not zeros: a sector copied up with its page holds the backing's 0xee, never zeros.
        await fsp.writeFile(base, Buffer.alloc(4 * 1024 * 1024, 0xee));
        await createCow(cow, base);
        // Each write fills whole sectors with a tag (never zero) naming the write; acked ids go to stdout.
        const script = `
          const { openCow } = await import(${JSON.stringify(engineUrl)});
          const dev = await openCow(${JSON.stringify(cow)});
          let id = 1; const inflight = new Set();
          for (;;) {
            while (inflight.size < 16) {
              const myId = id++;
              const sector = (myId * 7919) % 8191; // each write covers sector and sector + 1 of 8192
              const data = Buffer.alloc(512 * 2, myId % 250 + 1);
              data.writeUInt32LE(myId, 0); data.writeUInt32LE(myId, 512);
              const p = dev.write(sector * 512, data).then(() => { process.stdout.write(myId + ' ' + sector + '\\n'); inflight.delete(p); });
              inflight.add(p);
            }
            await Promise.race(inflight);
          }`;
        const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
        let output = '';
        child.stdout.on('data', (chunk) => (output += chunk));
        // Kill at a random moment after the workload is under way.
        let exitedByItself = false;
        const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
        void exited.then(() => (exitedByItself = true));
        await Promise.race([
          exited,
          new Promise<void>((resolve) => {
            const ready = () => {
              if (output.includes('\n') || exitedByItself) resolve();
              else setTimeout(ready, 5);
            };
            ready();
          }),
        ]);
        expect(exitedByItself, 'the workload process stopped before it was killed').toBe(false);
        await new Promise((resolve) => setTimeout(resolve, 20 + Math.random() * 200));
        expect(exitedByItself, 'the workload process stopped before it was killed').toBe(false);
        child.kill('SIGKILL');
        await exited;
        const lines = output.split('\n').filter((line) => /^\d+ \d+$/.test(line));
        expect(lines.length, 'the child acknowledged some writes before it was killed').toBeGreaterThan(0);
        const latestBySector = new Map<number, number>();
        // Writes to one sector can be reordered; the last acked per sector pair is a lower bound.
        const contents = await fsp.readFile(cow);
        const { bits, dataOffset, sectors } = bitmapOnDisk(contents);
        for (let s = 0; s < sectors; s++) {
          expect(bitSet(bits, s), `sector ${s}: its 4 KiB page is partly allocated`).toBe(bitSet(bits, s - (s % 8)));
          if (!bitSet(bits, s)) continue;
          const sector = contents.subarray(dataOffset + s * 512, dataOffset + s * 512 + 512);
          expect(sector.some((b) => b !== 0), `sector ${s} has its bit set but no data`).toBe(true);
        }
        for (const line of lines) {
          const [id, sector] = line.split(' ').map(Number);
          latestBySector.set(sector, Math.max(latestBySector.get(sector) ?? 0, id));
          for (const s of [sector, sector + 1]) {
            expect(bitSet(bits, s), `acked write ${id}: sector ${s} bit`).toBe(true);
          }
        }
        // Overlapping writes are served in issue order, so a sector holds the newest landed write.
        const dev = await openCow(cow, { readOnly: true });
        for (const [sector, id] of latestBySector) {
          const got = Buffer.from(await dev.read(sector * 512, 1024));
          expect(got.readUInt32LE(0), `sector ${sector}: acknowledged write ${id} lost`).toBeGreaterThanOrEqual(id);
          expect(got.readUInt32LE(512), `sector ${sector + 1}: acknowledged write ${id} lost`).toBeGreaterThanOrEqual(id);
        }
        await dev.close();
      }
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
