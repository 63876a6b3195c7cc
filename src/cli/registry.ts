import type { CommandModule } from 'yargs';
import { catCommand } from './commands/cat.js';
import { checkCommand } from './commands/check.js';
import { commitCommand } from './commands/commit.js';
import { createCommand } from './commands/create.js';
import { demoCommand } from './commands/demo.js';
import { diffCommand } from './commands/diff.js';
import { inspectCommand } from './commands/inspect.js';
import { mapCommand } from './commands/map.js';
import { readCommand } from './commands/read.js';
import { rebaseCommand } from './commands/rebase.js';
import { sparsifyCommand } from './commands/sparsify.js';
import { writeCommand } from './commands/write.js';
import { nbdCommands } from './nbd-commands.js';
import { guestCommands } from './guest-commands.js';
import { customizeCommand } from './customize-command.js';

/*
 * Every CLI command, in the order `ubdcow --help` lists them: one module per command under
 * commands/ (or a file exporting a CommandModule[] of a few). Adding a command is one import and
 * one entry here. Modules load their library code lazily in their handlers, so this list costs
 * nothing at start-up but the yargs definitions.
 */
export const commands: CommandModule[] = [
  createCommand,
  inspectCommand,
  diffCommand,
  mapCommand,
  catCommand,
  commitCommand,
  checkCommand,
  rebaseCommand,
  sparsifyCommand,
  readCommand,
  writeCommand,
  demoCommand,
  ...nbdCommands,
  ...guestCommands,
  customizeCommand,
];
