import type { CommandModule } from 'yargs';
import type { DiffResult } from '../../commands/diff.js';
import { CliExit } from '../exit.js';
import { diffFilesCommand, fileDiffOptions } from '../guest-commands.js';
import { formatBytes, formatTable, out, toJson, warn } from '../format.js';

/* `ubdcow diff`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

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

export const diffCommand: CommandModule = {
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
    const { diffImages } = await import('../../commands/diff.js');
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
