/*
 * Fleet maintenance benchmark (issue 22): `sparsify` of a 10 GiB COW holding 2 GiB (half of it
 * equal to the backing file, all sparse files), and `rebase --rewrite` over a 2 GiB base that
 * differs from the new base in 5 % of its pages, against `qemu-img rebase -b` on the equivalent
 * qcow2 overlay. Targets: sparsify <= 10 s; rebase --rewrite >= 0.8x qemu-img's speed.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createCow } from '../src/commands/create.js';
import { openImage } from '../src/io/image.js';
import { describeMachine, ensureBuilt, hasTool, measure, measureCli, seconds, table } from './util.js';
import { seededRandom } from '../test/helpers/cow-writes.js';

const GiB = 1 << 30;
const MiB = 1 << 20;

/** Writes `data` as allocated disk bytes at `offset` of a COW: data area, then the bitmap bits (512-byte sectors). */
function writeIntoCow(fd: number, dataOffset: number, bitmapOffset: number, offset: number, data: Uint8Array): void {
  fs.writeSync(fd, data, 0, data.length, dataOffset + offset);
  const bits = new Uint8Array(data.length / 512 / 8).fill(0xff);
  fs.writeSync(fd, bits, 0, bits.length, bitmapOffset + offset / 512 / 8);
}

/** Scale for quick runs: FLEET_SCALE=0.2 makes every size a fifth. */
const scale = Number(process.env.FLEET_SCALE ?? 1);

/** Writes dirty pages out, so the measured command does not pay for the set-up's write-back. */
function syncAll(): void {
  spawnSync('sync');
}

async function sparsifyBench(dir: string): Promise<string[]> {
  const base = path.join(dir, 'base10g.img');
  const cow = path.join(dir, 'vm10g.cow');
  fs.writeFileSync(base, '');
  const diskBytes = Math.round(10 * GiB * scale / MiB) * MiB;
  fs.truncateSync(base, diskBytes);
  await createCow(cow, base);
  const image = await openImage(cow);
  const { dataOffset, bitmapOffset } = image.geometry;
  await image.handle.close();
  const random = seededRandom(22);
  const runBytes = MiB;
  const runs = Math.round((2 * GiB * scale) / runBytes);
  const slots = diskBytes / runBytes;
  const chosen = new Set<number>();
  while (chosen.size < runs) chosen.add(Math.floor(random() * slots));
  const cowFd = fs.openSync(cow, 'r+');
  const baseFd = fs.openSync(base, 'r+');
  const chunk = new Uint8Array(runBytes);
  let i = 0;
  for (const slot of [...chosen].sort((a, b) => a - b)) {
    randomFillSync(chunk);
    const offset = slot * runBytes;
    fs.writeSync(baseFd, chunk, 0, chunk.length, offset);
    // Every other run is what the guest rewrote with the same bytes (droppable); the rest differs in one page of two.
    if (i++ % 2 === 1) for (let p = 0; p < runBytes; p += 8192) chunk[p] ^= 0xff;
    writeIntoCow(cowFd, dataOffset, bitmapOffset, offset, chunk);
  }
  fs.closeSync(cowFd);
  fs.closeSync(baseFd);
  const touch = new Date(1_600_000_000_000);
  fs.utimesSync(base, touch, touch);
  await createCowHeaderMtime(cow, base);
  syncAll();
  if (process.env.FLEET_KEEP) fs.copyFileSync(cow, `${cow}.orig`);
  const m = await measureCli(['sparsify', '--no-fs', '--json', cow]);
  if (m.status !== 0) throw new Error(`sparsify failed: ${m.stderr}`);
  const result = JSON.parse(m.stdout);
  return ['sparsify --no-fs, 10 GiB COW holding 2 GiB', seconds(m.seconds), `dropped ${(result.dropped.bytes / GiB).toFixed(2)} GiB; on disk ${(result.onDisk.before / GiB).toFixed(2)} -> ${(result.onDisk.after / GiB).toFixed(2)} GiB`];
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
  const rows: string[][] = [];
  const cow = path.join(dir, 'vm2g.cow');
  await createCow(cow, oldBase);
  syncAll();
  // Both overlays start empty, so both tools compare the whole bases; both read them warm.
  const ours = await measureCli(['rebase', '--rewrite', '--json', cow, newBase]);
  if (ours.status !== 0) throw new Error(`rebase --rewrite failed: ${ours.stderr}`);
  rows.push(['ubdcow rebase --rewrite (2 GiB, 5 % differ)', seconds(ours.seconds), `copied ${(JSON.parse(ours.stdout).cows[0].copiedBytes / MiB).toFixed(0)} MiB`]);
  if (hasTool('qemu-img')) {
    const overlay = path.join(dir, 'vm2g.qcow2');
    const made = await measure('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', oldBase, '-F', 'raw', overlay]);
    if (made.status !== 0) throw new Error(made.stderr);
    const theirs = await measure('qemu-img', ['rebase', '-q', '-f', 'qcow2', '-b', newBase, '-F', 'raw', overlay]);
    if (theirs.status !== 0) throw new Error(theirs.stderr);
    rows.push(['qemu-img rebase -b (same bases)', seconds(theirs.seconds), `ubdcow / qemu-img speed: ${(theirs.seconds / ours.seconds).toFixed(2)}x`]);
  }
  return rows;
}

async function main(): Promise<void> {
  ensureBuilt();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-fleet-'));
  try {
    const machine = describeMachine();
    console.log(`machine: ${JSON.stringify(machine)}`);
    const rows = [['what', 'time', 'notes'], await sparsifyBench(dir), ...(await rebaseBench(dir))];
    console.log(table(rows));
  } finally {
    if (process.env.FLEET_KEEP) console.log(`kept ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
