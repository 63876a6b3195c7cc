/**
 * `ubdcow customize` benchmarks (issue 21), the compiled CLI in a child process, Node start-up
 * included:
 *  (a) mkdir + upload of 3 MB + write + append-line + chmod + link + delete + move on a COW over a
 *      256 MiB ext4 base (target: 1 s);
 *  (b) --copy-in of a 10,000-file tree holding 100 MB into a COW over a 1 GiB ext4 base (target: 5 s);
 * and, when virt-customize is installed, the same operations with it on a raw copy of the base
 * (LIBGUESTFS_BACKEND=direct, force_tcg: a qemu appliance without KVM).
 *
 * Run: npx tsx bench/customize.ts [--quick] [--runs N]
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createCow } from '../src/commands/create.js';
import { type Measurement, describeMachine, ensureBuilt, hasTool, measure, mebibytes, repoRoot, seconds, table } from './util.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const runs = args.includes('--runs') ? Number(args[args.indexOf('--runs') + 1]) : 3;
const TREE_FILES = quick ? 1000 : 10_000;
const TREE_BYTES = quick ? 10 << 20 : 100 << 20;

function sh(program: string, argv: string[]): void {
  const result = spawnSync(program, argv, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${program} ${argv.join(' ')} exited ${result.status}: ${result.stderr}`);
}

function buildTree(dir: string): void {
  const perFile = Math.floor(TREE_BYTES / TREE_FILES);
  for (let i = 0; i < TREE_FILES; i++) {
    const sub = path.join(dir, `d${Math.floor(i / 1000)}`, `s${Math.floor(i / 100)}`);
    if (i % 100 === 0) fs.mkdirSync(sub, { recursive: true });
    fs.writeFileSync(path.join(sub, `f${i}.dat`), Buffer.alloc(perFile, i & 0xff));
  }
}

/** User + system CPU seconds a child reported through an inner `/usr/bin/time -f 'cpu %U %S'`. */
function cpuSeconds(m: Measurement): string {
  const match = /cpu (\d+\.\d+) (\d+\.\d+)/.exec(m.stderr);
  return match ? `${(Number(match[1]) + Number(match[2])).toFixed(2)} s` : 'n/a';
}

/** Runs `program` under `/usr/bin/time -f 'cpu %U %S'` (for cpuSeconds) when GNU time is there. */
function timed(program: string, argv: string[]): Promise<Measurement> {
  return fs.existsSync('/usr/bin/time') ? measure('/usr/bin/time', ['-f', 'cpu %U %S', program, ...argv]) : measure(program, argv);
}

async function best(label: string, prepare: () => Promise<void> | void, run: () => Promise<Measurement>): Promise<Measurement> {
  let chosen: Measurement | undefined;
  for (let i = 0; i < runs; i++) {
    await prepare();
    const m = await run();
    if (m.status !== 0) throw new Error(`${label}: exit ${m.status}: ${m.stderr}`);
    if (!chosen || m.seconds < chosen.seconds) chosen = m;
  }
  return chosen!;
}

async function main(): Promise<void> {
  ensureBuilt();
  for (const tool of ['mke2fs']) {
    if (!hasTool(tool)) {
      console.log(`bench/customize.ts: ${tool} is not installed: skipped.`);
      return;
    }
  }
  const machine = describeMachine();
  console.log(`${machine.cpu} (${machine.cores} cores), Node ${process.version}, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}${quick ? ', --quick' : ''}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-bench-customize-'));
  try {
    // Enough of a Debian for virt-customize's inspection to accept the image as a guest.
    for (const sub of ['root/etc', 'root/bin', 'root/usr/bin', 'root/lib', 'root/tmp']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
    fs.writeFileSync(path.join(dir, 'root/etc/os-release'), 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n');
    fs.writeFileSync(path.join(dir, 'root/etc/debian_version'), '12.0\n');
    fs.writeFileSync(path.join(dir, 'root/etc/fstab'), '/dev/sda / ext4 defaults 0 1\n');
    fs.writeFileSync(path.join(dir, 'root/etc/hosts'), '127.0.0.1 localhost\n');
    fs.writeFileSync(path.join(dir, 'root/etc/motd'), 'hello\n');
    fs.writeFileSync(path.join(dir, 'root/etc/old.conf'), 'old\n');
    fs.writeFileSync(path.join(dir, 'root/etc/gone'), 'gone\n');
    const small = path.join(dir, 'small.img');
    const large = path.join(dir, 'large.img');
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', path.join(dir, 'root'), small, '256M']);
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', path.join(dir, 'root'), large, '1G']);
    const payload = path.join(dir, 'payload.bin');
    fs.writeFileSync(payload, Buffer.alloc(3 << 20, 0x5a));
    const tree = path.join(dir, 'tree');
    buildTree(tree);
    const ops = ['--mkdir', '/srv/app', '--upload', `${payload}:/srv/app/payload.bin`, '--write', '/etc/app.conf:port=8080', '--append-line', '/etc/motd:welcome', '--chmod', '0600:/etc/app.conf', '--link', '/srv/app/payload.bin:/srv/link', '--delete', '/etc/gone', '--move', '/etc/old.conf:/etc/new.conf'];
    const cow = path.join(dir, 'vm.cow');
    const fresh = (base: string) => async () => {
      fs.rmSync(cow, { force: true });
      await createCow(cow, base);
    };
    const rows: string[][] = [['what', 'time', 'CPU (user+sys)', 'peak RSS', 'target']];
    const cli = path.join(repoRoot, 'bin', 'ubdcow');
    const a = await best('workflow', fresh(small), () => timed(process.execPath, [cli, 'customize', cow, '-q', ...ops]));
    rows.push(['(a) 8 operations incl. a 3 MB upload, 256 MiB COW', seconds(a.seconds), cpuSeconds(a), mebibytes(a.maxRssKiB), `≤ 1 s: ${a.seconds <= 1 ? 'met' : 'NOT met'}`]);
    console.log(rows.at(-1)!.join('  '));
    const b = await best('copy-in', fresh(large), () => timed(process.execPath, [cli, 'customize', cow, '-q', '--copy-in', `${tree}:/`]));
    rows.push([`(b) --copy-in of ${TREE_FILES} files, ${TREE_BYTES >> 20} MB`, seconds(b.seconds), cpuSeconds(b), mebibytes(b.maxRssKiB), `≤ 5 s: ${b.seconds <= 5 ? 'met' : 'NOT met'}`]);
    console.log(rows.at(-1)!.join('  '));
    if (hasTool('virt-customize')) {
      const env = { ...process.env, LIBGUESTFS_BACKEND: 'direct', LIBGUESTFS_BACKEND_SETTINGS: 'force_tcg' };
      const raw = path.join(dir, 'raw.img');
      const virt = (extra: string[]) => () => withEnv(env, () => timed('virt-customize', ['-q', '--format', 'raw', '-a', raw, '--no-network', ...extra]));
      const v1 = await best('virt-customize workflow', () => fs.copyFileSync(small, raw), virt(ops));
      rows.push(['virt-customize, the same 8 operations (raw copy, TCG)', seconds(v1.seconds), cpuSeconds(v1), mebibytes(v1.maxRssKiB), `ubdcow ${(v1.seconds / a.seconds).toFixed(1)}x faster`]);
      const v2 = await best('virt-customize copy-in', () => fs.copyFileSync(large, raw), virt(['--copy-in', `${tree}:/`]));
      rows.push([`virt-customize --copy-in of the same tree`, seconds(v2.seconds), cpuSeconds(v2), mebibytes(v2.maxRssKiB), `ubdcow ${(v2.seconds / b.seconds).toFixed(1)}x faster`]);
    } else {
      rows.push(['virt-customize', 'not installed', '', '', '']);
    }
    console.log(`best of ${runs}\n\n${table(rows)}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs `use` with the process environment `env` (the child inherits it). */
async function withEnv<T>(env: NodeJS.ProcessEnv, use: () => Promise<T>): Promise<T> {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    return await use();
  } finally {
    for (const key of Object.keys(process.env)) if (!(key in saved)) delete process.env[key];
    Object.assign(process.env, saved);
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
