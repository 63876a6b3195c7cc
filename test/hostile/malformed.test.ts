/**
 * Every command against every kind of damaged input. Each run must end with the documented
 * outcome: one error line naming the file and the problem (exit 1, or 2 for diff/check), a report
 * (check), a difference (diff) or success, and never a hang, a crash, a stack trace, or a changed
 * file. The full matrix runs through the CLI's main() in one process (cli-batch.ts); one case per
 * input, and every command on an unreadable file, run as real `ubdcow` processes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { openCow } from '../../src/io/engine/engine.js';
import { ensureBuiltCli } from '../helpers/tools.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import type { BatchResult } from './cli-batch.js';
import { basicProblems, canDropToNobody, nonWarningLines, runBatch, runCli, stderrLines } from './cli-run.js';
import { COMMANDS, type CommandUnderTest, type Expected, type OutputCheck, expectedOutcome } from './commands-under-test.js';
import { Tally, recordFigures } from './figures.js';
import {
  DISK_SIZE,
  type FileState,
  type Fixture,
  MALFORMED_CASES,
  type MalformedCase,
  buildFixture,
  describeChanges,
  folderState,
} from './malformed-cases.js';

interface Trial {
  malformed: MalformedCase;
  command: CommandUnderTest;
  fixture: Fixture;
  before: Record<string, FileState>;
  /** The damaged COW's bytes, for checking raw output (cat of a file without the magic). */
  cowBytes?: Buffer;
}

function prepare(root: string, malformed: MalformedCase, command: CommandUnderTest, label: string): Trial {
  const fixture = buildFixture(path.join(root, malformed.name, `${label}-${command.name}`));
  malformed.damage(fixture);
  const cowStat = fs.lstatSync(fixture.cowPath, { throwIfNoEntry: false });
  const cowBytes = cowStat?.isFile() && (cowStat.mode & 0o444) !== 0 ? fs.readFileSync(fixture.cowPath) : undefined;
  return { malformed, command, fixture, before: folderState(fixture.dir), cowBytes };
}

function fileNamed(trial: Trial): string {
  return trial.malformed.names === 'cow' ? trial.fixture.cowPath : trial.fixture.backingPath;
}

/** What went wrong with one run, judged against the documented outcome (empty when all held). */
function judge(trial: Trial, result: BatchResult, expected: Expected): string[] {
  const { command, malformed } = trial;
  const problems = basicProblems(result);
  const lines = stderrLines(result);
  const after = folderState(trial.fixture.dir);
  const mayChange = expected.kind === 'ok' ? command.changesOnSuccess.map((which) => path.basename({ cow: trial.fixture.cowPath, backing: trial.fixture.backingPath, out: trial.fixture.out }[which])) : [];
  const changes = describeChanges(withoutNames(trial.before, mayChange), withoutNames(after, mayChange));
  if (changes) problems.push(`files changed:\n${changes}`);
  switch (expected.kind) {
    case 'error': {
      const code = command.cli === 'diff' || command.cli === 'check' ? 2 : 1;
      if (result.exitCode !== code) problems.push(`exit code ${result.exitCode}, expected ${code}`);
      if (lines.length !== 1) problems.push(`${lines.length} stderr lines, expected 1: ${JSON.stringify(result.stderr)}`);
      const line = lines[0] ?? '';
      if (!line.startsWith(`ubdcow ${command.cli}: `)) problems.push(`error line does not start with "ubdcow ${command.cli}: ": ${line}`);
      if (!line.includes(fileNamed(trial))) problems.push(`error line does not name ${fileNamed(trial)}: ${line}`);
      if (!malformed.mentions.test(line)) problems.push(`error line does not match ${malformed.mentions}: ${line}`);
      if (result.stdoutBytes > 0) problems.push(`wrote ${result.stdoutBytes} bytes to stdout before failing`);
      break;
    }
    case 'report': {
      if (result.exitCode !== 1) problems.push(`exit code ${result.exitCode}, expected 1 (problems found)`);
      const extra = nonWarningLines(result, command.cli);
      if (extra.length > 0) problems.push(`stderr has more than warnings: ${JSON.stringify(result.stderr)}`);
      try {
        const report = JSON.parse(result.stdout) as { clean: boolean; problems: Array<{ code: string; message: string }> };
        const found = report.problems.find((problem) => problem.code === expected.problem);
        if (!found) problems.push(`no "${expected.problem}" problem reported: ${result.stdout.slice(0, 500)}`);
        else if (!found.message.includes(fileNamed(trial))) problems.push(`problem does not name ${fileNamed(trial)}: ${found.message}`);
        if (report.clean) problems.push('reported clean');
      } catch {
        problems.push(`stdout is not JSON: ${result.stdout.slice(0, 300)} / stderr ${result.stderr.slice(0, 300)}`);
      }
      break;
    }
    case 'differs': {
      if (result.exitCode !== 1) problems.push(`exit code ${result.exitCode}, expected 1 (different): ${result.stderr}`);
      const extra = nonWarningLines(result, command.cli);
      if (extra.length > 0) problems.push(`stderr has more than warnings: ${JSON.stringify(result.stderr)}`);
      if (!/^\d+ \d+$/m.test(result.stdout)) problems.push(`no ranges printed: ${result.stdout.slice(0, 200)}`);
      problems.push(...checkOutput(trial, result, expected.check));
      break;
    }
    case 'ok': {
      if (result.exitCode !== 0) problems.push(`exit code ${result.exitCode}, expected 0: ${result.stderr}`);
      const extra = nonWarningLines(result, command.cli);
      if (extra.length > 0) problems.push(`stderr has more than warnings: ${JSON.stringify(result.stderr)}`);
      problems.push(...checkOutput(trial, result, expected.check));
      break;
    }
  }
  return problems;
}

/** A folder state without the files a successful run may change. */
function withoutNames(state: Record<string, FileState>, names: string[]): Record<string, FileState> {
  return Object.fromEntries(Object.entries(state).filter(([name]) => !names.includes(name)));
}

function checkOutput(trial: Trial, result: BatchResult, check: OutputCheck | undefined): string[] {
  if (check === undefined) return [];
  if (check === 'warned') {
    const warned = stderrLines(result).some((line) => line.includes('warning') && line.includes(trial.fixture.backingPath));
    return warned ? [] : [`no warning about the changed backing file: ${JSON.stringify(result.stderr)}`];
  }
  if (check === 'raw-cat') {
    const shown = Buffer.from(result.stdoutBase64 ?? '', 'base64');
    return trial.cowBytes && shown.equals(trial.cowBytes) ? [] : ['cat of a file without the COW magic did not print the file as it is'];
  }
  const report = JSON.parse(result.stdout) as { truncated: boolean; backing: { state: string } };
  if (check === 'inspect-truncated') return report.truncated ? [] : ['inspect did not report truncated: true'];
  return report.backing.state !== 'ok' ? [] : ['inspect reported the backing file as ok'];
}

const tally = new Tally();
const failures: string[] = [];

function record(trial: Trial, expected: Expected, problems: string[], via: string): void {
  const column = problems.length > 0 ? 'failed' : expected.kind === 'error' ? 'clean errors' : expected.kind === 'ok' ? 'succeeded' : 'reported';
  const name = trial.command.name;
  tally.add(name, 'inputs');
  tally.add(name, column);
  tally.add(name, via);
  if (problems.length > 0) failures.push(`${name} on ${trial.malformed.name} (${via}): ${problems.join('; ')}`);
}

const batchCases = MALFORMED_CASES.filter((c) => c.group !== 'permission');

describe('every command on every damaged input (CLI main() in one process)', () => {
  let root: string;
  const trials: Trial[] = [];
  let results: BatchResult[] = [];

  beforeAll(async () => {
    ensureBuiltCli();
    root = makeTempDir('ubdcow-hostile-');
    for (const malformed of batchCases) {
      for (const command of COMMANDS) trials.push(prepare(root, malformed, command, 'batch'));
    }
    results = await runBatch(
      trials.map((trial) => ({ argv: trial.command.argv(trial.fixture) })),
      root,
    );
  }, 240_000);

  afterAll(() => {
    if (root) removeTempDir(root);
  });

  for (const malformed of batchCases) {
    describe(`${malformed.name}: ${malformed.description}`, () => {
      for (const command of COMMANDS) {
        const expected = expectedOutcome(command.name, malformed);
        it(`${command.name}: ${expected.kind}`, () => {
          const index = trials.findIndex((t) => t.malformed === malformed && t.command === command);
          const trial = trials[index];
          const problems = judge(trial, results[index], expected);
          record(trial, expected, problems, 'main()');
          expect(problems, `ubdcow ${command.argv(trial.fixture).join(' ')}`).toEqual([]);
        });
      }
    });
  }
});

describe('real ubdcow processes', () => {
  let root: string;
  beforeAll(() => {
    ensureBuiltCli();
    root = makeTempDir('ubdcow-hostile-spawn-');
    // nobody must be able to reach the files (mkdtemp makes the folder private).
    fs.chmodSync(root, 0o755);
  });
  afterAll(() => {
    if (root) removeTempDir(root);
  });

  // One command per input, taking turns, so every input and every command meets a real process.
  batchCases.forEach((malformed, index) => {
    const command = COMMANDS[index % COMMANDS.length];
    const expected = expectedOutcome(command.name, malformed);
    it(`${command.name} on ${malformed.name}: ${expected.kind}`, async () => {
      const trial = prepare(root, malformed, command, 'spawn');
      const result = await runCli(command.argv(trial.fixture), { timeoutMs: 20_000 });
      const problems = judge(trial, result, expected);
      record(trial, expected, problems, 'process');
      expect(problems, `ubdcow ${command.argv(trial.fixture).join(' ')}`).toEqual([]);
    });
  });

  const unreadable = MALFORMED_CASES.find((c) => c.group === 'permission')!;
  const reason = canDropToNobody() ? '' : ' [skipped: needs root and setpriv to run as nobody; root ignores file permissions]';
  if (reason) console.warn(`unreadable COW file tests${reason}`);
  describe.skipIf(reason !== '')(`unreadable COW file, every command run as nobody${reason}`, () => {
    for (const command of COMMANDS) {
      it(`${command.name}: error`, async () => {
        const trial = prepare(root, unreadable, command, 'nobody');
        for (let dir = trial.fixture.dir; dir !== root; dir = path.dirname(dir)) fs.chmodSync(dir, 0o755);
        const result = await runCli(command.argv(trial.fixture), { asNobody: true, timeoutMs: 20_000 });
        const problems = judge(trial, result, { kind: 'error' });
        record(trial, { kind: 'error' }, problems, 'process as nobody');
        expect(problems, `ubdcow ${command.argv(trial.fixture).join(' ')}`).toEqual([]);
      });
    }
  });
});

describe('openCow (library) on every damaged input', () => {
  let root: string;
  beforeAll(() => {
    root = makeTempDir('ubdcow-hostile-lib-');
  });
  afterAll(() => {
    if (root) removeTempDir(root);
  });

  const libraryCommand: CommandUnderTest = { name: 'read', cli: 'openCow', argv: () => [], changesOnSuccess: [] };

  for (const malformed of batchCases) {
    // The truncated data area opens (the kernel does not check the length either); reading it fails.
    const opens = malformed.group === 'data';
    it(`${malformed.name}: ${opens ? 'opens, reading the lost sectors throws' : 'throws'} a UbdcowError naming the file`, async () => {
      const trial = prepare(root, malformed, libraryCommand, 'lib');
      const attempt = (async () => {
        const device = await openCow(trial.fixture.cowPath);
        try {
          if (!opens) return 'opened';
          await device.read(0, DISK_SIZE);
          return 'read everything';
        } finally {
          await device.close();
        }
      })();
      const outcome = await Promise.race([
        attempt.then((value) => ({ value }), (err: unknown) => ({ err })),
        new Promise<{ hung: true }>((resolve) => setTimeout(() => resolve({ hung: true }), 5000)),
      ]);
      const problems: string[] = [];
      if ('hung' in outcome) problems.push('hung');
      else if ('value' in outcome) problems.push(`no error: ${outcome.value}`);
      else if (!(outcome.err instanceof UbdcowError)) problems.push(`threw ${String(outcome.err)}, not a UbdcowError`);
      else {
        const message = outcome.err.message;
        if (message.includes('\n')) problems.push(`message has several lines: ${message}`);
        if (!message.includes(fileNamed(trial))) problems.push(`message does not name ${fileNamed(trial)}: ${message}`);
        if (!malformed.mentions.test(message)) problems.push(`message does not match ${malformed.mentions}: ${message}`);
      }
      const changes = describeChanges(trial.before, folderState(trial.fixture.dir));
      if (changes) problems.push(`files changed:\n${changes}`);
      tally.add('openCow (library)', 'inputs');
      tally.add('openCow (library)', problems.length > 0 ? 'failed' : 'clean errors');
      tally.add('openCow (library)', 'in-process');
      if (problems.length > 0) failures.push(`openCow on ${malformed.name}: ${problems.join('; ')}`);
      expect(problems).toEqual([]);
    });
  }
});

afterAll(() => {
  const columns = ['inputs', 'clean errors', 'reported', 'succeeded', 'failed', 'main()', 'process', 'process as nobody', 'in-process'];
  recordFigures('malformed', {
    title: 'Malformed inputs, every command',
    notes: [
      `${MALFORMED_CASES.length} kinds of damaged input: ${MALFORMED_CASES.map((c) => c.name).join(', ')}.`,
      '"clean errors": exit 1 (2 for diff/check), exactly one stderr line naming the file and the problem, no stack trace, no file changed. ' +
        '"reported": check listed the problem (exit 1) or diff reported differences. "succeeded": the documented success (e.g. inspect reports truncated: true). ' +
        '"main()": run through the CLI entry point in a batch process; "process": a real `node bin/ubdcow` process; "as nobody": the unreadable-file case, run with setpriv as nobody.',
    ],
    rows: tally.rows('command', columns),
    totals: { inputs: tally.total('inputs'), failed: tally.total('failed'), 'real processes': tally.total('process') + tally.total('process as nobody') },
    failures,
  });
});
