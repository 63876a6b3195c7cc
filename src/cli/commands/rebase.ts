import type { CommandModule } from 'yargs';
import { note, out, toJson, warn } from '../format.js';

/* `ubdcow rebase`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const rebaseCommand: CommandModule = {
  command: 'rebase <cow> <new-backing>',
  describe: 'Point a COW file at a moved or copied backing file (size and mtime must match the header)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .positional('new-backing', { type: 'string', describe: 'The backing file\'s new location', demandOption: true })
      .option('unsafe', { alias: 'u', type: 'boolean', describe: 'Accept a new backing whose mtime differs (its mtime is stored); sizes must still match' })
      .option('compare', { type: 'boolean', describe: 'Compare the old and new backing files\' contents; equal contents accept (and store) a new mtime' })
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
    const acceptedBy = result.comparison?.equal ? 'accepted: contents compared equal' : 'overridden by --unsafe';
    warn('rebase', result.overridden.map((what) => `${what} (${acceptedBy})`));
    if (result.comparison && !result.comparison.compared) warn('rebase', [`not compared: ${result.comparison.reason}`]);
    const compared = result.comparison?.compared ? (result.comparison.equal ? ' (contents compared: equal)' : ' (contents differ)') : '';
    const storedMtime = result.overridden.length > 0 ? `; stored its mtime ${result.mtime}, so UML accepts it` : '';
    note(`rebased ${result.file}: ${result.oldBacking} -> ${result.newBacking}${compared}${storedMtime}`);
  },
};
