import type { CommandModule } from 'yargs';
import { formatBytes, out, toJson, warn } from '../format.js';

/* `ubdcow create`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const createCommand: CommandModule = {
  command: 'create <cow> <backing>',
  describe: 'Create a COW file over a backing file (what uml_mkcow writes, byte for byte)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file to create', demandOption: true })
      .positional('backing', { type: 'string', describe: 'Backing file or block device (read-only)', demandOption: true })
      .option('force', { alias: 'f', type: 'boolean', describe: 'Overwrite an existing COW file' })
      .option('sector-size', { type: 'number', default: 512, describe: 'Sector size in bytes (the kernel assumes 512)' })
      .option('alignment', { type: 'number', default: 4096, describe: 'Alignment of bitmap and data area in bytes' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 create vm1.cow base.img', 'New empty COW over base.img'),
  handler: async (argv) => {
    const { createCow } = await import('../../commands/create.js');
    const result = await createCow(String(argv.cow), String(argv.backing), {
      force: Boolean(argv.force),
      sectorSize: argv['sector-size'] as number,
      alignment: argv.alignment as number,
    });
    warn('create', result.warnings);
    if (argv.json) {
      out(toJson({ file: result.path, ...result.header, ...result.geometry }));
    } else {
      out(`created ${result.path}: ${formatBytes(result.header.size)} over ${result.header.backingFile}`);
    }
  },
};
