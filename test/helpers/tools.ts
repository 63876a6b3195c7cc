import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const toolFound = new Map<string, boolean>();

/** True when `name` is an executable on PATH (asked once per name). */
export function hasTool(name: string): boolean {
  let present = toolFound.get(name);
  if (present === undefined) {
    present = spawnSync('which', [name], { stdio: 'ignore' }).status === 0;
    toolFound.set(name, present);
  }
  return present;
}

/** The tools among `names` that are not installed. */
export function missingTools(...names: string[]): string[] {
  return names.filter((name) => !hasTool(name));
}

/**
 * A suite title that says why it is skipped when tools are missing, and a warning on the console
 * so a skipped interop suite is never silent. Use with `describe.skipIf(missing.length > 0)`.
 */
export function titleWithSkipReason(title: string, missing: string[]): string {
  if (missing.length === 0) return title;
  const reason = `[skipped: ${missing.join(', ')} not installed]`;
  console.warn(`${title} ${reason}`);
  return `${title} ${reason}`;
}

/** Runs a program and returns its exit status and output; never throws for a non-zero exit. */
export function run(
  program: string,
  args: string[],
  options: { cwd?: string; input?: string } = {},
): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(program, args, { cwd: options.cwd, input: options.input, encoding: 'utf8' });
  if (result.error) throw result.error;
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Runs a program and fails with its stderr if it exits non-zero. */
export function runOk(program: string, args: string[], options: { cwd?: string } = {}): string {
  return execFileSync(program, args, { cwd: options.cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function newestSourceMtime(dir: string): number {
  let newest = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestSourceMtime(full));
    else if (entry.name.endsWith('.ts')) newest = Math.max(newest, fs.statSync(full).mtimeMs);
  }
  return newest;
}

/**
 * Path of the CLI entry point; builds dist/ first when it is missing or older than src/. bin/ubdcow
 * runs the bundle (dist/cli/bundle.cjs), which only the bundle script makes: tsc alone would leave
 * tests running the CLI as it was before the last change.
 */
export function ensureBuiltCli(): string {
  const outputs = [path.join(repoRoot, 'dist', 'cli', 'main.js'), path.join(repoRoot, 'dist', 'cli', 'bundle.cjs')];
  const newestSource = newestSourceMtime(path.join(repoRoot, 'src'));
  const stale = outputs.some((built) => !fs.existsSync(built) || fs.statSync(built).mtimeMs < newestSource);
  if (stale) {
    // tsc still emits when it finds type errors; those fail `npm test`'s build step, not this.
    const result = run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: repoRoot });
    if (result.status !== 0) console.warn(`tsc reported problems while building dist/:\n${result.stdout}${result.stderr}`);
    const bundled = run(process.execPath, [path.join(repoRoot, 'scripts', 'bundle-cli.mjs')], { cwd: repoRoot });
    if (outputs.some((built) => !fs.existsSync(built)) || bundled.status !== 0) {
      throw new Error(`building dist/ failed:\n${result.stdout}${result.stderr}${bundled.stdout}${bundled.stderr}`);
    }
  }
  return path.join(repoRoot, 'bin', 'ubdcow');
}

type Range = [start: number, end: number];

/* Node has no lseek(SEEK_DATA); python3 does. Prints "start end" per data segment. */
const listDataSegments = `
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
pos = 0
while pos < size:
    try:
        start = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    end = os.lseek(fd, start, os.SEEK_HOLE)
    print(start, end)
    pos = end
`;

/**
 * The byte ranges of `file` that are not holes, or undefined when that cannot be found out
 * (no python3). A file system without hole support reports the whole file as data.
 */
export function dataSegments(file: string): Range[] | undefined {
  if (!hasTool('python3')) return undefined;
  const result = spawnSync('python3', ['-c', listDataSegments, file], { encoding: 'utf8' });
  if (result.status !== 0) return undefined;
  return result.stdout
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => line.split(' ').map(Number) as Range);
}

function mergeRanges(ranges: Range[]): Range[] {
  const merged: Range[] = [];
  for (const [start, end] of [...ranges].sort((x, y) => x[0] - y[0])) {
    const last = merged[merged.length - 1];
    if (last && start <= last[1]) last[1] = Math.max(last[1], end);
    else merged.push([start, end]);
  }
  return merged;
}

/** Files at least this big are compared over their data segments only, when those are known. */
const SPARSE_COMPARE_THRESHOLD = 256 << 20;

/**
 * Compares two files a chunk at a time (images here can be gigabytes, mostly holes).
 * Returns undefined when they are equal, else where they first differ. For big sparse files
 * only the union of both files' data segments is read: outside it both read as zeros.
 */
export async function firstDifference(a: string, b: string, chunkBytes = 4 << 20): Promise<string | undefined> {
  const [sizeA, sizeB] = [fs.statSync(a).size, fs.statSync(b).size];
  if (sizeA !== sizeB) return `lengths differ: ${a} is ${sizeA} bytes, ${b} is ${sizeB}`;
  let ranges: Range[] = [[0, sizeA]];
  if (sizeA >= SPARSE_COMPARE_THRESHOLD) {
    const [segmentsA, segmentsB] = [dataSegments(a), dataSegments(b)];
    if (segmentsA && segmentsB) ranges = mergeRanges([...segmentsA, ...segmentsB].map(([s, e]) => [s, Math.min(e, sizeA)] as Range));
  }
  const [fileA, fileB] = await Promise.all([fs.promises.open(a, 'r'), fs.promises.open(b, 'r')]);
  try {
    const bufferA = Buffer.alloc(chunkBytes);
    const bufferB = Buffer.alloc(chunkBytes);
    for (const [start, end] of ranges) {
      for (let position = start; position < end; position += chunkBytes) {
        const length = Math.min(chunkBytes, end - position);
        const [readA, readB] = await Promise.all([
          fileA.read(bufferA, 0, length, position),
          fileB.read(bufferB, 0, length, position),
        ]);
        if (readA.bytesRead !== length || readB.bytesRead !== length) return `short read at ${position}`;
        if (!bufferA.subarray(0, length).equals(bufferB.subarray(0, length))) {
          let at = 0;
          while (bufferA[at] === bufferB[at]) at++;
          return `first difference at byte ${position + at}: ${bufferA[at]} vs ${bufferB[at]}`;
        }
      }
    }
    return undefined;
  } finally {
    await Promise.all([fileA.close(), fileB.close()]);
  }
}
