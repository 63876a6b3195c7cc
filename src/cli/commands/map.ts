import type { CommandModule } from 'yargs';
import type { MapResult } from '../../commands/map.js';
import { out, toJson } from '../format.js';

/* `ubdcow map`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

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

export const mapCommand: CommandModule = {
  command: 'map <cow>',
  describe: 'Show which ranges of the virtual disk a COW holds, and where in the file (like qemu-img map)',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('json', { type: 'boolean', describe: 'Print one JSON object: size, allocatedBytes, extents [{offset, length, cowOffset}]' })
      .example('$0 map vm1.cow', 'Allocated extents, in bytes (hex)'),
  handler: async (argv) => {
    const { mapCow } = await import('../../commands/map.js');
    const result = await mapCow(String(argv.cow));
    out(argv.json ? toJson(result) : formatMapTable(result));
  },
};
