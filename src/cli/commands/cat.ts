import type { CommandModule } from 'yargs';
import { type SystemErrorCode, UbdcowError, usageError } from '../../errors.js';
import { parseByteCount, warn } from '../format.js';
import { sparseTarget } from '../sparse-stdout.js';

/* `ubdcow cat`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

/** Writes chunks to stdout, waiting for it to drain; resolves false if the reader went away. */
export async function streamToStdout(chunks: AsyncIterable<Uint8Array>): Promise<boolean> {
  const sparse = sparseTarget(1);
  if (sparse) {
    try {
      for await (const chunk of chunks) sparse.write(chunk);
      sparse.finish();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code as SystemErrorCode | undefined;
      if (err instanceof UbdcowError || !code) throw err;
      throw new UbdcowError(code, `standard output: cannot write: ${(err as Error).message}`);
    }
    return true;
  }
  const stdout = process.stdout;
  let failure: NodeJS.ErrnoException | undefined;
  let wake: (() => void) | undefined;
  const onError = (err: NodeJS.ErrnoException) => {
    failure = err;
    wake?.();
  };
  stdout.on('error', onError);
  const waitFor = (event: 'drain' | 'finish') =>
    new Promise<void>((resolve) => {
      wake = resolve;
      stdout.once(event, resolve);
    }).finally(() => {
      wake = undefined;
    });
  try {
    for await (const chunk of chunks) {
      if (failure) break;
      if (!stdout.write(chunk)) await waitFor('drain');
      if (failure) break;
    }
    if (!failure && stdout.writableLength > 0) await waitFor('drain');
  } finally {
    stdout.off('error', onError);
    // A late EPIPE must not become an uncaught error once we have stopped listening.
    stdout.on('error', () => undefined);
  }
  if (failure && failure.code !== 'EPIPE') {
    throw new UbdcowError((failure.code as SystemErrorCode | undefined) ?? 'io', `standard output: cannot write: ${failure.message}`);
  }
  return !failure;
}

/** A disk image is binary: written to a terminal it garbles the screen (and can send it commands). */
export function refuseTerminal(command: string, image: string): void {
  if (!process.stdout.isTTY) return;
  throw usageError(
    `${image}: refusing to write disk contents to a terminal; redirect them (ubdcow ${command} ${image} > disk.img) or pipe them (| xxd | less)`,
  );
}

export const catCommand: CommandModule = {
  command: 'cat <image>',
  describe: 'Write the virtual disk (a COW seen through its backing file) to standard output',
  builder: (y) =>
    y
      .positional('image', { type: 'string', describe: 'COW file (or raw image)', demandOption: true })
      .option('offset', { type: 'string', describe: 'First byte (e.g. 0, 1M, 0x100000)' })
      .option('length', { type: 'string', describe: 'Number of bytes (default: to the end)' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the header' })
      .example('$0 cat vm1.cow | md5sum', 'Checksum of the disk the guest sees')
      .example('$0 cat vm1.cow --offset 1M --length 4K | xxd', 'Look at 4 KiB'),
  handler: async (argv) => {
    refuseTerminal('cat', String(argv.image));
    const { catImage } = await import('../../commands/cat.js');
    const chunks = catImage(String(argv.image), {
      offset: argv.offset === undefined ? undefined : parseByteCount('offset', String(argv.offset)),
      length: argv.length === undefined ? undefined : parseByteCount('length', String(argv.length)),
      backing: argv.backing as string | undefined,
      onWarning: (warning) => warn('cat', [warning]),
    });
    await streamToStdout(chunks);
  },
};
