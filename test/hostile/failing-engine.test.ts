/**
 * Failing disks under the I/O engine: a workload of concurrent writes (unaligned, so edges are
 * copied up) and reads, with exactly one I/O call failing (ENOSPC or EIO on the Nth write or
 * sync, EIO on the Nth read), for every N, completions in random order. The request that hit the
 * failure, and only it, must fail with a UbdcowError naming the file and the errno; every other
 * request must complete; no bit may ever be set over unwritten data; a failed write must leave its
 * sectors as they were; nothing may hang. Also through writeThroughEngine (what `ubdcow write` runs).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { writeThroughEngine } from '../../src/commands/engine-io.js';
import { UbdcowError } from '../../src/errors.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader } from '../../src/format/header.js';
import { type CowDevice, openCow } from '../../src/io/engine/engine.js';
import { BASE, COW, bitSet, bitmapOnDisk, memoryImage, randomBytes, seededRandom } from '../io/engine-setup.js';
import { watchInvariants } from '../io/invariants.js';
import type { MemoryFileSystem } from '../io/memory-fs.js';
import { mentionsErrno } from './faulty-fs.js';
import { HEAVY, Tally, recordFigures } from './figures.js';

/** 128 whole sectors and a partial one. */
const SIZE = 64 * 1024 + 100;
/** One 4 KiB page: the engine allocates whole pages, so requests on disjoint pages are independent. */
const SLOT_SECTORS = 8;
const SEEDS = HEAVY ? 24 : 3;

type Request =
  | { kind: 'write'; offset: number; data: Uint8Array; firstSector: number; endSector: number }
  | { kind: 'read'; offset: number; length: number; firstSector: number; endSector: number };

/** Requests on disjoint 4 KiB pages, unaligned on purpose; neighbours' bitmap bytes touch, so their slice writes coalesce. */
function plannedRequests(random: () => number): Request[] {
  const slots = Array.from({ length: Math.ceil(SIZE / 512 / SLOT_SECTORS) }, (_, i) => i).sort(() => random() - 0.5);
  return slots.slice(0, 13).map((slot, index) => {
    const slotStart = slot * SLOT_SECTORS * 512;
    const slotEnd = Math.min(SIZE, slotStart + SLOT_SECTORS * 512);
    const offset = slotStart + Math.floor(random() * Math.min(300, slotEnd - slotStart - 1));
    const length = 1 + Math.floor(random() * (slotEnd - offset - 1));
    const firstSector = Math.floor(offset / 512);
    const endSector = Math.ceil((offset + length) / 512);
    return index < 10
      ? { kind: 'write' as const, offset, data: randomBytes(random, length), firstSector, endSector }
      : { kind: 'read' as const, offset, length, firstSector, endSector };
  });
}

interface FaultMode {
  label: string;
  /** Which MemoryFileSystem operation kinds are counted as steps. */
  kinds: Array<'read' | 'write' | 'sync'>;
  code: 'ENOSPC' | 'EIO';
}

const FAULT_MODES: FaultMode[] = [
  { label: 'ENOSPC on the Nth write/sync', kinds: ['write', 'sync'], code: 'ENOSPC' },
  { label: 'EIO on the Nth write/sync', kinds: ['write', 'sync'], code: 'EIO' },
  { label: 'EIO on the Nth read', kinds: ['read'], code: 'EIO' },
];

interface Hit {
  kind: 'read' | 'write' | 'sync';
  path: string;
  position: number;
  length: number;
  /** What the workload was doing: opening the device, serving requests, or closing it. */
  phase: Phase;
}

/** 'verify' is the test reading back results: no fault is injected or counted then. */
type Phase = 'open' | 'requests' | 'verify' | 'close';

/** Makes call number `at` (counting only `mode.kinds`) fail; records it. */
function injectAt(fs: MemoryFileSystem, mode: FaultMode, at: number, state: { phase: Phase }): { hit?: Hit; steps: number } {
  const record: { hit?: Hit; steps: number } = { steps: 0 };
  fs.failRule = (op) => {
    if (state.phase === 'verify' || !mode.kinds.includes(op.kind)) return undefined;
    record.steps++;
    if (record.steps !== at) return undefined;
    record.hit = { ...op, phase: state.phase };
    return mode.code;
  };
  return record;
}

/** The requests a failed call belongs to; `undefined` for calls that belong to none (open, close). */
function attribute(hit: Hit, requests: Request[], layout: { bitmapOffset: number; bitmapLength: number; dataOffset: number }): Set<number> | undefined {
  if (hit.phase !== 'requests') return undefined;
  const covering = (sector: number) => new Set(requests.flatMap((r, i) => (sector >= r.firstSector && sector < r.endSector ? [i] : [])));
  if (hit.kind === 'sync') return new Set(requests.flatMap((r, i) => (r.kind === 'write' ? [i] : [])));
  if (hit.path === BASE) return covering(Math.floor(hit.position / 512));
  if (hit.position >= layout.dataOffset) return covering(Math.floor((hit.position - layout.dataOffset) / 512));
  if (hit.position >= layout.bitmapOffset && hit.position < layout.bitmapOffset + layout.bitmapLength) {
    const firstByte = hit.position - layout.bitmapOffset;
    const endByte = firstByte + hit.length;
    // A bitmap slice is loaded on demand, once, for every request waiting on it (reads too);
    // a bitmap write carries only the writes coalesced into it.
    return new Set(
      requests.flatMap((r, i) => ((r.kind === 'write' || hit.kind === 'read') && Math.floor(r.firstSector / 8) < endByte && Math.ceil(r.endSector / 8) > firstByte ? [i] : [])),
    );
  }
  return undefined;
}

function errorProblems(err: unknown, code: string): string[] {
  if (!(err instanceof UbdcowError)) return [`rejected with ${String(err)}, not a UbdcowError`];
  const problems: string[] = [];
  if (!err.message.includes(COW) && !err.message.includes(BASE)) problems.push(`message names no file: ${err.message}`);
  if (!mentionsErrno(err.message, code)) problems.push(`message does not say ${code}: ${err.message}`);
  if (err.message.includes('\n')) problems.push(`message has several lines: ${err.message}`);
  return problems;
}

function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a).equals(Buffer.from(b));
}

interface RunResult {
  problems: string[];
  /** The fault landed on this many steps' worth of the workload (0: N was past the end). */
  hit?: Hit;
  failedRequests: number;
  steps: number;
}

/** One workload with the Nth step of `mode` failing (at = 0: no fault). */
async function runWorkload(seed: number, sync: boolean, mode: FaultMode, at: number): Promise<RunResult> {
  const random = seededRandom(seed);
  const { fs, base } = await memoryImage(SIZE, random);
  const { header } = parseHeader(fs.contents(COW));
  const layout = { ...computeGeometry(header), sectorSize: 512, size: SIZE };
  const violations = watchInvariants(fs, layout);
  const requests = plannedRequests(random);
  const state: { phase: Phase } = { phase: 'open' };
  const injection = injectAt(fs, mode, at, state);
  fs.mode = 'random';
  fs.random = seededRandom(seed * 7919 + at);
  const problems: string[] = [];
  let device: CowDevice;
  try {
    device = await fs.drive(openCow(COW, { fs, sync }));
  } catch (err) {
    if (!injection.hit) problems.push(`openCow failed without a fault: ${String(err)}`);
    else problems.push(...errorProblems(err, mode.code));
    return { problems, hit: injection.hit, failedRequests: 0, steps: injection.steps };
  }
  state.phase = 'requests';
  const outcomes = await fs.drive(
    Promise.allSettled(requests.map((r) => (r.kind === 'write' ? device.write(r.offset, r.data) : device.read(r.offset, r.length)))),
  );
  const failed = new Set(outcomes.flatMap((o, i) => (o.status === 'rejected' ? [i] : [])));
  for (const i of failed) problems.push(...errorProblems((outcomes[i] as PromiseRejectedResult).reason, mode.code).map((p) => `request ${i}: ${p}`));
  const expected = injection.hit ? attribute(injection.hit, requests, layout) : new Set<number>();
  if (expected === undefined) {
    if (failed.size > 0) problems.push(`requests ${[...failed]} failed, but the fault (${JSON.stringify(injection.hit)}) belongs to none`);
  } else if (injection.hit?.kind === 'sync' || (injection.hit?.path === COW && injection.hit.position < layout.dataOffset)) {
    // A shared sync or a coalesced bitmap slice fails every request riding on it, and only those.
    if (failed.size === 0) problems.push(`no request failed for ${JSON.stringify(injection.hit)}`);
    for (const i of failed) if (!expected.has(i)) problems.push(`request ${i} failed but does not ride on ${JSON.stringify(injection.hit)}`);
  } else if ([...failed].sort().join() !== [...expected].sort().join()) {
    problems.push(`failed requests ${[...failed]}, expected exactly ${[...expected]} (the one that hit ${JSON.stringify(injection.hit)})`);
  }
  // Reads that completed return the disk's contents (nothing here writes their sectors).
  outcomes.forEach((o, i) => {
    const r = requests[i];
    if (o.status === 'fulfilled' && r.kind === 'read' && !same(o.value as Uint8Array, base.subarray(r.offset, r.offset + r.length))) {
      problems.push(`read ${i} returned wrong data`);
    }
  });
  // What the device now shows: completed writes are there; failed ones left their sectors as they were.
  const check = async (dev: CowDevice, when: string) => {
    for (const [i, r] of requests.entries()) {
      if (r.kind !== 'write') continue;
      const got = await fs.drive(dev.read(r.offset, r.data.length));
      const old = base.subarray(r.offset, r.offset + r.data.length);
      if (!failed.has(i) && !same(got, r.data)) problems.push(`${when}: completed write ${i} is not there`);
      // Its sectors were unallocated, so a failed write leaves them as they were (the bit was never
      // set); with sync, the write whose fdatasync failed may also have landed whole.
      if (failed.has(i) && !same(got, old) && !(sync && same(got, r.data))) problems.push(`${when}: failed write ${i} left its sectors changed`);
    }
  };
  state.phase = 'verify';
  await check(device, 'before close');
  state.phase = 'close';
  try {
    await fs.drive(device.close());
    if (injection.hit?.phase === 'close') problems.push(`close() succeeded although ${JSON.stringify(injection.hit)} failed`);
  } catch (err) {
    if (!injection.hit) problems.push(`close failed without a fault: ${String(err)}`);
    else problems.push(...errorProblems(err, mode.code).map((p) => `close: ${p}`));
  }
  fs.failRule = undefined;
  fs.mode = 'immediate';
  const reopened = await openCow(COW, { fs });
  await check(reopened, 'after reopening');
  await reopened.close();
  // On disk: bits only over sectors whose data was written.
  const { bits, sectors } = bitmapOnDisk(fs.contents(COW));
  const mayBeSet = new Uint8Array(sectors);
  // A write allocates its whole 4 KiB pages.
  for (const [i, r] of requests.entries()) if (r.kind === 'write' && (!failed.has(i) || sync)) mayBeSet.fill(1, r.firstSector - (r.firstSector % 8), Math.ceil(r.endSector / 8) * 8);
  for (let s = 0; s < sectors; s++) if (bitSet(bits, s) && !mayBeSet[s]) problems.push(`bit ${s} set on disk without a completed write`);
  problems.push(...violations);
  return { problems, hit: injection.hit, failedRequests: failed.size, steps: injection.steps };
}

/** A run that takes longer than this has hung (a request that never completes). */
const RUN_TIMEOUT_MS = 10_000;

async function withinTimeout<T extends { problems: string[] }>(run: () => Promise<T>, hung: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([run(), new Promise<T>((resolve) => (timer = setTimeout(() => resolve(hung), RUN_TIMEOUT_MS)))]);
  } finally {
    clearTimeout(timer);
  }
}

const tally = new Tally();
const failures: string[] = [];

afterAll(() => {
  recordFigures('failing-engine', {
    title: 'Failing disks (I/O engine)',
    notes: [
      `Workload: 10 unaligned writes and 3 reads on disjoint sectors of a ${SIZE}-byte disk (some share a bitmap byte), completions in random order; ${SEEDS} seeds, with and without sync.`,
      'For every N, the Nth step fails; "requests failed" counts requests that got the error (several only when they shared the failed bitmap slice or fdatasync).',
      'Checked every time: only the requests that rode on the failed call fail, with a UbdcowError naming the file and errno; all others complete; no bit set before its data; failed writes leave their sectors unchanged (with sync: unchanged or fully written).',
    ],
    rows: tally.rows('fault', ['injections', 'during open', 'on a request', 'at close', 'not reached', 'requests failed', 'failed']),
    totals: { injections: tally.total('injections'), failed: tally.total('failed') },
    failures,
  });
});

describe('failing disks under the engine: one call fails, at every step', () => {
  for (const mode of FAULT_MODES) {
    for (const sync of [false, true]) {
      it(`${mode.label}${sync ? ', sync' : ''}: only the request that hit it fails; nothing unwritten is marked written`, async () => {
        const caseFailures: string[] = [];
        for (let seed = 1; seed <= SEEDS; seed++) {
          const probe = await runWorkload(seed, sync, mode, 0);
          expect(probe.problems, `fault-free run, seed ${seed}`).toEqual([]);
          for (let at = 1; at <= probe.steps; at++) {
            const result = await withinTimeout(() => runWorkload(seed, sync, mode, at), { problems: ['hung'], failedRequests: 0, steps: 0 });
            const label = `${mode.label}${sync ? ' (sync)' : ''}`;
            tally.add(label, 'injections');
            if (!result.hit) tally.add(label, 'not reached');
            else if (result.hit.phase === 'open') tally.add(label, 'during open');
            else if (result.hit.phase === 'close') tally.add(label, 'at close');
            else tally.add(label, 'on a request');
            tally.add(label, 'requests failed', result.failedRequests);
            if (result.problems.length > 0) {
              tally.add(label, 'failed');
              caseFailures.push(`seed ${seed}, step ${at} (${JSON.stringify(result.hit)}): ${result.problems.join('; ')}`);
            }
          }
        }
        failures.push(...caseFailures);
        expect(caseFailures).toEqual([]);
      }, 120_000);
    }
  }
});

describe('failing disks under writeThroughEngine (ubdcow write)', () => {
  const DISK = 3 * 1024 * 1024 + 1000;
  for (const mode of FAULT_MODES) {
    it(`${mode.label}: reports the error; every chunk is all old or all new; no bit over unwritten data`, async () => {
      const run = async (at: number) => {
        const random = seededRandom(99);
        const { fs, base } = await memoryImage(DISK, random);
        const data = randomBytes(random, DISK - 700);
        const injection = injectAt(fs, mode, at, { phase: 'requests' });
        async function* input() {
          for (let at = 0; at < data.length; at += 300_000) yield data.subarray(at, at + 300_000);
        }
        const outcome = await writeThroughEngine(COW, input(), { offset: 300, fs }).then(
          () => undefined,
          (err: unknown) => err,
        );
        fs.failRule = undefined;
        const problems: string[] = [];
        if (injection.hit && outcome === undefined) problems.push('the failure was not reported');
        if (!injection.hit && outcome !== undefined) problems.push(`failed without a fault: ${String(outcome)}`);
        if (outcome !== undefined) problems.push(...errorProblems(outcome, mode.code));
        const device = await openCow(COW, { fs });
        const disk = await device.read(0, DISK);
        await device.close();
        const written = new Uint8Array(DISK);
        written.set(base);
        written.set(data, 300);
        // Every byte shows the old disk or the new data: a bit set over unwritten data would show
        // the data area's zeros instead. (A chunk that failed after a neighbour allocated the
        // sector they share may show its bytes in that sector: a failed write to allocated
        // sectors is undefined, as on any disk.)
        for (let at = 0; at < DISK; at++) {
          if (disk[at] !== base[at] && disk[at] !== written[at]) {
            problems.push(`byte ${at} is neither the old disk nor the written data`);
            break;
          }
        }
        if (!injection.hit && !same(disk, written)) problems.push('the write did not land');
        return { problems, steps: injection.steps, hit: injection.hit };
      };
      const probe = await run(0);
      expect(probe.problems).toEqual([]);
      const caseFailures: string[] = [];
      for (let at = 1; at <= probe.steps; at++) {
        const result = await withinTimeout(() => run(at), { problems: ['hung'], steps: 0, hit: undefined });
        tally.add(`ubdcow write: ${mode.label}`, 'injections');
        tally.add(`ubdcow write: ${mode.label}`, result.hit?.kind === 'read' && result.hit.position < 8192 ? 'during open' : 'on a request');
        if (result.problems.length > 0) {
          tally.add(`ubdcow write: ${mode.label}`, 'failed');
          caseFailures.push(`write, ${mode.label}, step ${at} (${JSON.stringify(result.hit)}): ${result.problems.join('; ')}`);
        }
      }
      failures.push(...caseFailures);
      expect(caseFailures).toEqual([]);
    }, 120_000);
  }
});
