import yargs, { type Argv } from 'yargs';
import { UbdcowError, oneLine, usageError } from '../errors.js';
import { commands } from './registry.js';
import { CliExit } from './exit.js';
import { quietOnBrokenPipe } from './broken-pipe.js';

function commandName(argv: string[]): string {
  return argv.find((arg) => !arg.startsWith('-')) ?? 'ubdcow';
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

export function buildParser(argv: string[]): Argv {
  let parser = yargs(argv)
    .scriptName('ubdcow')
    .usage('$0 <command> [options]\n\nCopy-on-write disk images in the User-Mode Linux ubd format.')
    .option('debug', { type: 'boolean', describe: 'Show stack traces on errors', global: true })
    .strict()
    .demandCommand(1, 'name a command')
    .recommendCommands()
    .help()
    .alias('h', 'help')
    .version()
    .wrap(Math.min(100, process.stdout.columns || 100))
    .epilogue('Exit codes: 0 success; 1 failure (diff: images differ; check: problems found); 2 diff/check could not answer.')
    .fail((message, err) => {
      if (err) throw err;
      throw usageError(`${message} (see --help)`);
    });
  for (const command of commands) parser = parser.command(command);
  return parser;
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
