import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import yargs, { type Argv, type CommandModule } from 'yargs';
import { UbdcowError, oneLine, usageError } from '../errors.js';
import { commands } from './registry.js';
import { CliExit } from './exit.js';
import { quietOnBrokenPipe } from './broken-pipe.js';
import { setQuiet } from './format.js';

/** Options every command takes (yargs adds help and version itself). */
const globalOptions = ['debug', 'quiet', 'q', 'output', 'help', 'h', 'version', 'V'];

function commandName(argv: string[]): string {
  const first = argv.find((arg) => !arg.startsWith('-')) ?? 'ubdcow';
  return commands.find((command) => commandAliases(command).includes(first)) ? canonicalName(first) : first;
}

function commandAliases(command: CommandModule): string[] {
  const names = [String(command.command).split(' ')[0]];
  const aliases = command.aliases === undefined ? [] : Array.isArray(command.aliases) ? command.aliases : [command.aliases];
  return [...names, ...aliases.map(String)];
}

function canonicalName(name: string): string {
  const command = commands.find((c) => commandAliases(c).includes(name));
  return command ? commandAliases(command)[0] : name;
}

/** Commands whose exit code 1 means an answer ("different", "problems"), so errors use 2. */
const answerCommands = new Set(['diff', 'check']);

export function errorExitCode(command: string): number {
  return answerCommands.has(command) ? 2 : 1;
}

function reportError(command: string, err: unknown, debug: boolean): number {
  const prefix = command === 'ubdcow' ? 'ubdcow' : `ubdcow ${command}`;
  if (err instanceof UbdcowError) {
    process.stderr.write(`${prefix}: ${err.message}\n`);
    if (debug && err.stack) process.stderr.write(`${err.stack}\n`);
  } else {
    const message = oneLine(err instanceof Error ? err.message : String(err));
    process.stderr.write(`${prefix}: internal error: ${message} (run with --debug for details)\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
  }
  return errorExitCode(command);
}

interface DeclaredOptions {
  key: Record<string, unknown>;
  alias: Record<string, string[]>;
}

/** The options a command's builder declares, found by running it on a probe parser. */
function declaredOptions(command: CommandModule): DeclaredOptions {
  const probe = yargs([]);
  if (typeof command.builder === 'function') command.builder(probe);
  else if (command.builder) probe.options(command.builder);
  return (probe as unknown as { getOptions(): DeclaredOptions }).getOptions();
}

/** Every option name a command accepts: its own, their aliases, and the global ones. */
function knownOptions(command: CommandModule): Set<string> {
  const options = declaredOptions(command);
  const names = new Set<string>(globalOptions);
  for (const key of Object.keys(options.key)) names.add(key);
  for (const [key, aliases] of Object.entries(options.alias)) {
    names.add(key);
    for (const alias of aliases) names.add(alias);
  }
  return names;
}

/** True when the command declares an `output` of its own (get's -o FILE): then it is not the format. */
function declaresOwnOutput(command: CommandModule): boolean {
  return Object.prototype.hasOwnProperty.call(declaredOptions(command).key, 'output');
}

/**
 * yargs checks positional counts before unknown options, so `check --bogus vm.cow` would be
 * reported as a missing argument (the unknown option swallowed the file name): name it instead.
 */
function unknownOption(argv: string[]): string | undefined {
  const name = commandName(argv);
  const command = commands.find((c) => commandAliases(c)[0] === name);
  if (!command) return undefined;
  const known = knownOptions(command);
  for (const arg of argv) {
    if (arg === '--') break;
    const match = /^--?(?:no-)?([^=]+)/.exec(arg);
    if (!match || arg === '-') continue;
    const option = arg.startsWith('--') ? match[1] : arg.slice(1, 2);
    const camel = option.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
    if (!known.has(option) && !known.has(camel) && !/^-\d/.test(arg)) return arg.split('=')[0];
  }
  return undefined;
}

/**
 * yargs asks for the working directory, which fails when its path is longer than PATH_MAX; the
 * commands work there all the same (relative opens do not need the path), so give yargs a stand-in.
 */
function workingDirectoryOrRoot(): string {
  try {
    return process.cwd();
  } catch {
    return '/';
  }
}

/**
 * The version in our package.json. yargs would look for the package.json above its own file,
 * which is not ours once the program is bundled (scripts/bundle-cli.mjs).
 */
function packageVersion(): string {
  try {
    const file = fileURLToPath(new URL('../../package.json', import.meta.url));
    return String(JSON.parse(fs.readFileSync(file, 'utf8')).version);
  } catch {
    return 'unknown';
  }
}

export function buildParser(argv: string[]): Argv {
  let parser = yargs(argv, workingDirectoryOrRoot())
    .scriptName('ubdcow')
    .usage('$0 <command> [options]\n\nCopy-on-write disk images in the User-Mode Linux ubd format.')
    .option('debug', { type: 'boolean', describe: 'Show stack traces on errors', global: true })
    .option('quiet', { alias: 'q', type: 'boolean', describe: 'No warnings or confirmations; errors and requested data still print', global: true })
    .option('output', {
      type: 'string',
      describe: 'Output format: human or json (--output=json is --json, as in qemu-img)',
      global: true,
    })
    .middleware((args) => {
      setQuiet(Boolean(args.quiet));
      if (args.output === undefined) return;
      const name = canonicalName(String(args._[0] ?? ''));
      const command = commands.find((c) => commandAliases(c)[0] === name);
      // A command with its own --output (get -o FILE) means a file by it, not a format.
      if (command && declaresOwnOutput(command)) return;
      if (args.output !== 'human' && args.output !== 'json') {
        throw usageError(`--output is ${JSON.stringify(args.output)}, expected human or json`);
      }
      if (args.output === 'json') {
        if (command && !knownOptions(command).has('json')) {
          throw usageError(`--output=json: ${name} has no JSON output (see ubdcow ${name} --help)`);
        }
        args.json = true;
      }
    }, true)
    .strict()
    .demandCommand(1, 'name a command')
    .recommendCommands()
    .completion('completion', 'Print a bash/zsh completion script (source it from your shell profile)')
    .help()
    .alias('h', 'help')
    .version(packageVersion())
    .alias('V', 'version')
    // yargs lays out the whole help text on every command run (to cache it); word-wrapping it
    // costs ~20 ms of start-up, so only help output is wrapped.
    .wrap(wantsHelp(argv) ? Math.min(100, process.stdout.columns || 100) : null)
    .epilogue(
      'Exit codes: 0 success; 1 failure (diff: images differ; check: problems found); 2 diff/check could not answer. ' +
        'JSON output (--json or --output=json) carries "schemaVersion"; fields are listed in the README.',
    )
    .fail((message, err) => {
      if (err) throw err;
      const unknown = unknownOption(argv);
      if (unknown) throw usageError(`unknown option ${unknown} (see ubdcow ${commandName(argv)} --help)`);
      throw usageError(`${message} (see --help)`);
    });
  for (const command of commands) parser = parser.command(command);
  skipHelpCaching(parser);
  return parser;
}

/**
 * yargs lays out the whole help text (every command, option and word width) as each command's
 * handler starts, kept for a failure that shows help. Ours never do (.fail above throws, with no
 * help), so the text is never printed; laying it out cost ~15 ms of every command's start-up.
 * An internal of yargs: where a future yargs lacks it, nothing changes.
 */
function skipHelpCaching(parser: Argv): void {
  type Usage = { cacheHelpMessage?: () => void };
  const internal = parser as unknown as { getInternalMethods?: () => { getUsageInstance?: () => Usage | undefined } };
  const usage = internal.getInternalMethods?.()?.getUsageInstance?.();
  if (usage && typeof usage.cacheHelpMessage === 'function') usage.cacheHelpMessage = () => undefined;
}

/** True when yargs may print help: -h/--help, or `ubdcow help`/`ubdcow` alone. */
function wantsHelp(argv: string[]): boolean {
  return argv.length === 0 || argv.some((arg) => arg === '--help' || arg === '-h' || arg === 'help');
}

export async function main(argv: string[]): Promise<void> {
  const command = commandName(argv);
  const debug = argv.includes('--debug');
  // ls and get answer questions too (their failures exit 2, guest-commands.ts): so does a stdout error.
  quietOnBrokenPipe(command === 'ls' || command === 'get' ? 2 : errorExitCode(command));
  try {
    await buildParser(argv).parseAsync();
  } catch (err) {
    if (err instanceof CliExit) {
      process.exitCode = err.exitCode;
      return;
    }
    process.exitCode = reportError(command, err, debug);
  }
}
