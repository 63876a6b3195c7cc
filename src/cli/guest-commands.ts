import type { Argv, ArgumentsCamelCase, CommandModule } from 'yargs';
import { UbdcowError } from '../errors.js';
import type { LsEntry } from '../commands/ls.js';
import { escapeName } from '../guestfs/guest-names.js';
import type { DiffFilesResult } from '../guestfs/diff-files.js';
import { CliExit } from './exit.js';
import { out, toJson, warn } from './format.js';

/*
 * Guest file commands: ls, get, and the handler behind `diff --files`. They answer questions
 * ("what is in there?"), so failing to answer exits 2, as diff and check do; handlers import
 * their modules lazily (start-up speed).
 */

/** Prints a UbdcowError on one line and exits 2 ("could not answer"); anything else is a bug. */
async function answering(command: string, run: () => Promise<void>): Promise<void> {
  try {
    await run();
  } catch (err) {
    if (err instanceof UbdcowError) {
      process.stderr.write(`ubdcow ${command}: ${err.message}\n`);
      if (process.argv.includes('--debug') && err.stack) process.stderr.write(`${err.stack}\n`);
      throw new CliExit(2);
    }
    throw err;
  }
}

export function partitionOption(argv: ArgumentsCamelCase): number | undefined {
  const value = argv.partition;
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new UbdcowError('usage', `--partition is ${String(value)}, expected a partition number from 1`);
  return n;
}

const typeLetter: Record<string, string> = { file: '-', dir: 'd', symlink: 'l', char: 'c', block: 'b', fifo: 'p', socket: 's', unknown: '?' };

function modeString(type: string, mode: number): string {
  const bits = 'rwxrwxrwx'
    .split('')
    .map((letter, i) => (mode & (0o400 >> i) ? letter : '-'));
  if (mode & 0o4000) bits[2] = bits[2] === 'x' ? 's' : 'S';
  if (mode & 0o2000) bits[5] = bits[5] === 'x' ? 's' : 'S';
  if (mode & 0o1000) bits[8] = bits[8] === 'x' ? 't' : 'T';
  return `${typeLetter[type] ?? '?'}${bits.join('')}`;
}

/** A name for the terminal: its exact bytes (base64 in `*Bytes` when not UTF-8), escaped as guest-names.ts says. */
function shownName(text: string, base64: string | undefined): string {
  return escapeName(base64 === undefined ? Buffer.from(text, 'utf8') : Buffer.from(base64, 'base64'));
}

function longLine(entry: LsEntry, name: string): string {
  const time = new Date(entry.mtime * 1000).toISOString().replace('T', ' ').slice(0, 19);
  const target = entry.target === undefined ? '' : ` -> ${shownName(entry.target, entry.targetBytes)}`;
  return `${modeString(entry.type, entry.mode)} ${String(entry.uid).padStart(5)} ${String(entry.gid).padStart(5)} ${String(entry.size).padStart(12)} ${time} ${name}${target}`;
}

const ls: CommandModule = {
  command: 'ls <image> [path]',
  describe: 'List a directory of the guest file system (ext2/3/4) on a COW or raw image, without booting',
  builder: (y) =>
    y
      .positional('image', { type: 'string', describe: 'COW file (seen through its backing) or raw image', demandOption: true })
      .positional('path', { type: 'string', default: '/', describe: 'Guest directory (or file)' })
      .option('long', { alias: 'l', type: 'boolean', describe: 'Type, mode, uid, gid, size, mtime and symlink target' })
      .option('recursive', { alias: 'R', type: 'boolean', describe: 'Everything below PATH, with full paths' })
      .option('json', { type: 'boolean', describe: 'Print { "entries": [ { path, name, type, mode, uid, gid, size, mtime, target? } ], "errors": [ { path, message } ], "journal"?: { file, transactions, blocks } } (pathBytes/nameBytes/targetBytes: base64 of a name that is not UTF-8; journal: set when a journal needing recovery was replayed in memory)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the COW header' })
      .option('partition', { type: 'number', describe: 'Partition number (MBR or GPT); default: the whole disk, or the only Linux partition' })
      .example('$0 ls vm.cow /etc -l', 'What is in the guest\'s /etc')
      .example('$0 ls vm.cow -R --json', 'Every path in the guest, as JSON')
      .epilogue('Read-only: neither the image nor its backing file is ever written. Names are printed with control characters and bytes that are not UTF-8 as \\ooo octal escapes (\\\\ for a backslash), as GNU ls -b does; PATH may be given that way too. Exit codes: 0 listed, 2 could not answer (or some entries could not be listed: each one is named on stderr, the rest is listed).'),
  handler: (argv) =>
    answering('ls', async () => {
      const { listGuest } = await import('../commands/ls.js');
      const { withEscapedRetry } = await import('./guest-path-argument.js');
      const result = await withEscapedRetry(String(argv.path ?? '/'), (path) =>
        listGuest(String(argv.image), path, {
          recursive: Boolean(argv.recursive),
          backing: argv.backing as string | undefined,
          partition: partitionOption(argv),
        }),
      );
      warn('ls', result.warnings);
      if (argv.json) {
        out(toJson({ entries: result.entries, errors: result.errors, ...(result.journal ? { journal: result.journal } : {}) }));
      } else {
        const lines = result.entries.map((entry) => {
          const name = argv.recursive ? shownName(entry.path, entry.pathBytes) : shownName(entry.name, entry.nameBytes);
          return argv.long ? longLine(entry, name) : name;
        });
        if (lines.length > 0) out(lines.join('\n'));
      }
      // Every entry that could be listed was; the ones that could not make the answer incomplete.
      for (const problem of result.errors) process.stderr.write(`ubdcow ls: ${problem.message}\n`);
      if (result.errors.length > 0) throw new CliExit(2);
    }),
};

const get: CommandModule = {
  command: 'get <image> <path>',
  describe: 'Copy a guest file\'s bytes (ext2/3/4) from a COW or raw image to stdout or a file, without booting',
  builder: (y) =>
    y
      .positional('image', { type: 'string', describe: 'COW file (seen through its backing) or raw image', demandOption: true })
      .positional('path', { type: 'string', describe: 'Guest file (symlinks are followed inside the guest)', demandOption: true })
      .option('out', { alias: 'o', type: 'string', describe: 'Write to this new file instead of stdout (holes in the guest file stay holes)' })
      .option('force', { alias: 'f', type: 'boolean', describe: 'With -o/--out: replace an existing file' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the COW header' })
      .option('partition', { type: 'number', describe: 'Partition number (MBR or GPT); default: the whole disk, or the only Linux partition' })
      .example('$0 get vm.cow /etc/hostname', 'Print a guest file')
      .example('$0 get vm.cow /var/log/syslog -o syslog', 'Copy it out')
      .epilogue('Read-only: neither the image nor its backing file is ever written. A PATH with bytes that are not UTF-8 is taken as the shell passed it, or in the \\ooo spelling ls prints. --output stays the global format option (get has no JSON output, so --output=json is refused). Exit codes: 0 copied, 2 could not answer.'),
  handler: (argv) =>
    answering('get', async () => {
      const image = String(argv.image);
      const options = {
        backing: argv.backing as string | undefined,
        partition: partitionOption(argv),
        onWarning: (warning: string) => warn('get', [warning]),
      };
      const { guestPathArgument, withEscapedRetry } = await import('./guest-path-argument.js');
      if (argv.out !== undefined) {
        const { getGuestFileTo } = await import('../commands/get.js');
        await withEscapedRetry(String(argv.path), (guestPath) => getGuestFileTo(image, guestPath, String(argv.out), Boolean(argv.force), options));
        return;
      }
      const { getGuestFile } = await import('../commands/get.js');
      const { streamToStdout } = await import('./commands/cat.js');
      // With `\` in it, resolve before the first byte goes out, so a retry with the escaped spelling
      // writes nothing twice.
      const typed = String(argv.path);
      const guestPath = !typed.includes('\\') ? guestPathArgument(typed) : await withEscapedRetry(typed, async (path) => {
        const { openGuestFs } = await import('../guestfs/guest-fs.js');
        const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
        try {
          await guest.resolve(path, true);
          return path;
        } finally {
          await guest.close();
        }
      });
      await streamToStdout(getGuestFile(image, guestPath, options));
    }),
};

export const guestCommands: CommandModule[] = [ls, get];

/** The options `diff` gains for `--files`; the diff builder calls this (one line). */
export function fileDiffOptions<T>(y: Argv<T>): Argv<T> {
  return y
    .option('files', { type: 'boolean', describe: 'Compare guest files (ext2/3/4) instead of sectors: paths added, removed, modified' })
    .option('checksum', { type: 'boolean', describe: 'With --files: a SHA-256 of both sides of each changed file' })
    .option('times', { type: 'boolean', describe: 'With --files: report atime and ctime changes too' })
    .option('deep', { type: 'boolean', describe: 'With --files: compare every file, not only those the COW allocation points at' })
    .option('partition', { type: 'number', describe: 'With --files: partition number (MBR or GPT)' })
    .check((argv) => {
      for (const option of ['checksum', 'times', 'deep', 'partition']) {
        if (argv[option] !== undefined && !argv.files) throw new UbdcowError('usage', `--${option} only applies with --files (see --help)`);
      }
      return true;
    })
    .conflicts('files', ['stat', 'sectors', 'allocated']);
}

function formatChanges(result: DiffFilesResult): string {
  const sign = { added: '+', removed: '-', modified: 'M' } as const;
  return result.changes.map((c) => `${sign[c.change]} ${shownName(c.path, c.pathBytes)}${c.what.length ? `  (${c.what.join(', ')})` : ''}${c.sha256?.a ? `  sha256 ${c.sha256.a}` : ''}`).join('\n');
}

/** `diff --files A [B]`: exit 0 no file changes, 1 changes, 2 could not answer. */
export async function diffFilesCommand(argv: ArgumentsCamelCase): Promise<void> {
  await answering('diff', async () => {
    const { diffFiles } = await import('../guestfs/diff-files.js');
    const result = await diffFiles(String(argv.a), argv.b === undefined ? undefined : String(argv.b), {
      backingA: argv['backing-a'] as string | undefined,
      backingB: argv['backing-b'] as string | undefined,
      partition: partitionOption(argv),
      times: Boolean(argv.times),
      checksum: Boolean(argv.checksum),
      deep: Boolean(argv.deep),
    });
    warn('diff', result.warnings);
    if (argv.json) out(toJson({ a: result.a, b: result.b, mode: result.mode, changes: result.changes, ...(result.journal.length > 0 ? { journal: result.journal } : {}) }));
    else if (result.changes.length > 0) out(formatChanges(result));
    // An answer ("changed"), not a failure: CliExit is not a UbdcowError, so it passes through.
    if (result.changes.length > 0) throw new CliExit(1);
  });
}
