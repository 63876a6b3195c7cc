/**
 * Running the CLI for hostile-input tests: a batch of invocations in one process (cli-batch.ts),
 * or one real `node bin/ubdcow` process (optionally as the unprivileged user `nobody`), and the
 * contract every run is judged by.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BatchResult, BatchRun } from './cli-batch.js';
import { repoRoot } from '../helpers/tools.js';

/** Runs `runs` through the built CLI's main() in one child process. */
export async function runBatch(runs: BatchRun[], workDir: string, timeoutMs = 240_000): Promise<BatchResult[]> {
  const input = path.join(workDir, 'runs.json');
  const output = path.join(workDir, 'results.json');
  fs.writeFileSync(input, JSON.stringify(runs));
  const result = await runProcess(
    process.execPath,
    ['--import', 'tsx', path.join(repoRoot, 'test', 'hostile', 'cli-batch.ts'), input, output],
    { cwd: repoRoot, timeoutMs },
  );
  if (result.status !== 0 || !fs.existsSync(output)) {
    throw new Error(`CLI batch failed (status ${result.status}, signal ${result.signal}): ${result.stderr.slice(0, 2000)}`);
  }
  return JSON.parse(fs.readFileSync(output, 'utf8')) as BatchResult[];
}

export interface ProcessResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stdoutBytes: number;
  stderr: string;
  /** Killed because it did not finish in time. */
  hung: boolean;
  durationMs: number;
}

/** Runs a program to completion (or kills it after `timeoutMs`), collecting its output. */
export function runProcess(
  program: string,
  args: string[],
  options: { cwd?: string; timeoutMs?: number; input?: string } = {},
): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(program, args, { cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    let stdoutBytes = 0;
    let hung = false;
    child.stdout.on('data', (chunk: Buffer) => {
      stdoutBytes += chunk.length;
      if (stdoutBytes <= 1 << 20) stdout.push(chunk);
    });
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.on('error', reject);
    const timer = setTimeout(() => {
      hung = true;
      child.kill('SIGKILL');
    }, options.timeoutMs ?? 20_000);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({
        status,
        signal,
        stdout: Buffer.concat(stdout).toString('utf8'),
        stdoutBytes,
        stderr: Buffer.concat(stderr).toString('utf8'),
        hung,
        durationMs: Math.round(performance.now() - started),
      });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** `node bin/ubdcow ARGV`, as `nobody` when asked (the tests run as root, which ignores permissions). */
export async function runCli(argv: string[], options: { asNobody?: boolean; cwd?: string; timeoutMs?: number } = {}): Promise<BatchResult> {
  const bin = path.join(repoRoot, 'bin', 'ubdcow');
  const [program, args] = options.asNobody
    ? ['setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, bin, ...argv]]
    : [process.execPath, [bin, ...argv]];
  const result = await runProcess(program, args, { cwd: options.cwd ?? repoRoot, timeoutMs: options.timeoutMs });
  return {
    argv,
    exitCode: result.status ?? -1,
    stderr: result.stderr,
    stdout: result.stdout,
    stdoutBytes: result.stdoutBytes,
    hung: result.hung,
    crash: result.signal && !result.hung ? `killed by ${result.signal}` : undefined,
    durationMs: result.durationMs,
  };
}

/** True when `setpriv` can run a program as nobody here (needs root). */
export function canDropToNobody(): boolean {
  return process.getuid?.() === 0 && fs.existsSync('/usr/bin/setpriv');
}

/** Lines of stderr, without the empty tail. */
export function stderrLines(result: BatchResult): string[] {
  return result.stderr.split('\n').filter((line) => line.length > 0);
}

/** Problems common to every run: a hang, a crash, a stack trace, an "internal error". */
export function basicProblems(result: BatchResult): string[] {
  const problems: string[] = [];
  if (result.hung) problems.push('hung (did not finish in time)');
  if (result.crash) problems.push(`crashed: ${result.crash.split('\n')[0]}`);
  const lines = stderrLines(result);
  if (lines.some((line) => /^\s+at /.test(line))) problems.push(`stack trace on stderr: ${JSON.stringify(result.stderr.slice(0, 400))}`);
  if (lines.some((line) => line.includes('internal error'))) problems.push(`internal error: ${lines.find((line) => line.includes('internal error'))}`);
  return problems;
}

/** Stderr holds only warnings (`ubdcow <cmd>: warning: ...`). */
export function nonWarningLines(result: BatchResult, cli: string): string[] {
  return stderrLines(result).filter((line) => !line.startsWith(`ubdcow ${cli}: warning: `));
}
