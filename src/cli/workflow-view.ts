import type { CommandModule } from 'yargs';
import { UbdcowError } from '../errors.js';
import type { DiffResult } from '../commands/diff.js';
import type { MapResult } from '../commands/map.js';
import { CliExit } from './exit.js';
import { formatBytes, formatTable, out, parseByteCount, toJson, warn } from './format.js';
import { diffFilesCommand, fileDiffOptions } from './guest-commands.js';

/* The read-only workflow commands: diff, map, cat. Handlers import their modules lazily. */




/** Ranges as `offset length` in bytes, or `first-sector sector-count` with `sectors`. */
export function formatDiffRanges(result: DiffResult, sectors: boolean): string {
  return result.ranges
    .map(({ offset, length }) =>
      sectors ? `${offset / result.sectorSize} ${Math.ceil(length / result.sectorSize)}` : `${offset} ${length}`,
    )
    .join('\n');
}

export function formatDiffStat(a: string, b: string | undefined, result: DiffResult): string {
  const size = Math.max(result.sizeA, result.sizeB);
  const verdict = result.identical ? 'identical' : result.mode === 'allocation' ? 'allocated' : 'differing';
  const rows: Array<[string, string | number]> = [
    ['a', a],
    ['b', b ?? (result.mode === 'allocation' ? '(allocation of a)' : '(backing file of a)')],
    ['mode', result.mode],
    [verdict, `${formatBytes(result.differingBytes)} (${result.differingBytes} bytes) in ${result.extents} extents, of ${formatBytes(size)}`],
  ];
  if (result.sizeA !== result.sizeB) rows.push(['sizes', `a ${result.sizeA} bytes, b ${result.sizeB} bytes`]);
  return formatTable(rows);
}

function diffJson(a: string, b: string | undefined, result: DiffResult, sectors: boolean): unknown {
  const ranges = sectors
    ? result.ranges.map((range) => ({ ...range, sector: range.offset / result.sectorSize, sectors: Math.ceil(range.length / result.sectorSize) }))
    : result.ranges;
  return { a, b: b ?? null, ...result, ranges };
}

const diff: CommandModule = {
  command: 'diff <a> [b]',
  describe: 'List where two disk images differ, or where a COW differs from its backing file',
  builder: (y) =>
    fileDiffOptions(y)
      .positional('a', { type: 'string', describe: 'COW file or raw image', demandOption: true })
      .positional('b', { type: 'string', describe: 'Second COW file or raw image (omit to compare a COW with its backing)' })
      .option('json', { type: 'boolean', describe: 'Print one JSON object' })
      .option('stat', { type: 'boolean', describe: 'Print a summary (bytes and extents) instead of the ranges' })
      .option('sectors', { type: 'boolean', describe: 'Print ranges as first sector and sector count' })
      .option('allocated', { type: 'boolean', describe: 'One COW: list allocated sectors instead of comparing with the backing' })
      .option('backing-a', { type: 'string', describe: 'Backing file for a, instead of the one in its header' })
      .option('backing-b', { type: 'string', describe: 'Backing file for b, instead of the one in its header' })
      .example('$0 diff vm1.cow', 'Sectors vm1.cow changed relative to its backing file')
      .example('$0 diff vm1.cow vm2.cow --stat', 'How much two COWs over one backing differ')
      .epilogue(
        'Ranges are sector-aligned byte ranges, merged when adjacent. If the disks differ in size, ' +
          'everything from the sector holding the end of the smaller one counts as different. ' +
          'Exit codes: 0 identical, 1 different, 2 could not compare.',
      ),
  handler: async (argv) => {
    if (argv.files) return diffFilesCommand(argv);
    const { diffImages } = await import('../commands/diff.js');
    const a = String(argv.a);
    const b = argv.b === undefined ? undefined : String(argv.b);
    const result = await diffImages(a, b, {
      allocated: Boolean(argv.allocated),
      backingA: argv['backing-a'] as string | undefined,
      backingB: argv['backing-b'] as string | undefined,
    });
    warn('diff', result.warnings);
    const sectors = Boolean(argv.sectors);
    if (argv.json) out(toJson(diffJson(a, b, result, sectors)));
    else if (argv.stat) out(formatDiffStat(a, b, result));
    else if (result.ranges.length > 0) out(formatDiffRanges(result, sectors));
    if (!result.identical) throw new CliExit(1);
  },
};

/** `%#-16x` as qemu-img prints it: 0 has no 0x prefix. */
function hex(value: number): string {
  return value === 0 ? '0' : `0x${value.toString(16)}`;
}

/** The table `qemu-img map` prints: Offset, Length, Mapped to, File. */
export function formatMapTable(result: MapResult): string {
  const row = (cells: string[]) => cells.map((cell, i) => (i < 3 ? cell.padEnd(16) : cell)).join('');
  const lines = [row(['Offset', 'Length', 'Mapped to', 'File'])];
  for (const extent of result.extents) lines.push(row([hex(extent.offset), hex(extent.length), hex(extent.cowOffset), result.file]));
  return lines.join('\n');
}

const map: CommandModule = {
  command: 'map <cow>',
  describe: 'Show which ranges of the virtual disk a COW holds, and where in the file (like qemu-img map)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('json', { type: 'boolean', describe: 'Print one JSON object: size, allocatedBytes, extents [{offset, length, cowOffset}]' })
      .example('$0 map vm1.cow', 'Allocated extents, in bytes (hex)'),
  handler: async (argv) => {
    const { mapCow } = await import('../commands/map.js');
    const result = await mapCow(String(argv.cow));
    out(argv.json ? toJson(result) : formatMapTable(result));
  },
};

/** Writes chunks to stdout, waiting for it to drain; resolves false if the reader went away. */
export async function streamToStdout(chunks: AsyncIterable<Uint8Array>): Promise<boolean> {
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
    throw new UbdcowError(failure.code ?? 'io', `standard output: cannot write: ${failure.message}`);
  }
  return !failure;
}

const cat: CommandModule = {
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
    const { catImage } = await import('../commands/cat.js');
    const chunks = catImage(String(argv.image), {
      offset: argv.offset === undefined ? undefined : parseByteCount('offset', String(argv.offset)),
      length: argv.length === undefined ? undefined : parseByteCount('length', String(argv.length)),
      backing: argv.backing as string | undefined,
      onWarning: (warning) => warn('cat', [warning]),
    });
    await streamToStdout(chunks);
  },
};

export const workflowCommands: CommandModule[] = [diff, map, cat];
