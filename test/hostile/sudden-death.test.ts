/**
 * Sudden death: a real `ubdcow commit` process (to a new file, and in place) is killed with
 * SIGKILL at a random moment, many times. After each kill, the files must be in a state a re-run
 * can finish from: a new image is either absent or complete, its inputs untouched; in place, the
 * COW's bitmap is never empty unless the backing file already holds the whole merged disk. Then
 * `ubdcow commit` is run again and must give the right image every time.
 *
 * Default: 20 kills per mode; UBDCOW_HEAVY=1: 200.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { commitJournalPath } from '../../src/commands/commit/index.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { parseHeader, serializeV3 } from '../../src/format/header.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';
import { runProcess } from './cli-run.js';
import { HEAVY, Tally, recordFigures } from './figures.js';

const KILLS = HEAVY ? 200 : 20;
const DISK_SIZE = 16 << 20;
/** Share of kills at any moment of the run; the rest land once the command has started writing. */
const ANY_MOMENT = 0.25;
const MTIME = 1_600_000_000;

interface Image {
  backing: Buffer;
  /** Allocated extents in bytes of the disk, sector-aligned, sorted, disjoint. */
  extents: Array<{ start: number; end: number }>;
  cowData: Buffer;
  expected: Buffer;
}

/** Random backing contents, ~half the disk allocated in the COW in extents of 16-512 KiB, some zero runs. */
function makeImage(): Image {
  const backing = randomBytes(DISK_SIZE);
  backing.fill(0, 2 << 20, 5 << 20);
  const cowData = randomBytes(DISK_SIZE);
  cowData.fill(0, 10 << 20, 11 << 20);
  const extents: Image['extents'] = [];
  for (let at = 0; at < DISK_SIZE; ) {
    const gap = (Math.floor(Math.random() * 64) + 1) * 8192;
    const length = (Math.floor(Math.random() * 32) + 1) * 16384;
    const start = at + gap;
    const end = Math.min(DISK_SIZE, start + length);
    if (start >= DISK_SIZE) break;
    extents.push({ start, end });
    at = end;
  }
  const expected = Buffer.from(backing);
  for (const { start, end } of extents) cowData.copy(expected, start, start, end);
  return { backing, extents, cowData, expected };
}

interface Files {
  dir: string;
  cow: string;
  backing: string;
  out: string;
  bitmapOffset: number;
  bitmapLength: number;
}

/** Writes the backing file and a sparse V3 COW over it (as the kernel would have left it). */
function writeFiles(dir: string, image: Image): Files {
  fs.mkdirSync(dir);
  const backing = path.join(dir, 'base.img');
  const cow = path.join(dir, 'vm.cow');
  fs.writeFileSync(backing, image.backing);
  fs.utimesSync(backing, MTIME, MTIME);
  const header = serializeV3({ backingFile: backing, mtime: MTIME, size: DISK_SIZE, sectorSize: 512, alignment: 4096 });
  const geometry = computeGeometry(parseHeader(header).header);
  const bitmap = Buffer.alloc(geometry.bitmapLength);
  const fd = fs.openSync(cow, 'w');
  try {
    fs.writeSync(fd, header, 0, header.length, 0);
    for (const { start, end } of image.extents) {
      fs.writeSync(fd, image.cowData, start, end - start, geometry.dataOffset + start);
      for (let sector = start / 512; sector < end / 512; sector++) bitmap[sector >> 3] |= 1 << (sector & 7);
    }
    fs.writeSync(fd, bitmap, 0, bitmap.length, geometry.bitmapOffset);
    fs.ftruncateSync(fd, geometry.fileLength);
  } finally {
    fs.closeSync(fd);
  }
  return { dir, cow, backing, out: path.join(dir, 'merged.img'), bitmapOffset: geometry.bitmapOffset, bitmapLength: geometry.bitmapLength };
}

function bitmapEmpty(files: Files): boolean {
  const fd = fs.openSync(files.cow, 'r');
  try {
    const bitmap = Buffer.alloc(files.bitmapLength);
    fs.readSync(fd, bitmap, 0, bitmap.length, files.bitmapOffset);
    return bitmap.every((byte) => byte === 0);
  } finally {
    fs.closeSync(fd);
  }
}

function holds(file: string, expected: Buffer): boolean {
  return fs.existsSync(file) && fs.readFileSync(file).equals(expected);
}

function temporaryFiles(dir: string): string[] {
  return fs.readdirSync(dir).filter((name) => name.endsWith('.tmp') && name.includes('.ubdcow-'));
}

interface Mode {
  name: 'new file' | 'in place';
  argv(files: Files): string[];
  /** True once the command has begun changing files (before that, a kill only tests startup). */
  started(files: Files): boolean;
  /** Where the kill landed, from the files it left. */
  stage(files: Files, image: Image, pristineCow: Buffer): string;
  /** Problems with the files right after the kill. */
  afterKill(files: Files, image: Image, pristineCow: Buffer): string[];
  /** Problems after the re-run. */
  afterRerun(files: Files, image: Image, pristineCow: Buffer): string[];
}

const modes: Mode[] = [
  {
    name: 'new file',
    argv: (f) => ['commit', f.cow, f.out],
    started: (f) => fs.existsSync(f.out) || temporaryFiles(f.dir).length > 0,
    stage(f) {
      if (fs.existsSync(f.out)) return temporaryFiles(f.dir).length > 0 ? 'OUT linked, temporary name not yet removed' : 'OUT in place';
      return temporaryFiles(f.dir).length > 0 ? 'writing the temporary file' : 'before the temporary file';
    },
    afterKill(f, image, pristineCow) {
      const problems: string[] = [];
      if (fs.existsSync(f.out) && !holds(f.out, image.expected)) problems.push('OUT exists but does not hold the merged disk');
      if (!holds(f.cow, pristineCow)) problems.push('the COW file changed');
      if (!holds(f.backing, image.backing)) problems.push('the backing file changed');
      return problems;
    },
    afterRerun(f, image, pristineCow) {
      const problems: string[] = [];
      if (!holds(f.out, image.expected)) problems.push('OUT does not hold the merged disk');
      if (!holds(f.cow, pristineCow) || !holds(f.backing, image.backing)) problems.push('an input changed');
      return problems;
    },
  },
  {
    name: 'in place',
    argv: (f) => ['commit', f.cow],
    started: (f) => fs.existsSync(commitJournalPath(f.cow)),
    stage(f, image) {
      const journal = fs.existsSync(commitJournalPath(f.cow));
      const empty = bitmapEmpty(f);
      const merged = holds(f.backing, image.expected);
      if (!journal) {
        if (empty) return 'finished';
        return holds(f.backing, image.backing) ? 'before the journal' : 'backing changed without a journal (!)';
      }
      if (empty) return 'COW emptied, journal not yet removed';
      return merged ? 'backing merged, COW not yet emptied' : 'merging into the backing file';
    },
    afterKill(f, image) {
      // The one rule that keeps data: the COW is emptied only over a complete backing file.
      return bitmapEmpty(f) && !holds(f.backing, image.expected) ? ['the COW bitmap is empty but the backing file is not the merged disk'] : [];
    },
    afterRerun(f, image) {
      const problems: string[] = [];
      if (!holds(f.backing, image.expected)) problems.push('the backing file does not hold the merged disk');
      if (!bitmapEmpty(f)) problems.push('the COW bitmap is not empty');
      if (fs.existsSync(commitJournalPath(f.cow))) problems.push('the journal is left behind');
      const header = parseHeader(fs.readFileSync(f.cow).subarray(0, 8192)).header;
      const backingMtime = Math.floor(fs.statSync(f.backing).mtimeMs / 1000);
      if (header.mtime !== backingMtime) problems.push(`COW header mtime ${header.mtime}, backing file's ${backingMtime}`);
      return problems;
    },
  },
];

interface KillResult {
  /** The process was killed (false: it finished first). */
  killed: boolean;
  status: number | null;
  stderr: string;
  /** Milliseconds from spawn to the kill (or the exit). */
  atMs: number;
}

/**
 * Runs `ubdcow ARGV` and SIGKILLs it: `delayMs` after `startSign()` turns true (polled every
 * millisecond), or after spawning when no sign is given.
 */
function runAndKill(bin: string, argv: string[], delayMs: number, startSign?: () => boolean): Promise<KillResult> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(process.execPath, [bin, ...argv], { cwd: repoRoot, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    let killedAt: number | undefined;
    let timer: NodeJS.Timeout | undefined;
    child.stderr.on('data', (chunk) => (stderr += chunk));
    child.on('error', reject);
    const killLater = (ms: number) => {
      timer = setTimeout(() => {
        killedAt = performance.now() - started;
        child.kill('SIGKILL');
      }, ms);
    };
    if (!startSign) killLater(delayMs);
    else {
      const poll = () => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        if (startSign()) killLater(delayMs);
        else timer = setTimeout(poll, 1);
      };
      poll();
    }
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      const killed = signal === 'SIGKILL' && killedAt !== undefined;
      resolve({ killed, status, stderr, atMs: Math.round(killedAt ?? performance.now() - started) });
    });
  });
}

/** How long a full run takes, and how long before it starts changing files. */
async function timeFullRun(bin: string, mode: Mode, files: Files): Promise<{ totalMs: number; startMs: number; status: number | null; stderr: string }> {
  const started = performance.now();
  let startMs: number | undefined;
  const child = spawn(process.execPath, [bin, ...mode.argv(files)], { cwd: repoRoot, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => (stderr += chunk));
  const poll = setInterval(() => {
    if (startMs === undefined && mode.started(files)) startMs = performance.now() - started;
  }, 1);
  const status = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearInterval(poll);
  const totalMs = performance.now() - started;
  return { totalMs: Math.round(totalMs), startMs: Math.round(startMs ?? totalMs / 2), status, stderr };
}

const tally = new Tally();
const stages = new Tally();
const failures: string[] = [];
const durations: Record<string, string> = {};
let leftoverTemporaryFiles = 0;

afterAll(() => {
  recordFigures('sudden-death', {
    title: 'Sudden death (SIGKILL during commit)',
    notes: [
      `A real \`node bin/ubdcow commit\` on a ${DISK_SIZE >> 20} MiB disk (about half allocated in the COW), killed with SIGKILL: ${ANY_MOMENT * 100}% of kills at a random moment of a whole run, the rest at a random moment after it began changing files ` +
        `(temporary file or journal seen); then \`ubdcow commit\` again. Full runs: ${Object.entries(durations).map(([m, d]) => `${m} ${d}`).join('; ')}.`,
      'After every kill: a new image is absent or complete and its inputs are unchanged; in place, the COW bitmap is empty only if the backing file already holds the merged disk. After every re-run: the right image.',
      `Temporary files left behind by killed new-file commits (SIGKILL allows no cleanup; hidden \`.OUT.ubdcow-PID-*.tmp\` siblings): ${leftoverTemporaryFiles}; every re-run removed them (their process was gone).`,
    ],
    rows: [
      ...tally.rows('mode', ['kills', 'killed mid-run', 'finished first', 're-run right', 'failed']),
      ...stages.rows('mode: stage at the kill', ['kills']),
    ],
    totals: { kills: tally.total('kills'), failed: tally.total('failed') },
    failures,
  });
});

describe('SIGKILL during ubdcow commit, then commit again', () => {
  let root: string;
  let image: Image;
  let bin: string;

  beforeAll(() => {
    bin = ensureBuiltCli();
    root = makeTempDir('ubdcow-kill-');
    image = makeImage();
  });
  afterAll(() => {
    if (root) removeTempDir(root);
  });

  for (const mode of modes) {
    it(`${mode.name}: ${KILLS} kills at random moments; every re-run gives the right image`, async () => {
      const commit = (argv: string[]) => runProcess(process.execPath, [bin, ...argv], { cwd: repoRoot, timeoutMs: 60_000 });
      const probe = writeFiles(path.join(root, `${mode.name.replace(' ', '-')}-probe`), image);
      const pristineProbe = fs.readFileSync(probe.cow);
      const full = await timeFullRun(bin, mode, probe);
      expect(full.status, full.stderr).toBe(0);
      expect(mode.afterRerun(probe, image, pristineProbe)).toEqual([]);
      durations[mode.name] = `${full.totalMs} ms, writing from ${full.startMs} ms`;
      const caseFailures: string[] = [];
      // The probe's timing varies with load: the window shrinks whenever a run outlives it.
      let window = full.totalMs - full.startMs;
      for (let kill = 0; kill < KILLS; kill++) {
        const files = writeFiles(path.join(root, `${mode.name.replace(' ', '-')}-${kill}`), image);
        const pristineCow = fs.readFileSync(files.cow);
        const anyMoment = Math.random() < ANY_MOMENT;
        const killed = anyMoment
          ? await runAndKill(bin, mode.argv(files), Math.random() * full.totalMs)
          : await runAndKill(bin, mode.argv(files), Math.random() * window, () => mode.started(files));
        if (!killed.killed) window *= 0.7;
        tally.add(mode.name, 'kills');
        tally.add(mode.name, killed.killed ? 'killed mid-run' : 'finished first');
        const stage = killed.killed ? mode.stage(files, image, pristineCow) : 'finished before the kill';
        stages.add(`${mode.name}: ${stage}`, 'kills');
        const problems = mode.afterKill(files, image, pristineCow);
        if (!killed.killed && killed.status !== 0) problems.push(`the unkilled run failed: ${killed.stderr}`);
        leftoverTemporaryFiles += temporaryFiles(files.dir).length;
        // A complete OUT is the finished job: the re-run would rightly refuse to overwrite it.
        if (!(mode.name === 'new file' && fs.existsSync(files.out))) {
          const rerun = await commit(mode.argv(files));
          if (rerun.status !== 0) problems.push(`re-run failed (exit ${rerun.status}): ${rerun.stderr.trim()}`);
          // The re-run removes what the killed run left (its process is gone).
          const remaining = temporaryFiles(files.dir);
          if (remaining.length > 0) problems.push(`temporary files still there after the re-run: ${remaining.join(', ')}`);
        }
        problems.push(...mode.afterRerun(files, image, pristineCow));
        if (problems.length === 0) tally.add(mode.name, 're-run right');
        else {
          tally.add(mode.name, 'failed');
          caseFailures.push(`${mode.name}, killed after ${killed.atMs} ms (${stage}): ${problems.join('; ')}`);
        }
        fs.rmSync(files.dir, { recursive: true, force: true });
      }
      failures.push(...caseFailures);
      expect(caseFailures).toEqual([]);
    }, HEAVY ? 3_600_000 : 180_000);
  }
});
