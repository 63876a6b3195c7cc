import * as fs from 'node:fs';
import type { CommandModule } from 'yargs';
import { UbdcowError, fromSystemError } from '../errors.js';
import { CliExit } from './exit.js';
import { refuseTerminal } from './workflow-view.js';
import { note, out, parseByteCount, toJson, warn } from './format.js';

function ignoreBrokenPipe(): void {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
}

const read: CommandModule = {
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
    refuseTerminal('read', String(argv.cow));
    const { readThroughEngine, streamSink } = await import('../commands/engine-io.js');
    ignoreBrokenPipe();
    await readThroughEngine(String(argv.cow), streamSink(process.stdout), {
      offset: parseByteCount('offset', String(argv.offset)),
      length: argv.length === undefined ? undefined : parseByteCount('length', String(argv.length)),
      backing: argv.backing as string | undefined,
      onWarning: (warning) => warn('read', [warning]),
    });
  },
};

const write: CommandModule = {
  command: 'write <cow>',
  describe: 'Write bytes from stdin (or --file) into the virtual disk through the I/O engine',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('offset', { type: 'string', demandOption: true, describe: 'Byte offset (need not be sector-aligned)' })
      .option('file', { alias: 'f', type: 'string', describe: 'Read the data from this file instead of stdin' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the header' })
      .option('sync', { type: 'boolean', describe: 'fdatasync data before bitmap and bitmap before acknowledging (like ubdNs)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('printf hello | $0 write vm.cow --offset 4096', 'Write 5 bytes at 4096')
      .example('$0 write vm.cow --offset 0 --file boot.bin', 'Write a file at the start of the disk'),
  handler: async (argv) => {
    const { writeThroughEngine } = await import('../commands/engine-io.js');
    const file = argv.file as string | undefined;
    let expectedLength: number | undefined;
    if (file !== undefined) {
      const stat = await fs.promises.stat(file).catch((err) => {
        throw fromSystemError(err, file, 'read input file');
      });
      if (!stat.isFile()) throw new UbdcowError('not-a-file', `${file}: is not a regular file, expected the data to write`, { file });
      expectedLength = stat.size;
    }
    const input = file === undefined ? process.stdin : fs.createReadStream(file);
    const result = await writeThroughEngine(String(argv.cow), input, {
      offset: parseByteCount('offset', String(argv.offset)),
      backing: argv.backing as string | undefined,
      sync: Boolean(argv.sync),
      expectedLength,
    });
    if (argv.json) out(toJson(result));
    else note(`wrote ${result.bytes} bytes at offset ${result.offset}`);
  },
};

const demo: CommandModule = {
  command: 'demo',
  describe: 'Run the whole workflow on the bundled image and print what happened',
  builder: (y) =>
    y
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .option('keep', { type: 'boolean', describe: 'Keep the temporary folder with the COW and merged image (kept anyway when a step fails)' }),
  handler: async (argv) => {
    const { runDemo } = await import('../commands/demo.js');
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

export const engineCommands: CommandModule[] = [read, write, demo];
