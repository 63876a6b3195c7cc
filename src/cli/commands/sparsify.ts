import type { CommandModule } from 'yargs';
import { formatBytes, note, out, plural, toJson, warn } from '../format.js';
import { partitionOption } from '../guest-commands.js';
import { withByteProgress } from '../progress.js';

/* `ubdcow sparsify`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const sparsifyCommand: CommandModule = {
  command: 'sparsify <cow>',
  describe: 'Drop the 4 KiB pages a COW need not hold (equal to the backing file, or in free guest blocks), in place',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .option('fs', {
        type: 'boolean',
        describe: 'Also drop pages in blocks the guest\'s ext2/3/4 marks free (default: when the disk holds one; --no-fs: never)',
      })
      .option('partition', { type: 'number', describe: 'The partition (1-based, MBR or GPT) holding the file system' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Use this backing file instead of the header\'s (same size and mtime)' })
      .option('dry-run', { alias: 'n', type: 'boolean', describe: 'Report what would be dropped; change nothing' })
      .option('progress', { alias: 'p', type: 'boolean', describe: 'Show a progress bar (default: only when stderr is a terminal; --no-progress never)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 sparsify vm1.cow', 'Drop pages equal to the base and pages in free ext4 blocks')
      .example('$0 sparsify --no-fs --dry-run vm1.cow', 'How much would dropping pages equal to the base free?')
      .epilogue(
        'Refused while a UML (or another ubdcow) has the COW open, and with the guest file system in use when its journal needs recovery (boot and shut down the guest cleanly first, or use --no-fs). ' +
          'Crash-safe: bits are cleared (and synced) before the pages\' data is punched out, so a COW interrupted at any point reads as the same disk. ' +
          'Pages are dropped whole (4 KiB): a partly allocated page goes only if all its allocated sectors qualify.',
      ),
  handler: async (argv) => {
    const { sparsifyCow } = await import('../../commands/sparsify.js');
    const partition = partitionOption(argv);
    const result = await withByteProgress('sparsify', argv.progress as boolean | undefined, (onProgress) =>
      sparsifyCow(String(argv.cow), {
        guestFs: argv.fs as boolean | undefined,
        partition,
        backing: argv.backing as string | undefined,
        dryRun: Boolean(argv['dry-run']),
        onProgress,
      }),
    );
    if (argv.json) {
      out(toJson(result));
      return;
    }
    warn('sparsify', result.warnings);
    const { dropped, onDisk } = result;
    const fsText = result.fileSystem ? `${result.fileSystem.kind} (${result.fileSystem.location})` : 'no guest file system';
    const verb = result.dryRun ? 'would drop' : 'dropped';
    const reasons = `${formatBytes(dropped.equalBytes)} equal to the backing file, ${formatBytes(dropped.freeBytes)} in free blocks of ${fsText}`;
    const space = result.dryRun
      ? `on disk ${formatBytes(onDisk.before)}, about ${formatBytes(onDisk.after)} after`
      : `on disk ${formatBytes(onDisk.before)} -> ${formatBytes(onDisk.after)} (${formatBytes(Math.max(0, onDisk.before - onDisk.after))} freed)`;
    note(`${result.cow}: ${verb} ${plural(dropped.pages, 'page')} of ${formatBytes(result.allocatedBytes)} held: ${reasons}; ${space}`);
  },
};
