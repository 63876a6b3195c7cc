import type { CommandModule } from 'yargs';
import { CliExit } from '../exit.js';
import { out, toJson, warn } from '../format.js';

/* `ubdcow check`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const checkCommand: CommandModule = {
  command: 'check <cow>',
  describe: 'Check a COW file: header, length, stray bitmap bits, backing file (exit 0 clean, 1 problems, 2 could not check)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('repair', { type: 'boolean', describe: 'Clear bitmap bits set past the last sector (nothing else is changed)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Check this backing file instead of the header\'s' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 check vm1.cow', 'Report problems; exit status 1 if there are any')
      .example('$0 check --repair vm1.cow', 'Also fix what can be fixed safely'),
  handler: async (argv) => {
    const { checkCow } = await import('../../commands/check.js');
    const result = await checkCow(String(argv.cow), {
      repair: Boolean(argv.repair),
      backing: argv.backing as string | undefined,
    });
    if (argv.json) {
      out(toJson(result));
    } else {
      warn('check', result.warnings);
      if (result.inUse) warn('check', [`${result.file}: in use by a running UML (locked); what was read may already have changed`]);
      for (const problem of result.problems) {
        const note = problem.repaired ? ' [repaired]' : problem.repairable ? ' [repairable with --repair]' : '';
        out(`problem: ${problem.message}${note}`);
      }
      for (const action of result.repaired) out(`repaired: ${action}`);
      if (result.clean) out(`${result.file}: ${result.repaired.length > 0 ? 'clean after repair' : 'clean'}`);
      else out(`${result.file}: ${result.problems.filter((problem) => !problem.repaired).length} problem(s)`);
    }
    if (!result.clean) throw new CliExit(1);
  },
};
