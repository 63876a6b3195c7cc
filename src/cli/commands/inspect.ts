import type { CommandModule } from 'yargs';
import { formatBytes, formatTable, out, toJson, warn } from '../format.js';

/* `ubdcow inspect`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const inspectCommand: CommandModule = {
  command: 'inspect <cow>',
  describe: 'Show a COW file\'s header, layout, allocation and backing state',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('json', { type: 'boolean', describe: 'Print one JSON object (fields in README)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Check this backing file instead of the one in the header' })
      .example('$0 inspect vm1.cow --json', 'Machine-readable report'),
  handler: async (argv) => {
    const { inspectCow } = await import('../../commands/inspect.js');
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
