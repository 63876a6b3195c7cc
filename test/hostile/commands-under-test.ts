/**
 * Every CLI command as the hostile-input tests run it, and what each is documented to do with
 * each kind of damaged input: fail with one line (exit 1, or 2 for diff/check), report the problem
 * as its answer (check: exit 1 with the problem listed; diff: exit 1 "different"), or succeed.
 */
import type { Fixture, MalformedCase } from './malformed-cases.js';
import { WRITE_OFFSET } from './malformed-cases.js';

export type CommandName =
  | 'inspect'
  | 'commit-new'
  | 'commit-in-place'
  | 'diff'
  | 'map'
  | 'check'
  | 'rebase'
  | 'cat'
  | 'read'
  | 'write';

export interface CommandUnderTest {
  name: CommandName;
  /** The yargs command, which prefixes error lines (`ubdcow <cli>: ...`). */
  cli: string;
  argv(fixture: Fixture): string[];
  /** Files a successful run may change (for the "nothing modified" check). */
  changesOnSuccess: Array<'cow' | 'backing' | 'out'>;
}

export const COMMANDS: CommandUnderTest[] = [
  { name: 'inspect', cli: 'inspect', argv: (f) => ['inspect', f.cowPath, '--json'], changesOnSuccess: [] },
  { name: 'commit-new', cli: 'commit', argv: (f) => ['commit', f.cowPath, f.out], changesOnSuccess: ['out'] },
  { name: 'commit-in-place', cli: 'commit', argv: (f) => ['commit', f.cowPath], changesOnSuccess: ['cow', 'backing'] },
  { name: 'diff', cli: 'diff', argv: (f) => ['diff', f.cowPath], changesOnSuccess: [] },
  { name: 'map', cli: 'map', argv: (f) => ['map', f.cowPath, '--json'], changesOnSuccess: [] },
  { name: 'check', cli: 'check', argv: (f) => ['check', f.cowPath, '--json'], changesOnSuccess: [] },
  { name: 'rebase', cli: 'rebase', argv: (f) => ['rebase', f.cowPath, f.backingPath], changesOnSuccess: ['cow'] },
  { name: 'cat', cli: 'cat', argv: (f) => ['cat', f.cowPath], changesOnSuccess: [] },
  { name: 'read', cli: 'read', argv: (f) => ['read', f.cowPath], changesOnSuccess: [] },
  {
    name: 'write',
    cli: 'write',
    argv: (f) => ['write', f.cowPath, '--offset', String(WRITE_OFFSET), '--file', f.dataFile],
    changesOnSuccess: ['cow'],
  },
];

export type Expected =
  /** Exit 1 (2 for diff/check), exactly one stderr line naming the file and the problem, nothing changed. */
  | { kind: 'error' }
  /** check's answer: exit 1, the problem listed in its JSON, no error line, nothing changed. */
  | { kind: 'report'; problem: string }
  /** diff's answer: exit 1, ranges printed (warnings allowed), nothing changed. */
  | { kind: 'differs'; check?: 'warned' }
  /** Exit 0 (warnings allowed); `check` says what the output must show. */
  | { kind: 'ok'; check?: OutputCheck };

/** What a successful run's output must show. */
export type OutputCheck = 'inspect-truncated' | 'inspect-backing-state' | 'raw-cat' | 'warned';

const error: Expected = { kind: 'error' };

/** The documented behaviour of `command` on input `c`. */
export function expectedOutcome(command: CommandName, c: MalformedCase): Expected {
  const { group, name } = c;
  if (group === 'not-a-file' || group === 'permission') return error;
  switch (command) {
    case 'inspect':
      if (group === 'header') return error;
      return { kind: 'ok', check: group === 'data' ? 'inspect-truncated' : 'inspect-backing-state' };
    case 'map':
      // map reads only the header and bitmap: a truncated data area or a bad backing file does not stop it.
      return group === 'header' ? error : { kind: 'ok' };
    case 'check':
      // A file too short to hold its bitmap is reported as truncated; other header damage as a header problem.
      if (group === 'header') return { kind: 'report', problem: /file length/.test(c.mentions.source) ? 'truncated' : 'header' };
      if (group === 'data') return { kind: 'report', problem: 'truncated' };
      return {
        kind: 'report',
        problem: {
          'backing-missing': 'backing-missing',
          'backing-directory': 'backing-not-a-file',
          'backing-fifo': 'backing-not-a-file',
          'backing-shorter': 'backing-size',
          'backing-longer': 'backing-size',
          'backing-mtime': 'backing-mtime',
        }[name]!,
      };
    case 'diff':
      // Compares with the backing file as it is (with a warning) when only its size or mtime changed.
      // A shorter backing file fails it: the last sector's old contents are needed and missing.
      if (name === 'backing-longer' || name === 'backing-mtime') return { kind: 'differs', check: 'warned' };
      return error;
    case 'cat':
      // cat shows raw images as they are: without the COW magic a file is a raw image.
      if (name === 'bad-magic' || name === 'empty') return { kind: 'ok', check: 'raw-cat' };
      // A changed backing file is read as it is, with a warning; the sector a shorter one lacks
      // is allocated in the fixture's COW, so nothing is missing.
      if (group === 'backing-changed') return { kind: 'ok', check: 'warned' };
      return error;
    case 'rebase':
      // Rebasing only rewrites the header's path: a truncated data area does not stop it.
      return group === 'data' ? { kind: 'ok' } : error;
    case 'write':
      // A write lands in the data area (extending the file): nothing is lost by it.
      return group === 'data' ? { kind: 'ok' } : error;
    case 'read':
      // One backing policy for every reader (issue 19): read does what cat does (see there).
      if (group === 'backing-changed') return { kind: 'ok', check: 'warned' };
      return error;
    case 'commit-new':
    case 'commit-in-place':
      return error;
  }
}
