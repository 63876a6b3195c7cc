/**
 * Guest-file benchmarks (issue 11), the compiled CLI in a child process:
 *  (a) `ubdcow diff --files` of a COW over a 2 GiB ext4 base holding 20,000 files, in which the
 *      Linux ext4 driver changed 200 files (budget: 2 s and 250 MiB peak RSS), against the full
 *      walk (`--deep`: every inode and every file's bytes on both sides) and a tree walk of both
 *      file systems reading every inode (`ls -R` of each);
 *  (b) `ubdcow get` of a 100 MiB guest file (target: at least 200 MiB/s);
 *  (c) issue 18's walk and copy rows (`--walk-only` runs just these): `ls -R --json` of a tree of
 *      20,000 files and 5,000 symlinks against `find -printf` on a loop mount of the same image
 *      (target: at most 2x), `ls -R` of chains 100/200/400 directories deep (linear), `get` of a
 *      200 MiB file (target 200 MiB/s), and `get -o` of a 5 GiB sparse file against `get > file`.
 *      Medians of 5 runs, ubdcow and its peer alternating.
 *
 * The changes are made by the kernel: the base is copied, the copy loop-mounted read-write and
 * changed, and the COW then holds exactly the sectors that differ (written through the engine),
 * which is what a guest on the COW would have left. Without root or loop devices the copy is
 * changed with debugfs -w instead (said in the output).
 *
 * Run: npx tsx bench/guestfs.ts [--quick] [--runs N] [--walk-only]
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createCow } from '../src/commands/create.js';
import { openCow } from '../src/io/engine/engine.js';
import { type Measurement, describeMachine, ensureBuilt, hasTool, measure, measureCli, mebibytes, repoRoot, seconds, table } from './util.js';
import { seededRandom } from '../test/helpers/cow-writes.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const runs = args.includes('--runs') ? Number(args[args.indexOf('--runs') + 1]) : 3;

const MIB = 2 ** 20;
const FILES = quick ? 2000 : 20_000;
const CHANGED = quick ? 20 : 200;
const BIG_MIB = quick ? 16 : 100;
const DISK = quick ? '256M' : '2G';
const TIME_BUDGET_S = 2;
const RSS_BUDGET_MIB = 250;
const GET_TARGET_MIBS = 200;

function sh(program: string, argv: string[], what: string): string {
  const result = spawnSync(program, argv, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (result.status !== 0) throw new Error(`${what}: ${program} ${argv.join(' ')} exited ${result.status}: ${result.stderr}`);
  return result.stdout;
}

function buildTree(dir: string): string[] {
  const random = seededRandom(11);
  const files: string[] = [];
  const dirs = Math.ceil(FILES / 100);
  for (let d = 0; d < dirs; d++) {
    const sub = path.join(dir, `d${Math.floor(d / 20)}`, `s${d}`);
    fs.mkdirSync(sub, { recursive: true });
    for (let f = 0; f < 100 && files.length < FILES; f++) {
      const bytes = Buffer.alloc(256 + Math.floor(random() * 8000), `file ${d}/${f} `);
      const rel = path.relative(dir, path.join(sub, `f${f}.txt`));
      fs.writeFileSync(path.join(dir, rel), bytes);
      files.push(rel);
    }
  }
  const big = Buffer.alloc(BIG_MIB * MIB);
  for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(path.join(dir, 'big.bin'), big);
  return files;
}

/** Which files to change and how: appends, rewrites, deletes, and new files next to them. */
function plan(files: string[]): Array<{ kind: 'append' | 'rewrite' | 'delete' | 'create'; rel: string }> {
  const random = seededRandom(7);
  const picked = new Set<string>();
  while (picked.size < CHANGED) picked.add(files[Math.floor(random() * files.length)]!);
  return [...picked].map((rel, i) => {
    const kind = (['append', 'append', 'rewrite', 'delete', 'create'] as const)[i % 5]!;
    return { kind, rel: kind === 'create' ? rel.replace(/\.txt$/, '.new') : rel };
  });
}

function changeMounted(mount: string, steps: ReturnType<typeof plan>): void {
  for (const { kind, rel } of steps) {
    const file = path.join(mount, rel);
    if (kind === 'append') fs.appendFileSync(file, 'appended by the bench\n');
    else if (kind === 'rewrite') fs.writeFileSync(file, 'rewritten by the bench\n');
    else if (kind === 'delete') fs.unlinkSync(file);
    else fs.writeFileSync(file, 'created by the bench\n');
  }
}

function changeWithDebugfs(image: string, scratch: string, steps: ReturnType<typeof plan>): void {
  const content = path.join(scratch, 'content');
  fs.writeFileSync(content, 'written by the bench through debugfs\n');
  const lines: string[] = [];
  for (const { kind, rel } of steps) {
    if (kind === 'delete') lines.push(`rm /${rel}`);
    else if (kind === 'create') lines.push(`write ${content} /${rel}`);
    else lines.push(`rm /${rel}`, `write ${content} /${rel}`);
  }
  const script = path.join(scratch, 'changes.debugfs');
  fs.writeFileSync(script, `${lines.join('\n')}\n`);
  sh('debugfs', ['-w', '-f', script, image], 'debugfs changes');
}

/** Writes into the COW every 512-byte sector where `changed` differs from `base`. */
async function cowFromDifference(base: string, changed: string, cow: string): Promise<number> {
  await createCow(cow, base);
  const device = await openCow(cow);
  const a = fs.openSync(base, 'r');
  const b = fs.openSync(changed, 'r');
  const size = fs.fstatSync(a).size;
  const chunk = 4 * MIB;
  const x = Buffer.alloc(chunk);
  const y = Buffer.alloc(chunk);
  let sectors = 0;
  try {
    for (let at = 0; at < size; at += chunk) {
      const n = fs.readSync(a, x, 0, chunk, at);
      fs.readSync(b, y, 0, n, at);
      if (x.compare(y, 0, n, 0, n) === 0) continue;
      for (let s = 0; s < n; s += 512) {
        if (x.compare(y, s, s + 512, s, s + 512) !== 0) {
          await device.write(at + s, Buffer.from(y.subarray(s, s + 512)));
          sectors++;
        }
      }
    }
  } finally {
    fs.closeSync(a);
    fs.closeSync(b);
    await device.close();
  }
  return sectors;
}

async function best(argv: string[], okCodes: number[]): Promise<Measurement> {
  let fastest: Measurement | undefined;
  for (let i = 0; i < runs; i++) {
    const m = await measureCli(argv);
    if (m.status === null || !okCodes.includes(m.status)) throw new Error(`ubdcow ${argv.join(' ')} exited ${m.status}: ${m.stderr}`);
    if (!fastest || m.seconds < fastest.seconds) fastest = m;
  }
  return fastest!;
}

/** Median seconds of `runs` runs of each command, the commands alternating run by run. */
async function alternating(commands: Array<{ program: string; args: string[] }>, count = 5): Promise<Measurement[]> {
  const times: Measurement[][] = commands.map(() => []);
  for (let i = 0; i < count; i++) {
    for (const [j, { program, args: argv }] of commands.entries()) {
      const m = await measure(program, argv);
      if (m.status !== 0) throw new Error(`${program} ${argv.join(' ')} exited ${m.status}: ${m.stderr}`);
      times[j]!.push(m);
    }
  }
  return times.map((list) => [...list].sort((x, y) => x.seconds - y.seconds)[Math.floor(list.length / 2)]!);
}

const ubdcowTo = (output: string, ...argv: string[]) => ({
  program: 'sh',
  args: ['-c', `exec "$0" "$@" > ${output}`, process.execPath, path.join(repoRoot, 'bin', 'ubdcow'), ...argv],
});

/** Issue 18's rows: walk speed against find, depth linearity, get's rate, sparse get -o. */
async function walkRows(dir: string): Promise<string[][]> {
  const tree = path.join(dir, 'walk-tree');
  const FILES = 20_000;
  const LINKS = 5_000;
  for (let i = 0; i < FILES; i++) {
    const sub = path.join(tree, `d${i % 20}`, `s${i % 400}`);
    if (i < 400) fs.mkdirSync(sub, { recursive: true });
    fs.writeFileSync(path.join(sub, `f${i}`), `file ${i}\n`);
  }
  for (let i = 0; i < LINKS; i++) fs.symlinkSync(i % 2 ? `../s${i % 400}/f${i}` : `/usr/lib/some/long/target/path/number/${i}/${'x'.repeat(40)}`, path.join(tree, `d${i % 20}`, `s${i % 400}`, `l${i}`));
  const image = path.join(dir, 'walk.img');
  sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, image, '1G'], 'mke2fs');
  fs.rmSync(tree, { recursive: true });
  const rows: string[][] = [];
  const mount = path.join(dir, 'walk-mnt');
  fs.mkdirSync(mount);
  if (process.getuid?.() === 0 && spawnSync('mount', ['-o', 'loop,ro', image, mount]).status === 0) {
    try {
      const [ls, find] = await alternating([ubdcowTo('/dev/null', 'ls', '-R', image, '--json'), { program: 'sh', args: ['-c', `find "$0" -printf '%p %y %m %U %G %s %T@ %l\n' > /dev/null`, mount] }]);
      rows.push([`ls -R --json, ${FILES} files + ${LINKS} symlinks (vs find -printf on a loop mount)`, `${seconds(ls!.seconds)} vs ${seconds(find!.seconds)} (${(ls!.seconds / find!.seconds).toFixed(2)}x)`, mebibytes(ls!.maxRssKiB), '<= 2x find']);
    } finally {
      sh('umount', [mount], 'umount');
    }
  } else {
    const [ls] = await alternating([ubdcowTo('/dev/null', 'ls', '-R', image, '--json')]);
    rows.push([`ls -R --json, ${FILES} files + ${LINKS} symlinks (no loop mount here: find not run)`, seconds(ls!.seconds), mebibytes(ls!.maxRssKiB), '<= 2x find']);
  }
  for (const depth of [100, 200, 400]) {
    const deep = path.join(dir, `deep${depth}`);
    fs.mkdirSync(path.join(deep, ...Array<string>(depth).fill('d')), { recursive: true });
    const deepImage = path.join(dir, `deep${depth}.img`);
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', deep, deepImage, '64M'], 'mke2fs');
    fs.rmSync(deep, { recursive: true });
    const [walk] = await alternating([ubdcowTo('/dev/null', 'ls', '-R', deepImage)]);
    rows.push([`ls -R of a chain ${depth} directories deep`, seconds(walk!.seconds), mebibytes(walk!.maxRssKiB), 'linear in depth']);
  }
  const files = path.join(dir, 'files');
  fs.mkdirSync(files);
  const big = Buffer.alloc(200 * MIB);
  for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(path.join(files, 'big.bin'), big);
  const sparse = fs.openSync(path.join(files, 'sparse.bin'), 'w');
  fs.writeSync(sparse, big, 0, 16 * MIB, 0);
  fs.writeSync(sparse, big, 0, 16 * MIB, 3 * 1024 * MIB);
  fs.ftruncateSync(sparse, 5 * 1024 * MIB);
  fs.closeSync(sparse);
  const filesImage = path.join(dir, 'files.img');
  sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', files, filesImage, '1G'], 'mke2fs');
  fs.rmSync(files, { recursive: true });
  const [get] = await alternating([ubdcowTo('/dev/null', 'get', filesImage, '/big.bin')]);
  rows.push(['get of a 200 MiB file (to /dev/null)', `${seconds(get!.seconds)} (${(200 / get!.seconds).toFixed(0)} MiB/s)`, mebibytes(get!.maxRssKiB), `>= ${GET_TARGET_MIBS} MiB/s`]);
  const out = path.join(dir, 'sparse.out');
  const [toFile, redirected] = await alternating([
    { program: 'sh', args: ['-c', 'rm -f "$3" && exec "$0" "$1" get "$2" /sparse.bin -o "$3"', process.execPath, path.join(repoRoot, 'bin', 'ubdcow'), filesImage, out] },
    ubdcowTo(`"${out}.redirected"`, 'get', filesImage, '/sparse.bin'),
  ]);
  const kept = fs.statSync(out).blocks * 512;
  rows.push(['get -o of a 5 GiB sparse file (32 MiB written) vs get > file', `${seconds(toFile!.seconds)} vs ${seconds(redirected!.seconds)}, ${(kept / MIB).toFixed(0)} MiB on disk`, mebibytes(toFile!.maxRssKiB), 'holes kept']);
  return rows;
}

async function main(): Promise<void> {
  ensureBuilt();
  if (args.includes('--walk-only')) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-guestfs-'));
    try {
      console.log(table([['measurement', 'time (median of 5)', 'peak RSS', 'target'], ...(await walkRows(dir))]));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    return;
  }
  for (const tool of ['mke2fs', 'debugfs']) {
    if (!hasTool(tool)) {
      console.log(`bench/guestfs.ts: ${tool} is not installed: skipped.`);
      return;
    }
  }
  const machine = describeMachine();
  console.log(`${machine.cpu} (${machine.cores} cores), Node ${process.version}${quick ? ', --quick' : ''}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-guestfs-'));
  try {
    const tree = path.join(dir, 'tree');
    let started = Date.now();
    const files = buildTree(tree);
    const base = path.join(dir, 'base.img');
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, base, DISK], 'mke2fs');
    fs.rmSync(tree, { recursive: true });
    console.log(`base: ${DISK} ext4 with ${files.length} files + a ${BIG_MIB} MiB file (${((Date.now() - started) / 1000).toFixed(1)} s to build)`);

    started = Date.now();
    const changed = path.join(dir, 'changed.img');
    sh('cp', ['--sparse=always', base, changed], 'copy');
    const steps = plan(files);
    const mount = path.join(dir, 'mnt');
    fs.mkdirSync(mount);
    let how = 'the Linux ext4 driver (loop mount)';
    const mounted = process.getuid?.() === 0 && spawnSync('mount', ['-o', 'loop', changed, mount]).status === 0;
    if (mounted) {
      try {
        changeMounted(mount, steps);
      } finally {
        sh('umount', [mount], 'umount');
      }
    } else {
      how = 'debugfs -w (no root or loop device here)';
      changeWithDebugfs(changed, dir, steps);
    }
    const cow = path.join(dir, 'vm.cow');
    const sectors = await cowFromDifference(base, changed, cow);
    fs.rmSync(changed);
    console.log(`${steps.length} files changed by ${how}; the COW holds ${sectors} sectors (${((Date.now() - started) / 1000).toFixed(1)} s to prepare)\n`);

    const smart = await best(['diff', '--files', cow, '--json'], [1]);
    const result = JSON.parse(smart.stdout) as { mode: string; changes: Array<{ path: string; type: string }> };
    const fileChanges = result.changes.filter((c) => c.type === 'file').length;
    if (result.mode !== 'smart' || fileChanges !== steps.length) {
      throw new Error(`diff --files found ${fileChanges} changed files (mode ${result.mode}), expected ${steps.length}`);
    }
    const deep = await best(['diff', '--files', '--deep', cow, '--json'], [1]);
    if (deep.stdout !== smart.stdout.replace('"mode": "smart"', '"mode": "full"')) throw new Error('diff --files --deep disagrees with the smart path');
    const walkCow = await best(['ls', '-R', cow, '--json'], [0]);
    const walkBase = await best(['ls', '-R', base, '--json'], [0]);
    // To /dev/null through the shell: a pipe read back by this process would time the reader.
    let getBig: Measurement | undefined;
    for (let i = 0; i < runs; i++) {
      const m = await measure('sh', ['-c', 'exec "$0" "$1" get "$2" /big.bin > /dev/null', process.execPath, path.join(repoRoot, 'bin', 'ubdcow'), cow]);
      if (m.status !== 0) throw new Error(`ubdcow get exited ${m.status}: ${m.stderr}`);
      if (!getBig || m.seconds < getBig.seconds) getBig = m;
    }
    const getRate = BIG_MIB / getBig!.seconds;

    const rows = [
      ['measurement', 'time', 'peak RSS', 'target'],
      [`diff --files (smart), ${result.changes.length} paths`, seconds(smart.seconds), mebibytes(smart.maxRssKiB), `<= ${TIME_BUDGET_S} s, <= ${RSS_BUDGET_MIB} MiB`],
      ['diff --files --deep (every file)', seconds(deep.seconds), mebibytes(deep.maxRssKiB), ''],
      ['ls -R of the COW + ls -R of the base (tree walk, every inode)', seconds(walkCow.seconds + walkBase.seconds), mebibytes(Math.max(walkCow.maxRssKiB, walkBase.maxRssKiB)), ''],
      [`get of a ${BIG_MIB} MiB file`, `${seconds(getBig!.seconds)} (${getRate.toFixed(0)} MiB/s)`, mebibytes(getBig!.maxRssKiB), `>= ${GET_TARGET_MIBS} MiB/s`],
    ];
    rows.push(...(await walkRows(dir)));
    console.log(table(rows));
    const timeOk = smart.seconds <= TIME_BUDGET_S && smart.maxRssKiB / 1024 <= RSS_BUDGET_MIB;
    console.log(`\ndiff --files: ${timeOk ? 'within budget' : 'OVER BUDGET'}; ${(deep.seconds / smart.seconds).toFixed(1)}x faster than --deep, ` +
      `${((walkCow.seconds + walkBase.seconds) / smart.seconds).toFixed(1)}x faster than walking both trees`);
    console.log(`get: ${getRate >= GET_TARGET_MIBS ? 'meets' : 'BELOW'} the ${GET_TARGET_MIBS} MiB/s target`);
    if (!quick && (!timeOk || getRate < GET_TARGET_MIBS)) process.exitCode = 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
