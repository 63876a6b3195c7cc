import type { CommandModule } from 'yargs';
import { formatBytes, formatTable, out, toJson, warn } from './format.js';
import { engineCommands } from './engine-commands.js';
import { guestCommands } from './guest-commands.js';
import { workflowCommitCommands } from './workflow-commit.js';
import { workflowCommands } from './workflow-view.js';

/* Handlers import their command modules lazily so `ubdcow --help` stays fast. */



const create: CommandModule = {
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
    const { createCow } = await import('../commands/create.js');
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

const inspect: CommandModule = {
  command: 'inspect <cow>',
  describe: 'Show a COW file\'s header, layout, allocation and backing state',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('json', { type: 'boolean', describe: 'Print one JSON object (fields in README)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Check this backing file instead of the one in the header' })
      .example('$0 inspect vm1.cow --json', 'Machine-readable report'),
  handler: async (argv) => {
    const { inspectCow } = await import('../commands/inspect.js');
    const report = await inspectCow(String(argv.cow), { backing: argv.backing as string | undefined });
    if (argv.json) {
      out(toJson(report));
      return;
    }
    warn('inspect', report.warnings);
    const backing =
      report.backing.state === 'ok' ? 'ok' : `${report.backing.state}${report.backing.problem ? ` (${report.backing.problem})` : ''}`;
    out(
      formatTable([
        ['file', report.file],
        ['format', `version ${report.version} (${report.layout}, ${report.byteOrder})`],
        ['backing file', report.backingFile],
        ['backing state', backing],
        ['backing mtime', `${report.mtime} (${report.mtimeIso})`],
        ['virtual size', `${formatBytes(report.size)} (${report.size} bytes, ${report.sectors} sectors)`],
        ['sector size', report.sectorSize],
        ['alignment', report.alignment],
        ['bitmap', `offset ${report.bitmapOffset}, ${report.bitmapLength} bytes`],
        ['data offset', report.dataOffset],
        [
          'allocated',
          `${report.allocated.sectors} sectors, ${formatBytes(report.allocated.bytes)} (${report.allocated.percent}%) in ${report.extents} extents`,
        ],
        [
          'file size',
          `${formatBytes(report.fileSize)} apparent, ${formatBytes(report.diskUsage)} on disk${report.truncated ? `, TRUNCATED (needs ${report.expectedFileSize})` : ''}`,
        ],
      ]),
    );
  },
};

export const commands: CommandModule[] = [create, inspect, ...workflowCommands, ...workflowCommitCommands, ...engineCommands, ...guestCommands];
