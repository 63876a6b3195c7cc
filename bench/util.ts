/* Helpers for the benchmarks: timing, machine description, tables. Fixtures live in test/helpers/. */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { hasTool, repoRoot } from '../test/helpers/tools.js';

export { hasTool, repoRoot };
export const cliPath = path.join(repoRoot, 'dist', 'cli', 'main.js');

export interface Measurement {
  seconds: number;
  /** Peak resident set size of the child, KiB. */
  maxRssKiB: number;
  /** User + system CPU seconds of the child (GNU time; NaN without it). */
  cpuSeconds: number;
  status: number | null;
  stdout: string;
  stderr: string;
}

const hasGnuTime = fs.existsSync('/usr/bin/time');

/**
 * Runs a program in a child process and measures its wall time and peak RSS, with GNU time -v
 * when it is installed (it reports the child's own maximum resident set size).
 */
export function measure(program: string, args: string[], options: { cwd?: string } = {}): Promise<Measurement> {
  const argv = hasGnuTime ? ['/usr/bin/time', ['-v', program, ...args]] : [program, args];
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(argv[0] as string, argv[1] as string[], { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => {
      if (stdout.length < 1 << 20) stdout += text;
    });
    child.stderr.setEncoding('utf8').on('data', (text: string) => {
      stderr += text;
    });
    child.on('error', reject);
    child.on('close', (status) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      const user = /User time \(seconds\): ([\d.]+)/.exec(stderr);
      const system = /System time \(seconds\): ([\d.]+)/.exec(stderr);
      resolve({
        // Our clock (ns) rather than GNU time's (10 ms steps); it includes starting the child.
        seconds,
        maxRssKiB: rss ? Number(rss[1]) : NaN,
        cpuSeconds: user && system ? Number(user[1]) + Number(system[1]) : NaN,
        status,
        stdout,
        stderr: hasGnuTime ? stderr.replace(/(Command exited with non-zero status \d+\n)?\tCommand being timed:[\s\S]*$/, '').trim() : stderr,
      });
    });
  });
}

/**
 * Runs the compiled CLI (bin/ubdcow -> dist/) in a child process under `measure`. Without GNU
 * time the child reports its own peak RSS (process.resourceUsage) on stderr as it exits.
 */
export async function measureCli(args: string[], options: { cwd?: string } = {}): Promise<Measurement> {
  if (hasGnuTime) return measure(process.execPath, [path.join(repoRoot, 'bin', 'ubdcow'), ...args], options);
  const script =
    `process.on('exit', () => process.stderr.write('\\nmaxRSS=' + process.resourceUsage().maxRSS + '\\n'));` +
    `import(${JSON.stringify(cliPath)}).then((cli) => cli.main(process.argv.slice(1)));`;
  const result = await measure(process.execPath, ['-e', script, ...args], options);
  const rss = /\nmaxRSS=(\d+)\n$/.exec(result.stderr);
  return { ...result, maxRssKiB: rss ? Number(rss[1]) : NaN, stderr: result.stderr.replace(/\nmaxRSS=\d+\n$/, '') };
}

/** Builds dist/ as `npm run build` does: tsc, then the CLI bundle that bin/ubdcow runs. */
export function ensureBuilt(): void {
  const result = spawnSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: repoRoot, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`build failed:\n${result.stdout}${result.stderr}`);
  const bundled = spawnSync(process.execPath, ['scripts/bundle-cli.mjs'], { cwd: repoRoot, encoding: 'utf8' });
  if (bundled.status !== 0) throw new Error(`bundling the CLI failed:\n${bundled.stdout}${bundled.stderr}`);
}

export interface Machine {
  cpu: string;
  cores: number;
  node: string;
  os: string;
  memory: string;
}

export function describeMachine(): Machine {
  let cpu = os.cpus()[0]?.model ?? 'unknown';
  try {
    const info = fs.readFileSync('/proc/cpuinfo', 'utf8');
    cpu = /^model name\s*:\s*(.+)$/m.exec(info)?.[1]?.trim() ?? cpu;
  } catch {
    // Not Linux: os.cpus() it is.
  }
  return {
    cpu,
    cores: os.availableParallelism(),
    node: process.version,
    os: `${os.type()} ${os.release()}`,
    memory: `${Math.round(os.totalmem() / 2 ** 30)} GiB`,
  };
}

/** Columns padded to line up; the first row is the heading. */
export function table(rows: string[][]): string {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => (row[column] ?? '').length)));
  const line = (row: string[]) => row.map((cell, column) => cell.padEnd(widths[column])).join('  ').trimEnd();
  return [line(rows[0]), line(widths.map((width) => '-'.repeat(width))), ...rows.slice(1).map(line)].join('\n');
}

export function seconds(value: number): string {
  return value < 10 ? `${value.toFixed(3)} s` : `${value.toFixed(1)} s`;
}

export function mebibytes(kib: number): string {
  return Number.isNaN(kib) ? 'n/a' : `${(kib / 1024).toFixed(0)} MiB`;
}
