/*
 * NBD benchmark: `ubdcow serve` of a COW against `qemu-nbd` serving a qcow2 overlay of the same
 * base, with the same clients in the same run.
 *   1. qemu-img bench over NBD, 4 KiB requests at depth 32 (every 64 KiB, as bench/engine.ts:
 *      each write lands on a fresh sector range / cluster), writes then reads, --runs N (default 5)
 *      runs alternating between the servers, medians with their spread.
 *   2. nbdcopy of the whole export to null: (the base is all data, so neither side can skip),
 *      both servers up, runs alternating, the median of each.
 *   3. `ubdcow convert -O qcow2` of a COW against `qemu-img convert -O qcow2` of the merged raw.
 * Targets (issues 12 and 20): writes >= 1.0x, reads >= 0.9x, nbdcopy >= 0.8x, convert <= 1.3x the time.
 *
 * Usage: tsx bench/nbd.ts [--quick] [--runs N]   (UBDCOW_BENCH_DIR=DIR for the images, default os.tmpdir())
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describeMachine, ensureBuilt, hasTool, repoRoot, table } from './util.js';

const cliPath = path.join(repoRoot, 'bin', 'ubdcow');

const MiB = 1 << 20;
const quick = process.argv.includes('--quick');
const EXPORT_BYTES = quick ? 256 * MiB : 1024 * MiB;
const CONVERT_BYTES = quick ? 128 * MiB : 512 * MiB;
const BENCH_COUNT = quick ? 4000 : 16000;
const STEP = 64 * 1024;
const COPY_RUNS = quick ? 3 : 7;
const RUNS = process.argv.includes('--runs') ? Number(process.argv[process.argv.indexOf('--runs') + 1]) : quick ? 2 : 5;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function must(program: string, args: string[]): string {
  const r = spawnSync(program, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${program} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

function timed(program: string, args: string[]): number {
  const start = process.hrtime.bigint();
  must(program, args);
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** A base of non-zero data (a repeating random MiB; the file system cannot skip it). */
function makeBase(file: string, bytes: number): void {
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < chunk.length; i++) chunk[i] = ((i * 2654435761) >>> 24) | 1;
  const fd = fs.openSync(file, 'w');
  for (let at = 0; at < bytes; at += MiB) fs.writeSync(fd, chunk, 0, MiB, at);
  fs.closeSync(fd);
}

async function waitForSocket(sock: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(sock)) return;
    if (child.exitCode !== null) throw new Error(`server exited early (${child.exitCode})`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no socket at ${sock}`);
}

interface Server {
  uri: string;
  stop(): Promise<void>;
}

async function startServer(program: string, args: string[], sock: string): Promise<Server> {
  fs.rmSync(sock, { force: true });
  const child = spawn(program, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitForSocket(sock, child);
  return {
    uri: `nbd+unix:///?socket=${sock}`,
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.on('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

const ubdcowServe = (cow: string, sock: string) => startServer(process.execPath, [cliPath, 'serve', cow, '--socket', sock], sock);
const qemuNbd = (overlay: string, sock: string) => startServer('qemu-nbd', ['-f', 'qcow2', '-k', sock, '--persistent', '--cache=writeback', overlay], sock);

function qemuBench(uri: string, write: boolean): number {
  const args = ['bench', '-f', 'raw', '-c', String(BENCH_COUNT), '-d', '32', '-s', '4096', '-S', String(STEP), '--pattern=90'];
  if (write) args.push('-w');
  args.push(uri);
  const out = must('qemu-img', args);
  const seconds = Number(/Run completed in ([\d.]+) seconds/.exec(out)?.[1]);
  return BENCH_COUNT / seconds;
}

function freshPair(dir: string, base: string): { cow: string; overlay: string } {
  const cow = path.join(dir, 'bench.cow');
  const overlay = path.join(dir, 'bench.qcow2');
  fs.rmSync(cow, { force: true });
  fs.rmSync(overlay, { force: true });
  must(process.execPath, [cliPath, 'create', cow, base]);
  must('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay]);
  return { cow, overlay };
}

async function main(): Promise<void> {
  console.log('## NBD: ubdcow serve vs qemu-nbd\n');
  const m = describeMachine();
  console.log(`machine: ${m.cpu}, ${m.cores} cores, ${m.memory}, ${m.os}, Node ${m.node}; load ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  const missing = ['qemu-img', 'qemu-nbd', 'nbdcopy'].filter((t) => !hasTool(t));
  if (missing.length > 0) {
    console.log(`skipped: ${missing.join(', ')} not installed`);
    return;
  }
  ensureBuilt();
  const dir = fs.mkdtempSync(path.join(process.env.UBDCOW_BENCH_DIR ?? os.tmpdir(), 'ubdcow-bench-nbd-'));
  const rows: string[][] = [['what', 'ubdcow', 'qemu', 'ratio', 'target']];
  try {
    const base = path.join(dir, 'base.img');
    makeBase(base, EXPORT_BYTES);
    const sock = path.join(dir, 'nbd.sock');

    // 1. qemu-img bench, writes to fresh clusters then reads of them, on a fresh pair each run;
    // RUNS runs alternating between the servers, each figure the median with its spread.
    const iops: Record<'ubdcow' | 'qemu', { write: number[]; read: number[] }> = { ubdcow: { write: [], read: [] }, qemu: { write: [], read: [] } };
    for (let run = 0; run < RUNS; run++) {
      for (const tool of run % 2 === 0 ? (['ubdcow', 'qemu'] as const) : (['qemu', 'ubdcow'] as const)) {
        const { cow, overlay } = freshPair(dir, base);
        const server = tool === 'ubdcow' ? await ubdcowServe(cow, sock) : await qemuNbd(overlay, sock);
        try {
          iops[tool].write.push(qemuBench(server.uri, true));
          // Reads of the clusters just written: one warm-up run (the server's JIT; qemu-nbd needs
          // none, and gets the same), then the measured one.
          qemuBench(server.uri, false);
          iops[tool].read.push(qemuBench(server.uri, false));
        } finally {
          await server.stop();
        }
      }
    }
    const k = (x: number) => `${(x / 1000).toFixed(1)}K`;
    const spread = (values: number[]) => `${k(median(values))} IOPS (${k(Math.min(...values))}-${k(Math.max(...values))})`;
    const perRun = (kind: 'write' | 'read') => iops.ubdcow[kind].map((x, i) => (x / iops.qemu[kind][i]!).toFixed(2)).join(' ');
    for (const [kind, label, target] of [['write', 'writes', '>= 1.0x'], ['read', 'reads', '>= 0.9x']] as const) {
      const ratio = median(iops.ubdcow[kind]) / median(iops.qemu[kind]);
      rows.push([`qemu-img bench 4 KiB QD 32 ${label}`, spread(iops.ubdcow[kind]), spread(iops.qemu[kind]), `${ratio.toFixed(2)}x (runs: ${perRun(kind)})`, target]);
    }

    // 2. nbdcopy of the whole export to null:, both servers up at once, runs alternating, median.
    const copy: Record<string, number> = {};
    {
      const { cow, overlay } = freshPair(dir, base);
      const ubdcowServer = await ubdcowServe(cow, `${sock}.u`);
      const qemuServer = await qemuNbd(overlay, `${sock}.q`);
      const seconds: Record<string, number[]> = { ubdcow: [], qemu: [] };
      try {
        for (let run = 0; run < COPY_RUNS; run++) {
          seconds.ubdcow.push(timed('nbdcopy', [ubdcowServer.uri, 'null:']));
          seconds.qemu.push(timed('nbdcopy', [qemuServer.uri, 'null:']));
        }
      } finally {
        await ubdcowServer.stop();
        await qemuServer.stop();
      }
      for (const tool of ['ubdcow', 'qemu'] as const) copy[tool] = EXPORT_BYTES / MiB / median(seconds[tool]);
      console.log(`nbdcopy seconds: ubdcow ${seconds.ubdcow.map((x) => x.toFixed(2)).join(' ')}; qemu-nbd ${seconds.qemu.map((x) => x.toFixed(2)).join(' ')}`);
    }
    rows.push([`nbdcopy ${EXPORT_BYTES / MiB} MiB to null:`, `${copy.ubdcow.toFixed(0)} MiB/s`, `${copy.qemu.toFixed(0)} MiB/s`, `${(copy.ubdcow / copy.qemu).toFixed(2)}x`, '>= 0.8x']);

    // 3. convert -O qcow2 of a COW (8% rewritten) vs qemu-img convert of the merged raw: once with
    // the rewrites in 64 KiB pieces, once as 4 KiB pages scattered every 48 KiB (tens of thousands
    // of extents, the shape `commit`'s benchmark uses).
    const smallBase = path.join(dir, 'small-base.img');
    makeBase(smallBase, CONVERT_BYTES);
    for (const piece of [STEP, 4096]) {
      const cow = path.join(dir, `convert-${piece}.cow`);
      must(process.execPath, [cliPath, 'create', cow, smallBase]);
      const server = await ubdcowServe(cow, sock);
      try {
        const writes = Math.round((CONVERT_BYTES * 0.08) / piece);
        must('qemu-img', ['bench', '-f', 'raw', '-w', '-c', String(writes), '-d', '32', '-s', String(piece), '-S', String(Math.floor(CONVERT_BYTES / writes / piece) * piece), '--pattern=7', server.uri]);
      } finally {
        await server.stop();
      }
      const merged = path.join(dir, 'merged.raw');
      must('sh', ['-c', `"${process.execPath}" "${cliPath}" cat "${cow}" > "${merged}"`]);
      const outs = [path.join(dir, 'u.qcow2'), path.join(dir, 'q.qcow2')];
      outs.forEach((f) => fs.rmSync(f, { force: true }));
      const ubdcowSeconds = timed(process.execPath, [cliPath, 'convert', cow, outs[0], '-O', 'qcow2']);
      const qemuSeconds = timed('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', merged, outs[1]]);
      must('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', outs[0], outs[1]]);
      const shape = piece === STEP ? `${piece / 1024} KiB pieces` : `${piece / 1024} KiB pages`;
      rows.push([`convert -O qcow2, ${CONVERT_BYTES / MiB} MiB COW, ${shape}`, `${ubdcowSeconds.toFixed(2)} s`, `${qemuSeconds.toFixed(2)} s`, `${(ubdcowSeconds / qemuSeconds).toFixed(2)}x time`, '<= 1.3x']);
      outs.forEach((f) => fs.rmSync(f, { force: true }));
      fs.rmSync(merged, { force: true });
    }
    console.log(`\n${table(rows)}\n`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`bench/nbd.ts: ${(err as Error).message}`);
  process.exitCode = 1;
});
