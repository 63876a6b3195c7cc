import type { CommandModule } from 'yargs';
import type { ArgumentsCamelCase } from 'yargs';
import { UbdcowError } from '../../errors.js';
import { formatBytes, note, out, toJson, warn } from '../format.js';
import { withByteProgress } from '../progress.js';

/* `ubdcow rebase`: arguments, help and output. The handler imports its library module lazily so `ubdcow --help` stays fast. */

export const rebaseCommand: CommandModule = {
  command: 'rebase <cow> <new-backing> [more..]',
  describe: 'Point a COW file at a moved or copied backing file (size and mtime must match the header); with --rewrite, move COWs onto a different base, their disks unchanged',
  builder: (y) =>
    y
      .positional('cow', { type: 'string', describe: 'COW file', demandOption: true })
      .positional('new-backing', { type: 'string', describe: 'The backing file\'s new location', demandOption: true })
      .option('unsafe', { alias: 'u', type: 'boolean', describe: 'Accept a new backing whose mtime differs (its mtime is stored); sizes must still match' })
      .option('compare', { type: 'boolean', describe: 'Compare the old and new backing files\' contents; equal contents accept (and store) a new mtime' })
      .positional('more', { type: 'string', array: true, describe: 'With --rewrite: more COW files, then the new base last' })
      .option('rewrite', {
        type: 'boolean',
        describe: 'Move the COW(s) onto a DIFFERENT base (qemu-img rebase -b): where the bases differ, copy the pages the guest reads from the old base into each COW, so every guest sees the same disk. The new base must be the disk\'s size (UML refuses a backing of another size)',
      })
      .option('sparse', { type: 'boolean', describe: 'With --rewrite: also drop the pages a COW holds that equal the new base' })
      .option('progress', { alias: 'p', type: 'boolean', describe: 'With --rewrite: show a progress bar (default: only when stderr is a terminal)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 rebase vm1.cow /srv/images/base.img', 'After moving base.img (keep its mtime: mv, cp -p, rsync -t)')
      .example('$0 rebase --rewrite vm*.cow base-v2.img', 'Move every VM onto an updated base; their disks stay as they were')
      .epilogue(
        '--rewrite builds each rewritten COW as a new file beside the old one and renames it over it when complete: interrupted (even by kill -9), a COW is either the old one or the new one. The COWs are write-locked meanwhile (a running UML makes it refuse). ' +
          'The disk keeps its size, and the kernel requires the backing file to have exactly that size, so NEW_BASE must be as large as the old base.',
      ),
  handler: async (argv) => {
    if (argv.rewrite) return rewriteHandler(argv);
    if ((argv.more as string[] | undefined)?.length) throw new UbdcowError('usage', 'rebase takes one COW and one backing file (several COWs only with --rewrite)');
    if (argv.sparse) throw new UbdcowError('usage', '--sparse needs --rewrite');
    const { rebaseCow } = await import('../../commands/rebase.js');
    const result = await rebaseCow(String(argv.cow), String(argv['new-backing']), {
      unsafe: Boolean(argv.unsafe),
      compare: Boolean(argv.compare),
    });
    if (argv.json) {
      out(toJson(result));
      return;
    }
    const acceptedBy = result.comparison?.equal ? 'accepted: contents compared equal' : 'overridden by --unsafe';
    warn('rebase', result.overridden.map((what) => `${what} (${acceptedBy})`));
    if (result.comparison && !result.comparison.compared) warn('rebase', [`not compared: ${result.comparison.reason}`]);
    const compared = result.comparison?.compared ? (result.comparison.equal ? ' (contents compared: equal)' : ' (contents differ)') : '';
    const storedMtime = result.overridden.length > 0 ? `; stored its mtime ${result.mtime}, so UML accepts it` : '';
    note(`rebased ${result.file}: ${result.oldBacking} -> ${result.newBacking}${compared}${storedMtime}`);
  },
};

async function rewriteHandler(argv: ArgumentsCamelCase): Promise<void> {
  if (argv.unsafe || argv.compare) throw new UbdcowError('usage', '--rewrite compares the bases itself; --unsafe and --compare belong to the header-only rebase');
  const all = [String(argv.cow), String(argv['new-backing']), ...((argv.more as string[] | undefined) ?? []).map(String)];
  const newBase = all.pop()!;
  const { rebaseRewrite } = await import('../../commands/rebase-rewrite.js');
  const result = await withByteProgress('rebase', argv.progress as boolean | undefined, (onProgress) =>
    rebaseRewrite(all, newBase, { sparse: Boolean(argv.sparse), onProgress }),
  );
  if (argv.json) {
    out(toJson(result));
    return;
  }
  for (const cow of result.cows) {
    if (cow.unchanged) {
      note(`${cow.file}: already over ${result.newBacking}`);
      continue;
    }
    const dropped = cow.droppedBytes > 0 ? `, dropped ${formatBytes(cow.droppedBytes)} equal to the new base` : '';
    note(`rebased ${cow.file}: ${cow.oldBacking} -> ${result.newBacking}; copied in ${formatBytes(cow.copiedBytes)} where the bases differ${dropped}`);
  }
}
