import type { CommandModule } from 'yargs';
import { CliExit } from '../exit.js';
import { toJson } from '../format.js';

/* `ubdcow demo`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const demoCommand: CommandModule = {
  command: 'demo',
  describe: 'Run the whole workflow on the bundled image and print what happened',
  builder: (y) =>
    y
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .option('keep', { type: 'boolean', describe: 'Keep the temporary folder with the COW and merged image (kept anyway when a step fails)' }),
  handler: async (argv) => {
    const { runDemo } = await import('../../commands/demo.js');
    const result = await runDemo(undefined, undefined, { keep: Boolean(argv.keep) });
    if (argv.json) {
      process.stdout.write(`${toJson(result)}\n`);
    } else {
      process.stdout.write(`ubdcow demo on ${result.backing}\nworking in ${result.folder}\n\n`);
      result.steps.forEach((s, i) => process.stdout.write(`${i + 1}. ${s.ok ? 'ok  ' : 'FAIL'} ${s.title}: ${s.detail}\n`));
      process.stdout.write(result.ok ? '\nall steps passed\n' : '\nsome steps FAILED\n');
      const why = !result.ok ? 'a step failed' : 'as asked (--keep)';
      process.stdout.write(result.kept ? `files kept in ${result.folder} (${why})\n` : `temporary folder ${result.folder} removed (--keep keeps it)\n`);
    }
    if (!result.ok) throw new CliExit(1);
  },
};
