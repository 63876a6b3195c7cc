/**
 * Failing disks: every command that writes is run again and again over the real file system with
 * exactly one I/O step failing (ENOSPC and EIO on the Nth write step, EIO on the Nth read step,
 * for every N the operation takes). Each time the operation must report the error (a UbdcowError
 * naming the file and the errno), must not hang, must leave the user's files intact (no output
 * under OUT's name, no temporary file, inputs unchanged or consistently changed), and a re-run
 * without faults must finish the job with the right result.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { commitCow, commitJournalPath } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { rebaseCow } from '../../src/commands/rebase.js';
import { UbdcowError } from '../../src/errors.js';
import { parseHeader, serializeV3 } from '../../src/format/header.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { type BuiltCow, buildCow, countSetBits, readRange, sha256 } from '../helpers/cow-fixtures.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { type FaultPlan, FaultyFileSystem, mentionsErrno } from './faulty-fs.js';
import { HEAVY, Tally, recordFigures } from './figures.js';

const CASE_TIMEOUT_MS = 10_000;
/** 128 whole sectors and a partial one: bitmap 17 bytes, bits 129-135 lie past the end. */
const DISK_SIZE = 64 * 1024 + 100;
const EXTENTS = [
  { start: 0, end: 5 },
  { start: 40, end: 90 },
  { start: 125, end: 129 },
];
/** Small copy runs, so a commit takes many steps and a fault can land between them. */
const CHUNK_BYTES = HEAVY ? 4096 : 16384;

interface Context {
  dir: string;
  built?: BuiltCow;
  cowPath: string;
  backingPath: string;
  /** Whatever else the scenario needs (OUT, the moved backing file). */
  other?: string;
  /** The COW file's bytes before the run. */
  original?: Buffer;
}

interface Scenario {
  name: string;
  setUp(dir: string): Context;
  run(context: Context, fs: FaultyFileSystem): Promise<unknown>;
  /** Problems with the files right after a failed run (empty when all is well). */
  afterFailure(context: Context, before: FolderSnapshot): string[];
  /** Runs again without faults; returns problems with the result. */
  recover(context: Context): Promise<string[]>;
  /**
   * Problems with the result when the operation succeeded despite the fault: a step whose failure
   * is tolerated by design (e.g. resolving OUT's path, which normally does not exist yet).
   */
  verifyResult(context: Context): string[];
  /** check may answer an I/O error as a problem it reports instead of throwing. */
  reportsProblems?: boolean;
  /** The operation must refuse (this error code) when nothing fails; a fault must not let it through. */
  refusal?: string;
}

type FolderSnapshot = Map<string, { size: number; mtimeMs: number; hash: string }>;

function snapshotFolder(dir: string): FolderSnapshot {
  const files: FolderSnapshot = new Map();
  for (const name of fs.readdirSync(dir)) {
    const full = path.join(dir, name);
    const stat = fs.statSync(full);
    if (stat.isFile()) files.set(name, { size: stat.size, mtimeMs: stat.mtimeMs, hash: sha256(full) });
  }
  return files;
}

function changedFiles(before: FolderSnapshot, after: FolderSnapshot, ignore: string[] = []): string[] {
  const changes: string[] = [];
  for (const name of new Set([...before.keys(), ...after.keys()])) {
    if (ignore.includes(name)) continue;
    const a = before.get(name);
    const b = after.get(name);
    if (!a) changes.push(`${name} appeared`);
    else if (!b) changes.push(`${name} disappeared`);
    else if (a.hash !== b.hash || a.size !== b.size || a.mtimeMs !== b.mtimeMs) changes.push(`${name} changed`);
  }
  return changes;
}

function temporaryFiles(dir: string): string[] {
  return fs.readdirSync(dir).filter((name) => /\.ubdcow-\d+-\w+\.tmp$/.test(name));
}

function sameBytes(file: string, expected: Uint8Array): boolean {
  return fs.existsSync(file) && Buffer.compare(fs.readFileSync(file), expected) === 0;
}

function cowContext(dir: string, other?: string): Context {
  const built = buildCow(dir, { size: DISK_SIZE, extents: EXTENTS, seed: 3 });
  return { dir, built, cowPath: built.cowPath, backingPath: built.backingPath, other };
}

/** A COW whose bitmap holds nothing, over a backing file that holds the merged disk. */
function emptiedOverMergedBacking(context: Context): string[] {
  const built = context.built!;
  const problems: string[] = [];
  if (!sameBytes(context.backingPath, built.expected)) problems.push('backing file does not hold the merged disk');
  if (countSetBits(context.cowPath, built.geometry) !== 0) problems.push('COW bitmap not emptied');
  const header = parseHeader(readRange(context.cowPath, 0, 8192)).header;
  const backingMtime = Math.floor(fs.statSync(context.backingPath).mtimeMs / 1000);
  if (header.mtime !== backingMtime) problems.push(`COW header mtime ${header.mtime}, backing file's is ${backingMtime}`);
  if (fs.existsSync(commitJournalPath(context.cowPath))) problems.push('commit journal left behind');
  return problems;
}

/** Sets bitmap bits past the last sector, which check --repair clears. */
function setStrayBits(context: Context): void {
  const { bitmapOffset, bitmapLength } = context.built!.geometry;
  const fd = fs.openSync(context.cowPath, 'r+');
  const last = Buffer.alloc(1);
  fs.readSync(fd, last, 0, 1, bitmapOffset + bitmapLength - 1);
  last[0] |= 0b1010_0100; // bits 130, 133, 135
  fs.writeSync(fd, last, 0, 1, bitmapOffset + bitmapLength - 1);
  fs.closeSync(fd);
}

const scenarios: Scenario[] = [
  {
    name: 'create',
    setUp(dir) {
      const backingPath = path.join(dir, 'base.img');
      fs.writeFileSync(backingPath, Buffer.alloc(DISK_SIZE, 7));
      fs.utimesSync(backingPath, 1_600_000_000, 1_600_000_000);
      return { dir, cowPath: path.join(dir, 'vm.cow'), backingPath };
    },
    run: (c, faulty) => createCow(c.cowPath, c.backingPath, { fs: faulty }),
    afterFailure(c, before) {
      const problems = changedFiles(before, snapshotFolder(c.dir)).map((change) => `after the failure: ${change}`);
      return problems;
    },
    async recover(c) {
      await createCow(c.cowPath, c.backingPath);
      return this.verifyResult(c);
    },
    verifyResult(c) {
      const header = parseHeader(readRange(c.cowPath, 0, 8192)).header;
      return header.backingFile === c.backingPath && header.size === DISK_SIZE ? [] : [`COW header is ${JSON.stringify(header)}`];
    },
  },
  {
    name: 'commit to a new file',
    setUp: (dir) => cowContext(dir, path.join(dir, 'merged.img')),
    run: (c, faulty) => commitCow(c.cowPath, { output: c.other, fs: faulty, chunkBytes: CHUNK_BYTES }),
    afterFailure(c, before) {
      return changedFiles(before, snapshotFolder(c.dir)).map((change) => `after the failure: ${change}`);
    },
    async recover(c) {
      await commitCow(c.cowPath, { output: c.other });
      return this.verifyResult(c);
    },
    verifyResult(c) {
      return sameBytes(c.other!, c.built!.expected) ? [] : ['OUT does not hold the merged disk'];
    },
  },
  {
    name: 'commit in place',
    setUp: (dir) => cowContext(dir),
    run: (c, faulty) => commitCow(c.cowPath, { fs: faulty, chunkBytes: CHUNK_BYTES }),
    afterFailure(c) {
      const problems: string[] = [];
      // The COW may be emptied only once the backing file holds everything.
      if (countSetBits(c.cowPath, c.built!.geometry) === 0 && !sameBytes(c.backingPath, c.built!.expected)) {
        problems.push('COW bitmap emptied but the backing file does not hold the merged disk');
      }
      return problems;
    },
    async recover(c) {
      await commitCow(c.cowPath);
      return emptiedOverMergedBacking(c).map((problem) => `re-run: ${problem}`);
    },
    verifyResult: (c) => emptiedOverMergedBacking(c),
  },
  {
    name: 'commit in place next to another COW',
    refusal: 'shared-backing',
    setUp(dir) {
      const context = cowContext(dir);
      // A second VM's COW over the same backing file: merging into it would change that VM's disk.
      const { header, geometry } = context.built!;
      const sibling = path.join(dir, 'vm2.cow');
      fs.writeFileSync(sibling, serializeV3({ ...header, backingFile: context.backingPath }));
      fs.truncateSync(sibling, geometry.fileLength);
      return context;
    },
    run: (c, faulty) => commitCow(c.cowPath, { fs: faulty, chunkBytes: CHUNK_BYTES }),
    afterFailure(c, before) {
      return changedFiles(before, snapshotFolder(c.dir)).map((change) => `after the failure: ${change}`);
    },
    async recover(c) {
      const again = await commitCow(c.cowPath).then(
        () => 'went ahead',
        (err: unknown) => (err instanceof UbdcowError ? err.code : String(err)),
      );
      return again === 'shared-backing' ? [] : [`re-run: expected the shared-backing refusal, got ${again}`];
    },
    verifyResult: () => ['the commit went ahead although another COW uses the backing file (the sibling check was skipped)'],
  },
  {
    name: 'rebase',
    setUp(dir) {
      const context = cowContext(dir, path.join(dir, 'moved.img'));
      fs.copyFileSync(context.backingPath, context.other!);
      const { mtime } = fs.statSync(context.backingPath);
      fs.utimesSync(context.other!, mtime, mtime);
      return context;
    },
    run: (c, faulty) => rebaseCow(c.cowPath, c.other!, { fs: faulty }),
    afterFailure(c, before) {
      const problems = changedFiles(before, snapshotFolder(c.dir), ['vm.cow']).map((change) => `after the failure: ${change}`);
      const cow = fs.readFileSync(c.cowPath);
      const header = parseHeader(cow).header;
      if (header.backingFile !== c.backingPath && header.backingFile !== c.other) problems.push(`header names ${header.backingFile}`);
      if (Buffer.compare(cow.subarray(4128), c.original!.subarray(4128)) !== 0) problems.push('COW changed past its header');
      return problems;
    },
    async recover(c) {
      await rebaseCow(c.cowPath, c.other!);
      return this.verifyResult(c);
    },
    verifyResult(c) {
      const header = parseHeader(fs.readFileSync(c.cowPath)).header;
      return header.backingFile === c.other ? [] : [`header names ${header.backingFile}`];
    },
  },
  {
    name: 'check --repair',
    reportsProblems: true,
    setUp(dir) {
      const context = cowContext(dir);
      setStrayBits(context);
      return context;
    },
    run: (c, faulty) => checkCow(c.cowPath, { repair: true, fs: faulty }),
    afterFailure(c, before) {
      const problems = changedFiles(before, snapshotFolder(c.dir), ['vm.cow']).map((change) => `after the failure: ${change}`);
      const { bitmapOffset, bitmapLength } = c.built!.geometry;
      const lastByte = bitmapOffset + bitmapLength - 1;
      const cow = fs.readFileSync(c.cowPath);
      const expected = Buffer.from(c.original!);
      // Only the stray bits may differ (cleared or not); everything else stays as it was.
      cow[lastByte] &= 0b0000_0001;
      expected[lastByte] &= 0b0000_0001;
      if (Buffer.compare(cow, expected) !== 0) problems.push('COW changed beyond the stray bits');
      return problems;
    },
    async recover(c) {
      await checkCow(c.cowPath, { repair: true });
      return this.verifyResult(c);
    },
    verifyResult(c) {
      const { bitmapOffset, bitmapLength } = c.built!.geometry;
      const last = readRange(c.cowPath, bitmapOffset + bitmapLength - 1, 1)[0];
      return last === (c.original![bitmapOffset + bitmapLength - 1] & 0b0000_0001) ? [] : [`stray bits still set: ${last.toString(2)}`];
    },
  },
];

type Outcome = { resolved: unknown } | { rejected: unknown } | { hung: true };

async function withTimeout(run: () => Promise<unknown>): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      run().then(
        (resolved): Outcome => ({ resolved }),
        (rejected: unknown): Outcome => ({ rejected }),
      ),
      new Promise<Outcome>((resolve) => {
        timer = setTimeout(() => resolve({ hung: true }), CASE_TIMEOUT_MS);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** The error the user sees: a UbdcowError, one line, naming a file of the case and the errno. */
function judgeReportedError(error: unknown, context: Context, code: string): string[] {
  if (!(error instanceof UbdcowError)) return [`threw ${String(error)}, not a UbdcowError`];
  const problems: string[] = [];
  if (error.message.includes('\n')) problems.push(`message has several lines: ${error.message}`);
  if (!error.message.includes(context.dir)) problems.push(`message names no file of the case: ${error.message}`);
  if (!mentionsErrno(error.message, code)) problems.push(`message does not say ${code}: ${error.message}`);
  return problems;
}

/** Problems check reported and did not repair. */
function unrepairedProblems(result: unknown): Array<{ message: string }> {
  const { problems } = result as { problems: Array<{ message: string; repaired?: boolean }> };
  return problems.filter((problem) => !problem.repaired);
}

/** check --repair may report an I/O failure as a problem of the file instead of throwing. */
function judgeCheckResult(result: unknown, code: string): string[] {
  const reported = unrepairedProblems(result);
  return reported.some((problem) => mentionsErrno(problem.message, code))
    ? []
    : [`the failure was reported as something else: ${reported.map((problem) => problem.message).join(' | ')}`];
}

/**
 * Bugs found by this test and reported, not yet fixed. A case they explain is counted as a known
 * bug instead of failing; once a bug no longer shows, the test fails so its entry gets removed.
 */
interface KnownBug {
  scenario: string;
  /** The failed step, as FaultyFileSystem logs it. */
  step: RegExp;
  /** Every problem of the case matches this. */
  problem: RegExp;
  description: string;
}

const KNOWN_BUGS: KnownBug[] = [
];

const tally = new Tally();
const failures: string[] = [];
const knownBugCases = new Map<KnownBug, string[]>();
/** Steps whose failure an operation got past with the right result anyway. */
const tolerated = new Set<string>();
const stepCounts: Record<string, { reads: number; writes: number }> = {};

afterAll(() => {
  recordFigures('failing-disks', {
    title: 'Failing disks (commands)',
    notes: [
      'Each operation runs once to count its I/O steps, then once per step and fault: ENOSPC and EIO on the Nth write step, EIO on the Nth read step, over real files.',
      'Read steps: read, stat, fstat, realpath, readdir, open for reading/updating. Write steps: write, truncate, sync, datasync, create, rename, link, unlink, directory sync.',
      `Steps per operation: ${Object.entries(stepCounts).map(([name, c]) => `${name} ${c.reads} reads + ${c.writes} writes`).join('; ')}.`,
      `Copy chunk ${CHUNK_BYTES} bytes; each case has ${CASE_TIMEOUT_MS / 1000} s before it counts as hung.`,
      `Failed steps the operation got past with the right result (path lookups with a fallback; in place, the sibling-COW scan, which has nothing to find here): ${tolerated.size === 0 ? 'none' : [...tolerated].sort().join('; ')}.`,
    ],
    rows: tally.rows('operation', ['injections', 'reported as error', 'reported as problem', 'refused all the same', 'tolerated, result right', 'recovered by re-run', 'known bug', 'failed']),
    totals: { injections: tally.total('injections'), 'known bug': tally.total('known bug'), failed: tally.total('failed') },
    failures,
    knownBugs: [...knownBugCases].map(([bug, cases]) => ({ description: bug.description, cases: cases.length, example: cases[0] })),
  });
});

describe('failing disks: one I/O step fails, at every step', () => {
  for (const scenario of scenarios) {
    it(`${scenario.name}: reports the error, keeps the files intact, and a re-run finishes`, async () => {
      const root = makeTempDir('ubdcow-faults-');
      try {
        const probe = new FaultyFileSystem(nodeFileSystem);
        fs.mkdirSync(path.join(root, 'probe'));
        const probeContext = scenario.setUp(path.join(root, 'probe'));
        const probeError = await scenario.run(probeContext, probe).then(
          () => undefined,
          (err: unknown) => err,
        );
        if (scenario.refusal) expect((probeError as UbdcowError | undefined)?.code, String(probeError)).toBe(scenario.refusal);
        else expect(probeError).toBeUndefined();
        stepCounts[scenario.name] = { reads: probe.reads, writes: probe.writes };
        const plans: FaultPlan[] = [];
        for (let at = 1; at <= probe.writes; at++) plans.push({ kind: 'write', at, code: 'ENOSPC' }, { kind: 'write', at, code: 'EIO' });
        for (let at = 1; at <= probe.reads; at++) plans.push({ kind: 'read', at, code: 'EIO' });
        const caseFailures: string[] = [];
        for (const [index, plan] of plans.entries()) {
          const dir = path.join(root, `case-${index}`);
          fs.mkdirSync(dir);
          const context = scenario.setUp(dir);
          if (fs.existsSync(context.cowPath)) context.original = fs.readFileSync(context.cowPath);
          const before = snapshotFolder(dir);
          const faulty = new FaultyFileSystem(nodeFileSystem, plan);
          const outcome = await withTimeout(() => scenario.run(context, faulty));
          const problems: string[] = [];
          tally.add(scenario.name, 'injections');
          if ('hung' in outcome) problems.push('hung');
          else if (!faulty.injected) problems.push('the planned step was never reached (the operation took another path)');
          else if ('rejected' in outcome) {
            const refused = scenario.refusal !== undefined && outcome.rejected instanceof UbdcowError && outcome.rejected.code === scenario.refusal;
            if (!refused) problems.push(...judgeReportedError(outcome.rejected, context, plan.code));
            tally.add(scenario.name, refused ? 'refused all the same' : 'reported as error');
          } else if (scenario.reportsProblems && unrepairedProblems(outcome.resolved).length > 0) {
            problems.push(...judgeCheckResult(outcome.resolved, plan.code));
            tally.add(scenario.name, 'reported as problem');
          } else {
            const wrong = scenario.verifyResult(context);
            if (wrong.length > 0) problems.push(`the injected failure was swallowed and the result is wrong: ${wrong.join('; ')}`);
            else {
              tally.add(scenario.name, 'tolerated, result right');
              tolerated.add(`${scenario.name}: ${faulty.injected?.replace(/ #\d+/, '')}`);
            }
          }
          if (temporaryFiles(dir).length > 0) problems.push(`temporary files left: ${temporaryFiles(dir).join(', ')}`);
          if ('rejected' in outcome || ('resolved' in outcome && scenario.reportsProblems)) {
            problems.push(...scenario.afterFailure(context, before));
            const recovery = await withTimeout(() => scenario.recover(context));
            if ('hung' in recovery) problems.push('re-run hung');
            else if ('rejected' in recovery) problems.push(`re-run failed: ${String(recovery.rejected)}`);
            else if ((recovery.resolved as string[]).length > 0) problems.push(...(recovery.resolved as string[]));
            else tally.add(scenario.name, 'recovered by re-run');
          }
          const description = `${scenario.name}, ${plan.code} on ${faulty.injected ?? `${plan.kind} step ${plan.at}`}: ${problems.join('; ')}`;
          const known = problems.length > 0 && KNOWN_BUGS.find(
            (bug) => bug.scenario === scenario.name && bug.step.test(faulty.injected ?? '') && problems.every((problem) => bug.problem.test(problem)),
          );
          if (known) {
            tally.add(scenario.name, 'known bug');
            knownBugCases.set(known, [...(knownBugCases.get(known) ?? []), description]);
          } else if (problems.length > 0) {
            tally.add(scenario.name, 'failed');
            caseFailures.push(description);
          }
          fs.rmSync(dir, { recursive: true, force: true });
        }
        for (const bug of KNOWN_BUGS.filter((b) => b.scenario === scenario.name)) {
          if (!knownBugCases.has(bug)) caseFailures.push(`known bug no longer shows (fixed? remove it from KNOWN_BUGS): ${bug.description}`);
        }
        failures.push(...caseFailures);
        expect(caseFailures).toEqual([]);
      } finally {
        removeTempDir(root);
      }
    }, 300_000);
  }
});
