import type { CommandModule } from 'yargs';
import { parseByteCount } from '../format.js';

/* `ubdcow read`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

function ignoreBrokenPipe(): void {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
}

export const readCommand: CommandModule = {
  command: 'read <cow>',
  describe: 'Read bytes of the virtual disk through the I/O engine to stdout',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('offset', { type: 'string', default: '0', describe: 'Byte offset (K, M, G suffixes allowed)' })
      .option('length', { type: 'string', describe: 'Bytes to read (default: to the end of the disk)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the header' })
      .example('$0 read vm.cow --offset 1M --length 512 | xxd', 'Dump one sector'),
  handler: async (argv) => {
    const { readThroughEngine, streamSink } = await import('../../commands/engine-io.js');
    ignoreBrokenPipe();
    await readThroughEngine(String(argv.cow), streamSink(process.stdout), {
      offset: parseByteCount('offset', String(argv.offset)),
      length: argv.length === undefined ? undefined : parseByteCount('length', String(argv.length)),
      backing: argv.backing as string | undefined,
    });
  },
};
