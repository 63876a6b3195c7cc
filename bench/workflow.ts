/**
 * Workflow benchmarks, each command run as the compiled CLI in a child process:
 *  (a) start-up (--version), a 2-byte write (budget 0.5 s, 100 MiB), inspect, map and diff of
 *      1 TiB and 10 TiB sparse COWs with 2000 scattered extents (budget: 2 s and 160 MiB peak RSS);
 *  (b) commit of a 512 MiB image with 8% of its 4 KiB blocks rewritten, over a sparse (truncate)
 *      and a random backing, against uml_moo (new
 *      file and in place, outputs checked identical) and against `cp --sparse=always` of the image.
 *
 * Run: npx tsx bench/workflow.ts [--quick] [--only sparse|commit] [--runs N]
 * (--quick shrinks part (b) to 64 MiB for a fast smoke run.)
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createCow } from '../src/commands/create.js';
import {
  type Measurement,
  describeMachine,
  ensureBuilt,
  hasTool,
  measure,
  measureCli,
  mebibytes,
  seconds,
  table,
} from './util.js';
import { type SectorWrite, seededRandom, writeCowSectors, writeRandomFile } from '../test/helpers/cow-writes.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const only = args.includes('--only') ? args[args.indexOf('--only') + 1] : undefined;
// --only xfs runs just the XFS reflink commit.
const runs = args.includes('--runs') ? Number(args[args.indexOf('--runs') + 1]) : 3;

const TIB = 2 ** 40;
const MIB = 2 ** 20;
const SPARSE_EXTENTS = 2000;
const TIME_BUDGET_S = 2;
const RSS_BUDGET_KIB = 160 * 1024;
const COMMIT_IMAGE_BYTES = quick ? 64 * MIB : 512 * MIB;
const REWRITTEN_FRACTION = 0.08;
const BLOCK = 4096;

const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-'));
const cleanUp = () => fs.rmSync(workDir, { recursive: true, force: true });
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/** Runs `measureOnce` `runs` times; time is the median, RSS the maximum seen. */
async function repeat(label: string, measureOnce: () => Promise<Measurement>, expectStatus = [0]): Promise<{ seconds: number; rssKiB: number }> {
  const times: number[] = [];
  let rss = 0;
  for (let i = 0; i < runs; i++) {
    const result = await measureOnce();
    if (!expectStatus.includes(result.status ?? -1)) {
      throw new Error(`${label}: exit status ${result.status}\n${result.stderr}`);
    }
    times.push(result.seconds);
    rss = Math.max(rss, result.maxRssKiB);
  }
  return { seconds: median(times), rssKiB: rss };
}

function syncDisks(): void {
  spawnSync('sync');
}

/** Reads files once so every contender starts from the same (warm) page cache. */
function warm(...files: string[]): void {
  for (const file of files) spawnSync('sh', ['-c', `cat "${file}" > /dev/null`]);
}

function sameContents(a: string, b: string): boolean {
  return spawnSync('cmp', ['-s', a, b]).status === 0;
}

async function sparseBenchmark(tib = 1): Promise<string[][]> {
  const dir = path.join(workDir, `sparse-${tib}t`);
  fs.mkdirSync(dir);
  const backing = path.join(dir, `base-${tib}t.img`);
  fs.closeSync(fs.openSync(backing, 'w'));
  fs.truncateSync(backing, tib * TIB);
  const cow = path.join(dir, `disk-${tib}t.cow`);
  await createCow(cow, backing);
  const random = seededRandom(20240601);
  const sectors = (tib * TIB) / 512;
  const writes: SectorWrite[] = [];
  for (let i = 0; i < SPARSE_EXTENTS; i++) {
    // Extents of 1 to 64 sectors anywhere on the disk, 4 KiB-aligned as guest file systems write.
    const sector = Math.floor((random() * sectors) / 8) * 8;
    const data = new Uint8Array((1 + Math.floor(random() * 64)) * 512);
    randomFillSync(data);
    writes.push({ sector, data });
  }
  writes.sort((a, b) => a.sector - b.sector);
  const built = performance.now();
  await writeCowSectors(cow, writes);
  console.error(`  built a ${tib} TiB COW with ${SPARSE_EXTENTS} extents in ${((performance.now() - built) / 1000).toFixed(1)} s`);
  const rows: string[][] = [[`command (${tib} TiB sparse COW, 2000 extents)`, 'time (median)', 'peak RSS', 'budget', 'verdict']];
  const twoBytes = path.join(dir, 'two-bytes');
  fs.writeFileSync(twoBytes, 'hi');
  const cases: Array<[string, string[], number[]]> = [
    ['ubdcow --version (start-up)', ['--version'], [0]],
    ['ubdcow write (2 bytes, lazy bitmap)', ['write', cow, '--offset', String(Math.floor(tib * TIB * 0.6)), '--file', twoBytes], [0]],
    ['ubdcow inspect --json', ['inspect', cow, '--json'], [0]],
    ['ubdcow map --json', ['map', cow, '--json'], [0]],
    ['ubdcow diff COW (vs backing, allocated sectors only)', ['diff', cow, '--stat'], [1]],
    ['ubdcow diff --allocated', ['diff', cow, '--allocated', '--stat'], [1]],
  ];
  for (const [label, cliArgs, statuses] of cases) {
    const first = await measureCli(cliArgs);
    if (!statuses.includes(first.status ?? -1)) throw new Error(`${label}: exit ${first.status}: ${first.stderr}`);
    if (label.startsWith('ubdcow map')) {
      const extents = JSON.parse(first.stdout).extents.length;
      console.error(`  map found ${extents} merged extents`);
    }
    const { seconds: time, rssKiB } = await repeat(label, () => measureCli(cliArgs), statuses);
    const [timeBudget, rssBudget] = label.startsWith('ubdcow write') ? [0.5, 100 * 1024] : [TIME_BUDGET_S, RSS_BUDGET_KIB];
    const ok = time <= timeBudget && rssKiB <= rssBudget;
    rows.push([label, seconds(time), mebibytes(rssKiB), `${timeBudget} s, ${rssBudget / 1024} MiB`, ok ? 'ok' : 'OVER BUDGET']);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  return rows;
}

/** `random`: a backing of random bytes (dense); `sparse`: a backing made with truncate (all holes). */
async function commitBenchmark(backingKind: 'random' | 'sparse' = 'random'): Promise<string[][]> {
  const dir = path.join(workDir, `commit-${backingKind}`);
  fs.mkdirSync(dir);
  const backing = path.join(dir, 'base.img');
  if (backingKind === 'sparse') {
    fs.writeFileSync(backing, '');
    fs.truncateSync(backing, COMMIT_IMAGE_BYTES);
  } else {
    writeRandomFile(backing, COMMIT_IMAGE_BYTES);
  }
  const cow = path.join(dir, 'disk.cow');
  await createCow(cow, backing);
  const blocks = COMMIT_IMAGE_BYTES / BLOCK;
  const random = seededRandom(42);
  const chosen = new Set<number>();
  while (chosen.size < Math.round(blocks * REWRITTEN_FRACTION)) chosen.add(Math.floor(random() * blocks));
  const writes = [...chosen].sort((a, b) => a - b).map((block) => ({ sector: (block * BLOCK) / 512, data: randomFillSync(new Uint8Array(BLOCK)) }));
  await writeCowSectors(cow, writes);
  console.error(`  ${formatMiB(COMMIT_IMAGE_BYTES)} image, ${chosen.size} of ${blocks} 4 KiB blocks rewritten (${REWRITTEN_FRACTION * 100}%)`);

  const rows: string[][] = [[`contender (${formatMiB(COMMIT_IMAGE_BYTES)} ${backingKind} backing, 8% of blocks rewritten)`, 'time (median)', 'peak RSS', 'note']];
  const outUbd = path.join(dir, 'out-ubdcow.img');
  const outMoo = path.join(dir, 'out-moo.img');
  const outCp = path.join(dir, 'out-cp.img');
  const fresh = (...files: string[]) => {
    for (const file of files) fs.rmSync(file, { force: true });
    syncDisks();
    warm(backing, cow);
  };

  // New output file: ubdcow commit COW OUT vs uml_moo COW OUT, alternating, same warm cache.
  const newFile = { ubd: [] as number[], moo: [] as number[], mooSynced: [] as number[], ubdRss: 0, mooRss: 0 };
  for (let i = 0; i < runs; i++) {
    fresh(outUbd);
    const ubd = await measureCli(['commit', cow, outUbd]);
    if (ubd.status !== 0) throw new Error(`ubdcow commit: ${ubd.stderr}`);
    newFile.ubd.push(ubd.seconds);
    newFile.ubdRss = Math.max(newFile.ubdRss, ubd.maxRssKiB);
    fresh(outMoo);
    const moo = await measure('uml_moo', [cow, outMoo]);
    if (moo.status !== 0) throw new Error(`uml_moo: ${moo.stderr}`);
    newFile.moo.push(moo.seconds);
    newFile.mooRss = Math.max(newFile.mooRss, moo.maxRssKiB);
    if (!sameContents(outUbd, outMoo)) throw new Error('ubdcow commit and uml_moo wrote different images');
    // ubdcow fsyncs what it wrote before it exits; uml_moo does not. Durable against durable:
    fresh(outMoo);
    const mooSynced = await measure('sh', ['-c', 'uml_moo "$1" "$2" && sync "$2"', 'sh', cow, outMoo]);
    if (mooSynced.status !== 0) throw new Error(`uml_moo + sync: ${mooSynced.stderr}`);
    newFile.mooSynced.push(mooSynced.seconds);
  }
  // The spread behind the medians: each run's times and its ratio (uml_moo / ubdcow).
  const perRun = (list: number[]) => list.map((x) => x.toFixed(3)).join(' ');
  console.error(`  commit COW OUT (${backingKind} backing) per run: ubdcow ${perRun(newFile.ubd)} s; uml_moo ${perRun(newFile.moo)} s; ratio ${newFile.ubd.map((x, i) => (newFile.moo[i]! / x).toFixed(2)).join(' ')}; ratio of medians ${(median(newFile.moo) / median(newFile.ubd)).toFixed(2)}x`);
  const identical = 'output identical to uml_moo (cmp)';
  rows.push(['ubdcow commit COW OUT', seconds(median(newFile.ubd)), mebibytes(newFile.ubdRss), identical]);
  rows.push(['uml_moo COW OUT', seconds(median(newFile.moo)), mebibytes(newFile.mooRss), 'no fsync: data may still be in the page cache']);
  rows.push(['uml_moo COW OUT && sync OUT', seconds(median(newFile.mooSynced)), '', 'durable, as ubdcow commit is']);
  const usage = (file: string) => Math.round((fs.statSync(file).blocks * 512) / MIB);
  console.error(`  outputs: ubdcow ${usage(outUbd)} MiB on disk, uml_moo ${usage(outMoo)} MiB on disk`);
  fresh(outUbd, outMoo);

  const copyTimes: number[] = [];
  let copyRss = 0;
  for (let i = 0; i < runs; i++) {
    fresh(outCp);
    const copy = await measure('cp', ['--sparse=always', backing, outCp]);
    if (copy.status !== 0) throw new Error(`cp: ${copy.stderr}`);
    copyTimes.push(copy.seconds);
    copyRss = Math.max(copyRss, copy.maxRssKiB);
  }
  rows.push(['cp --sparse=always IMAGE OUT (copy limit)', seconds(median(copyTimes)), mebibytes(copyRss), 'copies the backing image only; no fsync']);
  fresh(outCp);

  // The least any durable copy of these bytes can take here: straight to the disk, then fsync.
  const floorTimes: number[] = [];
  for (let i = 0; i < runs; i++) {
    fresh(outCp);
    const copy = await measure('dd', [`if=${backing}`, `of=${outCp}`, 'bs=4M', 'oflag=direct', 'conv=fsync', 'status=none']);
    if (copy.status !== 0) throw new Error(`dd: ${copy.stderr}`);
    floorTimes.push(copy.seconds);
  }
  rows.push(['dd bs=4M oflag=direct conv=fsync (durable-write floor)', seconds(median(floorTimes)), '', 'the same bytes, straight to disk, synced']);
  fresh(outCp);

  // In place, on copies of the backing and COW (each contender gets its own pair every run).
  const inPlace = { ubd: [] as number[], moo: [] as number[], mooSynced: [] as number[], emptied: [] as number[], ubdRss: 0, mooRss: 0 };
  const pair = (name: string) => {
    const b = path.join(dir, `${name}-base.img`);
    const c = path.join(dir, `${name}.cow`);
    spawnSync('cp', ['--sparse=always', '--preserve=timestamps', backing, b]);
    spawnSync('cp', ['--sparse=always', cow, c]);
    return { b, c };
  };
  for (let i = 0; i < runs; i++) {
    const u = pair('ubd');
    const m = pair('moo');
    syncDisks();
    warm(u.b, u.c, m.b, m.c);
    const ubd = await measureCli(['commit', u.c, '--backing', u.b, '-d']);
    if (ubd.status !== 0) throw new Error(`ubdcow commit in place: ${ubd.stderr}`);
    inPlace.ubd.push(ubd.seconds);
    inPlace.ubdRss = Math.max(inPlace.ubdRss, ubd.maxRssKiB);
    const moo = await measure('uml_moo', ['-d', '-b', m.b, m.c]);
    if (moo.status !== 0) throw new Error(`uml_moo -d -b: ${moo.stderr}`);
    inPlace.moo.push(moo.seconds);
    inPlace.mooRss = Math.max(inPlace.mooRss, moo.maxRssKiB);
    if (!sameContents(u.b, m.b)) throw new Error('in-place commits by ubdcow and uml_moo -d left different backing files');
    for (const file of [u.b, u.c, m.b, m.c]) fs.rmSync(file, { force: true });
    const s = pair('moo-sync');
    syncDisks();
    warm(s.b, s.c);
    const mooSynced = await measure('sh', ['-c', 'uml_moo -d -b "$1" "$2" && sync "$1"', 'sh', s.b, s.c]);
    if (mooSynced.status !== 0) throw new Error(`uml_moo -d + sync: ${mooSynced.stderr}`);
    inPlace.mooSynced.push(mooSynced.seconds);
    for (const file of [s.b, s.c]) fs.rmSync(file, { force: true });
    const e = pair('empty');
    syncDisks();
    warm(e.b, e.c);
    const emptied = await measureCli(['commit', e.c, '--backing', e.b]);
    if (emptied.status !== 0) throw new Error(`ubdcow commit in place, emptying: ${emptied.stderr}`);
    inPlace.emptied.push(emptied.seconds);
    for (const file of [e.b, e.c]) fs.rmSync(file, { force: true });
  }
  rows.push(['ubdcow commit -d COW (in place)', seconds(median(inPlace.ubd)), mebibytes(inPlace.ubdRss), 'merged backing identical to uml_moo -d']);
  rows.push(['uml_moo -d COW (in place)', seconds(median(inPlace.moo)), mebibytes(inPlace.mooRss), 'no fsync']);
  rows.push(['uml_moo -d COW && sync BACKING', seconds(median(inPlace.mooSynced)), '', 'durable, as ubdcow commit is']);
  rows.push(['ubdcow commit COW (in place, then empties the COW)', seconds(median(inPlace.emptied)), '', 'the default: bitmap cleared, data area freed']);

  const startup = await repeat('ubdcow --version', () => measureCli(['--version']));
  rows.push(['ubdcow --version (node start-up, for scale)', seconds(startup.seconds), mebibytes(startup.rssKiB), '']);
  ratios.push(`commit to a new file (${backingKind} backing): ${comparison(median(newFile.ubd), median(newFile.moo), 'uml_moo')}`);
  ratios.push(`commit to a new file (${backingKind} backing): ${comparison(median(newFile.ubd), median(newFile.mooSynced), 'uml_moo followed by sync')}`);
  ratios.push(`commit in place: ${comparison(median(inPlace.ubd), median(inPlace.moo), 'uml_moo -d')}`);
  ratios.push(`commit in place: ${comparison(median(inPlace.ubd), median(inPlace.mooSynced), 'uml_moo -d followed by sync')}`);
  ratios.push(`commit to a new file takes ${(median(newFile.ubd) / median(copyTimes)).toFixed(1)}x the time of cp --sparse=always of the image`);
  ratios.push(`commit to a new file takes ${(median(newFile.ubd) / median(floorTimes)).toFixed(2)}x the time of the durable-write floor (dd oflag=direct conv=fsync)`);
  const target = median(newFile.moo) / 4;
  ratios.push(
    `the 4x target means ${target.toFixed(3)} s in all; the durable-write floor alone takes ${median(floorTimes).toFixed(3)} s and node start-up ${startup.seconds.toFixed(3)} s`,
  );
  fs.rmSync(dir, { recursive: true, force: true });
  return rows;
}

/**
 * Commit to a new file on a fresh XFS reflink=1 loop mount (root and a loop device needed): the
 * image is a clone of the backing with the COW's extents cloned over it. New space is measured
 * after unmount and mount (XFS keeps CoW reservations until it settles).
 */
async function xfsCommitBenchmark(): Promise<string[][] | string> {
  if (process.getuid?.() !== 0 || !hasTool('mkfs.xfs') || !fs.existsSync('/dev/loop-control')) return 'XFS reflink commit skipped: needs root, mkfs.xfs and a loop device';
  const dir = path.join(workDir, 'xfs');
  const mount = path.join(dir, 'mnt');
  fs.mkdirSync(mount, { recursive: true });
  const image = path.join(dir, 'xfs.img');
  fs.closeSync(fs.openSync(image, 'w'));
  fs.truncateSync(image, 3 * COMMIT_IMAGE_BYTES);
  if (spawnSync('mkfs.xfs', ['-q', '-m', 'reflink=1', image]).status !== 0) return 'XFS reflink commit skipped: mkfs.xfs failed';
  const remount = (mountIt = true) => {
    spawnSync('umount', [mount]);
    if (mountIt && spawnSync('mount', ['-o', 'loop', image, mount]).status !== 0) throw new Error('mount -o loop failed');
  };
  remount();
  try {
    const backing = path.join(mount, 'base.img');
    writeRandomFile(backing, COMMIT_IMAGE_BYTES);
    const cow = path.join(mount, 'disk.cow');
    await createCow(cow, backing);
    const blocks = COMMIT_IMAGE_BYTES / BLOCK;
    const random = seededRandom(42);
    const chosen = new Set<number>();
    while (chosen.size < Math.round(blocks * REWRITTEN_FRACTION)) chosen.add(Math.floor(random() * blocks));
    await writeCowSectors(cow, [...chosen].sort((a, b) => a - b).map((block) => ({ sector: (block * BLOCK) / 512, data: randomFillSync(new Uint8Array(BLOCK)) })));
    const cowData = chosen.size * BLOCK;
    const used = () => {
      const stats = fs.statfsSync(mount);
      return (stats.blocks - stats.bfree) * stats.bsize;
    };
    const ubd: number[] = [];
    const moo: number[] = [];
    let ubdSpace = 0;
    let mooSpace = 0;
    const out = path.join(mount, 'out.img');
    for (let i = 0; i < runs; i++) {
      fs.rmSync(out, { force: true });
      remount();
      let before = used();
      const ours = await measureCli(['commit', cow, out]);
      if (ours.status !== 0) throw new Error(`ubdcow commit on XFS: ${ours.stderr}`);
      ubd.push(ours.seconds);
      remount();
      ubdSpace = used() - before;
      const kept = path.join(mount, 'ours.img');
      fs.renameSync(out, kept);
      remount();
      before = used();
      const theirs = await measure('sh', ['-c', 'uml_moo "$1" "$2" && sync "$2"', 'sh', cow, out]);
      if (theirs.status !== 0) throw new Error(`uml_moo on XFS: ${theirs.stderr}`);
      moo.push(theirs.seconds);
      remount();
      mooSpace = used() - before;
      if (!sameContents(kept, out)) throw new Error('ubdcow commit and uml_moo wrote different images on XFS');
      fs.rmSync(kept);
    }
    ratios.push(`commit to a new file on XFS reflink=1: ${comparison(median(ubd), median(moo), 'uml_moo followed by sync')}; new space ${(ubdSpace / cowData).toFixed(2)}x the COW's data (target 1.5x)`);
    return [
      [`contender (${formatMiB(COMMIT_IMAGE_BYTES)} random backing on XFS reflink=1, 8%)`, 'time (median)', 'new space (settled)', 'note'],
      ['ubdcow commit COW OUT', seconds(median(ubd)), formatMiB(Math.round(ubdSpace / MIB * 10) / 10 * MIB), `COW data ${formatMiB(Math.round(cowData / MIB * 10) / 10 * MIB)}; output identical to uml_moo`],
      ['uml_moo COW OUT && sync OUT', seconds(median(moo)), formatMiB(Math.round(mooSpace / MIB * 10) / 10 * MIB), 'a full copy'],
    ];
  } finally {
    remount(false);
  }
}

/** "4.8x faster than X" or "2.0x slower than X". */
function comparison(ours: number, theirs: number, name: string): string {
  return ours <= theirs ? `${(theirs / ours).toFixed(1)}x faster than ${name}` : `${(ours / theirs).toFixed(1)}x slower than ${name}`;
}

function formatMiB(bytes: number): string {
  return `${bytes / MIB} MiB`;
}

const ratios: string[] = [];

async function main(): Promise<void> {
  const machine = describeMachine();
  console.log(`ubdcow workflow benchmarks, ${new Date().toISOString().slice(0, 10)}`);
  console.log(`machine: ${machine.cpu}, ${machine.cores} cores, ${machine.memory} RAM, ${machine.os}, node ${machine.node}`);
  console.log(`runs per measurement: ${runs} (median time, maximum RSS); each command in a child process`);
  console.log(`load average at start: ${os.loadavg().map((load) => load.toFixed(2)).join(' ')}\n`);
  ensureBuilt();
  if (!only || only === 'sparse') {
    for (const tib of quick ? [1] : [1, 10]) {
      console.error(`(a) ${tib} TiB sparse COW`);
      console.log(table(await sparseBenchmark(tib)));
      console.log();
    }
  }
  if (only === 'xfs') {
    console.log(table((await xfsCommitBenchmark()) as string[][]));
    for (const line of ratios) console.log(line);
  }
  if (!only || only === 'commit') {
    if (!hasTool('uml_moo')) {
      console.log('(b) commit benchmark skipped: uml_moo is not installed');
    } else {
      for (const kind of ['sparse', 'random'] as const) {
        console.error(`(b) commit, ${kind} backing`);
        console.log(table(await commitBenchmark(kind)));
        console.log();
      }
      console.error('(c) commit on XFS reflink=1');
      const xfs = await xfsCommitBenchmark();
      console.log(typeof xfs === 'string' ? xfs : table(xfs));
      console.log();
      for (const line of ratios) console.log(line);
    }
  }
}

main()
  .catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  })
  .finally(cleanUp);
