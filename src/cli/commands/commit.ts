import type { CommandModule } from 'yargs';
import { formatBytes, note, out, plural, toJson, warn } from '../format.js';
import { createByteProgress, progressWanted } from '../progress.js';

/* `ubdcow commit`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

export const commitCommand: CommandModule = {
  command: 'commit <cow> [out]',
  describe: 'Merge a COW file with its backing file: into a new image OUT, or into the backing file in place',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .positional('out', {
        type: 'string',
        describe: 'New image file to write (uml_moo COW OUT); without it the backing file is updated in place',
      })
      .option('backing', { alias: 'b', type: 'string', describe: 'Use this backing file instead of the header\'s (uml_moo -b)' })
      .option('keep', {
        alias: 'd',
        type: 'boolean',
        describe: 'In place: leave the COW file untouched afterwards, as uml_moo -d does (default: empty it and re-point it at the merged backing)',
      })
      .option('force', {
        alias: 'f',
        type: 'boolean',
        describe: 'Commit although the backing file\'s size or mtime changed, or other COWs share it; overwrite an existing OUT',
      })
      .option('check-siblings', {
        type: 'string',
        array: true,
        describe: 'In place: also look in this folder for other COWs over the same backing (always searched: the COW\'s folder and the folders of the backing\'s path and real path; files are matched by device and inode)',
      })
      .option('progress', { alias: 'p', type: 'boolean', describe: 'Show a progress bar (default: only when stderr is a terminal; --no-progress never)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 commit vm1.cow merged.img', 'Write the merged disk to a new sparse file merged.img')
      .example('$0 commit -p vm1.cow', 'Merge into the backing file in place, then empty vm1.cow')
      .epilogue(
        'In place, other COW files over the same backing (in the COW\'s or the backing\'s folder, or a --check-siblings folder) make the commit refuse without --force: merging one VM\'s changes into a shared base corrupts the others. ' +
          'In place, a journal COW.ubdcow-commit is kept while the backing file is being written: if the commit is interrupted, run the same command again to finish it.',
      ),
  handler: async (argv) => {
    const { commitCow } = await import('../../commands/commit/index.js');
    const progress = createByteProgress('commit', progressWanted(argv.progress as boolean | undefined));
    let result;
    try {
      result = await commitCow(String(argv.cow), {
        output: argv.out as string | undefined,
        backing: argv.backing as string | undefined,
        keep: Boolean(argv.keep),
        force: Boolean(argv.force),
        checkSiblings: argv['check-siblings'] as string[] | undefined,
        onProgress: (done, total) => progress.update(done, total),
      });
    } finally {
      progress.stop();
    }
    if (argv.json) {
      out(toJson(result));
      return;
    }
    warn('commit', [...result.overridden.map((what) => `${what} (overridden by --force)`), ...result.warnings]);
    const copied = `${formatBytes(result.allocatedBytes)} from the COW in ${plural(result.extents, 'extent')}`;
    const resumed = result.resumed ? ' (finished an interrupted commit)' : '';
    if (result.mode === 'new-file') {
      note(
        `committed ${result.cow} to ${result.output}: ${formatBytes(result.size)} image, ${copied}, ${formatBytes(result.writtenBytes)} written (zeros left as holes) in ${seconds(result.durationMs)}`,
      );
    } else {
      const after = result.emptied ? `${result.cow} emptied and re-pointed at it` : `${result.cow} left unchanged`;
      note(`committed ${result.cow} into ${result.output}${resumed}: ${copied} in ${seconds(result.durationMs)}; ${after}`);
    }
  },
};
