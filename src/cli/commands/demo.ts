import type { CommandModule } from 'yargs';
import { CliExit } from '../exit.js';
import { toJson } from '../format.js';

/* `ubdcow demo`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const demoCommand: CommandModule = {
  command: 'demo',
  describe: 'Run the whole workflow on the bundled image and print what happened',
  builder: (y) => y.option('json', { type: 'boolean', describe: 'Print the result as JSON' }),
  handler: async (argv) => {
    const { runDemo } = await import('../../commands/demo.js');
    const result = await runDemo();
    if (argv.json) {
      process.stdout.write(`${toJson(result)}\n`);
    } else {
      process.stdout.write(`ubdcow demo on ${result.backing}\nfiles in ${result.folder}\n\n`);
      result.steps.forEach((s, i) => process.stdout.write(`${i + 1}. ${s.ok ? 'ok  ' : 'FAIL'} ${s.title}: ${s.detail}\n`));
      process.stdout.write(result.ok ? '\nall steps passed\n' : '\nsome steps FAILED\n');
    }
    if (!result.ok) throw new CliExit(1);
  },
};
