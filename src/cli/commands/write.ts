import * as fs from 'node:fs';
import type { CommandModule } from 'yargs';
import { fromSystemError, notAFile } from '../../errors.js';
import { note, out, parseByteCount, toJson } from '../format.js';
import { allocationUnitOf, withAllocationUnitOption } from '../allocation-unit-option.js';

/* `ubdcow write`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const writeCommand: CommandModule = {
  command: 'write <cow>',
  describe: 'Write bytes from stdin (or --file) into the virtual disk through the I/O engine',
  builder: (y) =>
    withAllocationUnitOption(y)
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('offset', { type: 'string', demandOption: true, describe: 'Byte offset (need not be sector-aligned)' })
      .option('file', { alias: 'f', type: 'string', describe: 'Read the data from this file instead of stdin' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the header' })
      .option('sync', { type: 'boolean', describe: 'fdatasync data before bitmap and bitmap before acknowledging (like ubdNs)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('printf hello | $0 write vm.cow --offset 4096', 'Write 5 bytes at 4096')
      .example('$0 write vm.cow --offset 0 --file boot.bin', 'Write a file at the start of the disk'),
  handler: async (argv) => {
    const { writeThroughEngine } = await import('../../commands/engine-io.js');
    const file = argv.file as string | undefined;
    let expectedLength: number | undefined;
    if (file !== undefined) {
      const stat = await fs.promises.stat(file).catch((err) => {
        throw fromSystemError(err, file, 'read input file');
      });
      if (!stat.isFile()) throw notAFile(file, 'not a regular file', 'the data to write');
      expectedLength = stat.size;
    }
    const allocationUnit = allocationUnitOf(argv);
    const input = file === undefined ? process.stdin : fs.createReadStream(file);
    const result = await writeThroughEngine(String(argv.cow), input, {
      offset: parseByteCount('offset', String(argv.offset)),
      backing: argv.backing as string | undefined,
      sync: Boolean(argv.sync),
      allocationUnit,
      expectedLength,
    });
    if (argv.json) out(toJson(result));
    else note(`wrote ${result.bytes} bytes at offset ${result.offset}`);
  },
};
