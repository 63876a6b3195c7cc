import type { CommandModule } from 'yargs';
import { out, toJson, warn } from '../format.js';

/* `ubdcow rebase`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const rebaseCommand: CommandModule = {
  command: 'rebase <cow> <new-backing>',
  describe: 'Point a COW file at a moved or copied backing file (size and mtime must match the header)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .positional('new-backing', { type: 'string', describe: 'The backing file\'s new location', demandOption: true })
      .option('unsafe', { alias: 'u', type: 'boolean', describe: 'Skip the size and mtime checks' })
      .option('compare', { type: 'boolean', describe: 'Also compare the contents of the old and new backing files when both exist' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 rebase vm1.cow /srv/images/base.img', 'After moving base.img (keep its mtime: mv, cp -p, rsync -t)'),
  handler: async (argv) => {
    const { rebaseCow } = await import('../../commands/rebase.js');
    const result = await rebaseCow(String(argv.cow), String(argv['new-backing']), {
      unsafe: Boolean(argv.unsafe),
      compare: Boolean(argv.compare),
    });
    if (argv.json) {
      out(toJson(result));
      return;
    }
    warn('rebase', result.overridden.map((what) => `${what} (overridden by --unsafe)`));
    if (result.comparison && !result.comparison.compared) warn('rebase', [`not compared: ${result.comparison.reason}`]);
    const compared = result.comparison?.compared ? (result.comparison.equal ? ' (contents compared: equal)' : ' (contents differ)') : '';
    out(`rebased ${result.file}: ${result.oldBacking} -> ${result.newBacking}${compared}`);
  },
};
