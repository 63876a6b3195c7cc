import * as fs from 'node:fs';
import type { ArgumentsCamelCase, Argv, CommandModule } from 'yargs';
import { UbdcowError } from '../errors.js';
import { type CustomizeOperation, OPERATION_NAMES, isOperationName, parseCommandsFile, parseOperation } from '../guestfs/customize-spec.js';
import { note, out, plural, toJson, warn } from './format.js';

/*
 * `ubdcow customize`: arguments, help and output. Operations run in the order given, so they are
 * read from the raw arguments (yargs groups a repeated option's values per option and loses how
 * different options interleave); yargs still declares them for --help and checks their counts.
 */

const help: Record<string, string> = {
  upload: 'HOSTFILE:GUESTPATH  copy a host file in (into GUESTPATH when it is a directory), with its mode and owner',
  'copy-in': 'HOSTPATH:GUESTDIR  copy a host file or tree into an existing guest directory (modes, owners, times, symlinks, hard links)',
  write: 'GUESTFILE:CONTENT  write CONTENT to a guest file (created 0644, or replaced in place)',
  'append-line': 'GUESTFILE:LINE  append LINE and a newline (a missing final newline is added first)',
  mkdir: 'DIR  create a guest directory and its missing parents (0755)',
  delete: 'PATH  remove a guest file or tree (rm -rf: a missing path is fine)',
  move: 'SOURCE:DEST  move or rename inside the guest (into DEST when it is a directory)',
  link: 'TARGET:LINK[:LINK...]  symbolic links to TARGET (ln -sf)',
  chmod: 'PERMISSIONS:PATH  octal mode, e.g. 0755:/usr/local/bin/tool',
  chown: 'UID:GID:PATH  numeric owner and group (0..65535)',
  touch: 'FILE  create an empty file, or set an existing one\'s mtime to now',
  truncate: 'FILE  cut an existing file to zero length',
  hostname: 'NAME  write NAME to /etc/hostname',
  'ssh-inject': 'USER[:file:KEYFILE|:string:KEY]  append a key to ~USER/.ssh/authorized_keys (default: your ~/.ssh/id_*.pub)',
};

/** `--name value` and `--name=value` in argument order, `--commands-from-file` expanded in place. */
export function orderedOperations(args: string[]): CustomizeOperation[] {
  const operations: CustomizeOperation[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === '--') break;
    const match = /^--([a-z-]+)(?:=(.*))?$/s.exec(arg);
    if (!match) continue;
    const name = match[1]!;
    if (!isOperationName(name) && name !== 'commands-from-file') continue;
    let value = match[2];
    if (value === undefined) {
      value = args[i + 1];
      i++;
      if (value === undefined) throw new UbdcowError('usage', `--${name} needs a value (see ubdcow customize --help)`);
    }
    if (name === 'commands-from-file') {
      let text: string;
      try {
        text = fs.readFileSync(value, 'utf8');
      } catch (err) {
        throw new UbdcowError('usage', `--commands-from-file ${value}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`, { file: value });
      }
      operations.push(...parseCommandsFile(text, value));
    } else {
      operations.push(parseOperation(name, value));
    }
  }
  return operations;
}

function declareOperations<T>(y: Argv<T>): Argv<T> {
  let result = y;
  // Not `array`: yargs would then swallow the words after an option (the image name too); a
  // repeated option still collects its values in an array.
  for (const name of OPERATION_NAMES) result = result.option(name, { type: 'string', describe: help[name], group: 'Operations (applied in the order given):' });
  return result.option('commands-from-file', { type: 'string', describe: 'FILE  more operations, one a line ("upload /a:/b"; # comments)', group: 'Operations (applied in the order given):' });
}

/** The paths a step changed, for a terminal: a tree copy is summarised (--json has them all). */
function changedPaths(paths: string[]): string {
  if (paths.length === 0) return '(nothing to do)';
  if (paths.length <= 8) return `-> ${paths.join(' ')}`;
  return `-> ${paths.slice(0, 3).join(' ')} ... (${paths.length} paths)`;
}

function partition(argv: ArgumentsCamelCase): number | undefined {
  if (argv.partition === undefined) return undefined;
  const n = Number(argv.partition);
  if (!Number.isInteger(n) || n < 1) throw new UbdcowError('usage', `--partition is ${String(argv.partition)}, expected a partition number from 1`);
  return n;
}

export const customizeCommand: CommandModule = {
  command: 'customize <image>',
  describe: 'Change guest files (ext2/3/4) in a COW without booting, all or nothing (virt-customize\'s operations)',
  builder: (y) =>
    declareOperations(
      y
        .positional('image', { type: 'string', describe: 'COW file (or a raw image with --in-place)', demandOption: true })
        .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the COW header (never written)' })
        .option('partition', { type: 'number', describe: 'Partition number (MBR or GPT); default: the whole disk, or the only Linux partition' })
        .option('in-place', { type: 'boolean', describe: 'Allow a raw image: change it in place (same journal, same all-or-nothing rule)' })
        .option('dry-run', { type: 'boolean', describe: 'Run every operation on a staged copy and print what would change; change nothing' })
        .option('json', { type: 'boolean', describe: 'Print { image, kind, location, dryRun, steps: [ { operation, paths } ], pagesChanged, recovery, warnings }' }),
    )
      .example('$0 customize vm1.cow --hostname vm1 --ssh-inject root:file:id.pub', 'Per-VM identity on a COW over a shared base')
      .example('$0 customize vm1.cow --mkdir /srv/app --upload app.tar:/srv/app --chmod 0600:/srv/app/app.tar', 'Operations run in the order given')
      .example('$0 customize vm1.cow', 'No operations: finish (or discard) an interrupted run\'s journal')
      .epilogue(
        'All or nothing: the operations run against staged pages; the image changes only after all of them succeeded, through a redo journal (IMAGE.ubdcow-customize) that a later run replays if this one is killed. Refused: a COW a running UML holds, a file system that needs recovery or has errors, features libext2fs cannot write safely.',
      ),
  handler: async (argv) => {
    const operations = orderedOperations(process.argv.slice(2));
    const count = (name: string) => [argv[name] ?? []].flat().length;
    const declared = OPERATION_NAMES.reduce((sum, name) => sum + count(name), 0);
    if (operations.length < declared) throw new UbdcowError('usage', 'could not tell the order of the operations; give each as --name VALUE or --name=VALUE');
    const { customize } = await import('../commands/customize.js');
    const result = await customize(String(argv.image), operations, {
      backing: argv.backing as string | undefined,
      partition: partition(argv),
      inPlace: Boolean(argv['in-place']),
      dryRun: Boolean(argv['dry-run']),
    });
    warn('customize', result.warnings);
    if (argv.json) {
      out(toJson({ ...result }));
      return;
    }
    if (result.recovery === 'replayed') note(`${result.image}: finished an interrupted customize (its journal was replayed)`);
    if (result.recovery === 'discarded') note(`${result.image}: discarded the journal of a customize that died before changing anything`);
    if (operations.length === 0) return;
    for (const step of result.steps) out(`${result.dryRun ? 'would ' : ''}${step.operation}  ${changedPaths(step.paths)}`);
    const pages = plural(result.pagesChanged, '4 KiB page');
    note(result.dryRun ? `dry run: ${result.image} not changed (${pages} would change)` : `customized ${result.image} (${result.location}): ${plural(result.steps.length, 'operation')}, ${pages} changed`);
  },
};
