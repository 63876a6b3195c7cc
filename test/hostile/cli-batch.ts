/**
 * Runs many CLI invocations in one Node process, through the built CLI's own `main()` (the same
 * code `bin/ubdcow` runs), so a few hundred hostile inputs cost one process start.
 *
 *   node --import tsx test/hostile/cli-batch.ts RUNS.json RESULTS.json
 *
 * RUNS.json: [{ "argv": [...], "cwd"?: "..." }]. For each run the result records the exit code,
 * everything written to stderr, the first bytes written to stdout, and whether it hung (did not
 * finish within the timeout) or crashed (an uncaught exception or unhandled rejection, which the
 * real binary would print with a stack trace).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface BatchRun {
  argv: string[];
  cwd?: string;
}

export interface BatchResult {
  argv: string[];
  exitCode: number;
  stderr: string;
  /** First STDOUT_KEPT bytes of stdout, as UTF-8 (lossy for binary output). */
  stdout: string;
  stdoutBytes: number;
  /** The raw stdout bytes as base64, when all of them were kept (to compare binary output). */
  stdoutBase64?: string;
  hung: boolean;
  crash?: string;
  durationMs: number;
}

const STDOUT_KEPT = 1 << 20;
const RUN_TIMEOUT_MS = Number(process.env.UBDCOW_BATCH_TIMEOUT_MS ?? 5000);

type WriteCallback = (err?: Error | null) => void;

function capture(stream: NodeJS.WriteStream, sink: (chunk: Buffer) => void): () => void {
  const original = stream.write;
  stream.write = ((chunk: string | Uint8Array, encoding?: BufferEncoding | WriteCallback, callback?: WriteCallback) => {
    const done = typeof encoding === 'function' ? encoding : callback;
    sink(typeof chunk === 'string' ? Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8') : Buffer.from(chunk));
    if (done) queueMicrotask(() => done(null));
    return true;
  }) as typeof stream.write;
  return () => {
    stream.write = original;
  };
}

async function runOne(main: (argv: string[]) => Promise<void>, run: BatchRun): Promise<BatchResult> {
  const stderr: Buffer[] = [];
  const stdout: Buffer[] = [];
  let stdoutBytes = 0;
  let crash: string | undefined;
  const onCrash = (err: unknown) => {
    crash ??= err instanceof Error ? `${err.name}: ${err.message}\n${err.stack}` : String(err);
  };
  process.on('uncaughtException', onCrash);
  process.on('unhandledRejection', onCrash);
  const restoreErr = capture(process.stderr, (chunk) => stderr.push(chunk));
  const restoreOut = capture(process.stdout, (chunk) => {
    if (stdoutBytes < STDOUT_KEPT) stdout.push(chunk);
    stdoutBytes += chunk.length;
  });
  const previousCwd = process.cwd();
  if (run.cwd) process.chdir(run.cwd);
  process.exitCode = 0;
  const started = performance.now();
  let hung = false;
  let timer: NodeJS.Timeout | undefined;
  try {
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), RUN_TIMEOUT_MS);
    });
    const outcome = await Promise.race([main(run.argv).then(() => 'done' as const), timeout]);
    hung = outcome === 'timeout';
    // Let late rejections (a forgotten promise) surface before the next run starts.
    await new Promise((resolve) => setImmediate(resolve));
  } catch (err) {
    onCrash(err);
  } finally {
    clearTimeout(timer);
    restoreOut();
    restoreErr();
    process.chdir(previousCwd);
    process.off('uncaughtException', onCrash);
    process.off('unhandledRejection', onCrash);
  }
  const exitCode = typeof process.exitCode === 'number' ? process.exitCode : Number(process.exitCode ?? 0);
  process.exitCode = 0;
  const out = Buffer.concat(stdout);
  return {
    argv: run.argv,
    exitCode,
    stderr: Buffer.concat(stderr).toString('utf8'),
    stdout: out.toString('utf8'),
    stdoutBytes,
    stdoutBase64: stdoutBytes <= STDOUT_KEPT ? out.toString('base64') : undefined,
    hung,
    crash,
    durationMs: Math.round(performance.now() - started),
  };
}

async function batchMain(): Promise<void> {
  const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  const runs = JSON.parse(fs.readFileSync(process.argv[2], 'utf8')) as BatchRun[];
  const { main } = (await import(path.join(repoRoot, 'dist', 'cli', 'main.js'))) as { main: (argv: string[]) => Promise<void> };
  // Handlers add listeners to stdout per run; the warning would land in some run's stderr.
  process.stdout.setMaxListeners(0);
  process.stdin.setMaxListeners(0);
  const results: BatchResult[] = [];
  for (const run of runs) results.push(await runOne(main, run));
  fs.writeFileSync(process.argv[3], JSON.stringify(results));
  // A hung run may hold a thread-pool thread (an open() that never returns): do not wait for it.
  process.exit(0);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await batchMain();
}
