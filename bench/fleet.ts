/*
 * Fleet maintenance benchmark (issue 22): `sparsify` of a 10 GiB COW holding 2 GiB (half of it
 * equal to the backing file, all sparse files), and `rebase --rewrite` over a 2 GiB base that
 * differs from the new base in 5 % of its pages, against `qemu-img rebase -b` on the equivalent
 * qcow2 overlay. Targets: sparsify <= 10 s; rebase --rewrite >= 0.8x qemu-img's speed.
 *
 * Options: `--only sparsify|rebase` runs one part; `--runs N` (default 3) alternating rebase runs
 * of qemu-img and ubdcow, each on a fresh overlay, reported as medians with each run's ratio.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createCow } from '../src/commands/create.js';
import { openImage } from '../src/io/image/image.js';
import { type Measurement, describeMachine, ensureBuilt, hasTool, measure, measureCli, seconds, table } from './util.js';
import { seededRandom } from '../test/helpers/cow-writes.js';

const GiB = 1 << 30;
const MiB = 1 << 20;

/** Writes `data` as allocated disk bytes at `offset` of a COW: data area, then the bitmap bits (512-byte sectors). */
function writeIntoCow(fd: number, dataOffset: number, bitmapOffset: number, offset: number, data: Uint8Array): void {
  fs.writeSync(fd, data, 0, data.length, dataOffset + offset);
  const bits = new Uint8Array(data.length / 512 / 8).fill(0xff);
  fs.writeSync(fd, bits, 0, bits.length, bitmapOffset + offset / 512 / 8);
}

/** `--only NAME` and `--runs N` from the command line. */
function argument(name: string): string | undefined {
  const at = process.argv.indexOf(name);
  return at >= 0 ? process.argv[at + 1] : undefined;
}
const only = argument('--only');
const runs = Math.max(1, Number(argument('--runs') ?? 3));
if (only !== undefined && only !== 'sparsify' && only !== 'rebase') throw new Error(`--only: sparsify or rebase, not ${only}`);

/** Scale for quick runs: FLEET_SCALE=0.2 makes every size a fifth. */
const scale = Number(process.env.FLEET_SCALE ?? 1);

/** Writes dirty pages out, so the measured command does not pay for the set-up's write-back. */
function syncAll(): void {
  spawnSync('sync');
}

/**
 * Two COWs over one 10 GiB sparse base holding 2 GiB in 1 MiB runs: `whole` (half the runs equal
 * to the base, half with one changed page: 1023 droppable pages in one stretch) and `alternate`
 * (half equal, half with every other page changed: the worst case for hole punching, 128 punches
 * per MiB).
 */
async function sparsifyBench(dir: string): Promise<string[][]> {
  const base = path.join(dir, 'base10g.img');
  fs.writeFileSync(base, '');
  const diskBytes = Math.round((10 * GiB * scale) / MiB) * MiB;
  fs.truncateSync(base, diskBytes);
  const patterns = ['whole', 'alternate'] as const;
  const cows = patterns.map((name) => path.join(dir, `vm10g-${name}.cow`));
  for (const cow of cows) await createCow(cow, base);
  const image = await openImage(cows[0]!);
  const { dataOffset, bitmapOffset } = image.geometry;
  await image.handle.close();
  const random = seededRandom(22);
  const runBytes = MiB;
  const runs = Math.round((2 * GiB * scale) / runBytes);
  const slots = diskBytes / runBytes;
  const chosen = new Set<number>();
  while (chosen.size < runs) chosen.add(Math.floor(random() * slots));
  const cowFds = cows.map((cow) => fs.openSync(cow, 'r+'));
  const baseFd = fs.openSync(base, 'r+');
  const chunk = new Uint8Array(runBytes);
  const changed = new Uint8Array(runBytes);
  let i = 0;
  for (const slot of [...chosen].sort((a, b) => a - b)) {
    randomFillSync(chunk);
    const offset = slot * runBytes;
    fs.writeSync(baseFd, chunk, 0, chunk.length, offset);
    const differs = i++ % 2 === 1;
    for (const [n, fd] of cowFds.entries()) {
      changed.set(chunk);
      if (differs && patterns[n] === 'whole') changed[100] ^= 0xff;
      if (differs && patterns[n] === 'alternate') for (let p = 0; p < runBytes; p += 8192) changed[p] ^= 0xff;
      writeIntoCow(fd, dataOffset, bitmapOffset, offset, changed);
    }
  }
  for (const fd of [...cowFds, baseFd]) fs.closeSync(fd);
  const touch = new Date(1_600_000_000_000);
  fs.utimesSync(base, touch, touch);
  const rows: string[][] = [];
  for (const [n, cow] of cows.entries()) {
    await createCowHeaderMtime(cow, base);
    syncAll();
    const load = os.loadavg()[0]!.toFixed(1);
    const m = await measureCli(['sparsify', '--no-fs', '--json', cow]);
    if (m.status !== 0) throw new Error(`sparsify failed: ${m.stderr}`);
    const result = JSON.parse(m.stdout);
    rows.push([
      `sparsify --no-fs, ${(diskBytes / GiB).toFixed(0)} GiB COW holding ${((runs * runBytes) / GiB).toFixed(1)} GiB (${patterns[n]})`,
      seconds(m.seconds),
      `dropped ${(result.dropped.bytes / GiB).toFixed(2)} GiB in ${result.dropped.pages} pages; on disk ${(result.onDisk.before / GiB).toFixed(2)} -> ${(result.onDisk.after / GiB).toFixed(2)} GiB; load ${load}`,
    ]);
  }
  return rows;
}

/** The base's mtime was set after the COW was made: record it (the header-only rebase onto itself with --compare). */
async function createCowHeaderMtime(cow: string, base: string): Promise<void> {
  const m = await measureCli(['rebase', '--unsafe', cow, base]);
  if (m.status !== 0) throw new Error(`rebase -u failed: ${m.stderr}`);
}

async function rebaseBench(dir: string): Promise<string[][]> {
  const oldBase = path.join(dir, 'old2g.img');
  const newBase = path.join(dir, 'new2g.img');
  const random = seededRandom(5);
  const fd = fs.openSync(oldBase, 'w');
  const chunk = new Uint8Array(64 * MiB);
  const baseBytes = Math.round(2 * GiB * scale / chunk.length) * chunk.length;
  for (let at = 0; at < baseBytes; at += chunk.length) {
    randomFillSync(chunk);
    fs.writeSync(fd, chunk, 0, chunk.length, at);
  }
  fs.closeSync(fd);
  fs.copyFileSync(oldBase, newBase);
  const nfd = fs.openSync(newBase, 'r+');
  const piece = new Uint8Array(64 << 10);
  const pieces = Math.round((0.05 * baseBytes) / piece.length);
  for (let i = 0; i < pieces; i++) {
    randomFillSync(piece);
    fs.writeSync(nfd, piece, 0, piece.length, Math.floor(random() * (baseBytes / piece.length)) * piece.length);
  }
  fs.closeSync(nfd);
  const when = new Date(1_600_000_000_000);
  fs.utimesSync(oldBase, when, when);
  // Both overlays start empty, so both tools compare the whole bases. They take turns (qemu-img,
  // ubdcow, qemu-img, ...), each on a fresh overlay; medians count, and each round's ratio is shown.
  const ours: Measurement[] = [];
  const theirs: Measurement[] = [];
  const loads: number[] = [];
  let copied = 0;
  const useQemu = hasTool('qemu-img');
  for (let round = 0; round < runs; round++) {
    loads.push(os.loadavg()[0]!);
    if (useQemu) {
      const overlay = path.join(dir, `vm2g-${round}.qcow2`);
      const made = await measure('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', oldBase, '-F', 'raw', overlay]);
      if (made.status !== 0) throw new Error(made.stderr);
      syncAll();
      const m = await measure('qemu-img', ['rebase', '-q', '-f', 'qcow2', '-b', newBase, '-F', 'raw', overlay]);
      if (m.status !== 0) throw new Error(m.stderr);
      theirs.push(m);
      fs.rmSync(overlay);
    }
    const cow = path.join(dir, `vm2g-${round}.cow`);
    await createCow(cow, oldBase);
    syncAll();
    const m = await measureCli(['rebase', '--rewrite', '--json', cow, newBase]);
    if (m.status !== 0) throw new Error(`rebase --rewrite failed: ${m.stderr}`);
    ours.push(m);
    copied = JSON.parse(m.stdout).cows[0].copiedBytes;
    fs.rmSync(cow);
  }
  const median = (values: number[]) => {
    const sorted = [...values].sort((x, y) => x - y);
    const mid = sorted.length >> 1;
    return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  };
  const wall = (list: Measurement[]) => list.map((m) => m.seconds);
  const cpu = (list: Measurement[]) => `CPU (user+sys) median ${seconds(median(list.map((m) => m.cpuSeconds)))}`;
  const load = `load ${Math.min(...loads).toFixed(1)}-${Math.max(...loads, os.loadavg()[0]!).toFixed(1)}`;
  const rows: string[][] = [
    [`ubdcow rebase --rewrite (${(baseBytes / GiB).toFixed(1)} GiB, 5 % differ; ${runs} runs, ${load})`, seconds(median(wall(ours))), `median; copied ${(copied / MiB).toFixed(0)} MiB; ${cpu(ours)}; runs ${wall(ours).map(seconds).join(', ')}`],
  ];
  if (useQemu) {
    const ratios = theirs.map((m, i) => (m.seconds / ours[i]!.seconds).toFixed(2));
    rows.push([
      'qemu-img rebase -b (same bases)',
      seconds(median(wall(theirs))),
      `median; ${cpu(theirs)}; runs ${wall(theirs).map(seconds).join(', ')}; ubdcow / qemu-img speed: median ${(median(wall(theirs)) / median(wall(ours))).toFixed(2)}x, per run ${ratios.join(', ')}`,
    ]);
  }
  return rows;
}

async function main(): Promise<void> {
  ensureBuilt();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-fleet-'));
  try {
    const machine = describeMachine();
    console.log(`machine: ${JSON.stringify(machine)}`);
    const rows = [['what', 'time', 'notes'], ...(only === 'rebase' ? [] : await sparsifyBench(dir)), ...(only === 'sparsify' ? [] : await rebaseBench(dir))];
    console.log(table(rows));
  } finally {
    if (process.env.FLEET_KEEP) console.log(`kept ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
