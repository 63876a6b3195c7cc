import { UbdcowError } from '../../errors.js';
import type { LockedDisk } from '../engine/index.js';
import { JOURNAL_PAGE, type JournalState, type RedoEntry, inspectCustomizeJournal, removeCustomizeJournal } from './redo-journal.js';
import type { FileSystem } from '../file/index.js';

/*
 * Applying a redo journal's pages to the disk they belong to, and finishing or discarding a
 * journal an earlier run left (docs/customize.md). Applying is idempotent: the same pages written
 * again give the same disk, so a run killed while applying is finished by replaying from the start.
 */

const RUN_PAGES = 256;

/** Writes every page (in page order, consecutive pages in one write of up to 1 MiB), then syncs the disk. */
export async function applyPages(disk: LockedDisk, entries: RedoEntry[], readPage: (entry: RedoEntry, into: Uint8Array) => Promise<void>): Promise<void> {
  const buffer = new Uint8Array(RUN_PAGES * JOURNAL_PAGE);
  for (let i = 0; i < entries.length; ) {
    const first = entries[i]!.page;
    let count = 0;
    while (i + count < entries.length && count < RUN_PAGES && entries[i + count]!.page === first + count) {
      await readPage(entries[i + count]!, buffer.subarray(count * JOURNAL_PAGE, (count + 1) * JOURNAL_PAGE));
      count++;
    }
    const offset = first * JOURNAL_PAGE;
    const length = Math.min(count * JOURNAL_PAGE, disk.size - offset);
    await disk.write(offset, buffer.subarray(0, length));
    i += count;
  }
  await disk.flush();
}

export type Recovery = 'none' | 'replayed' | 'discarded';

/**
 * Deals with a journal beside the disk's image (the caller holds the write lock): a complete one
 * is applied and removed, an incomplete one (the run died before it was durable, so the disk was
 * never touched) is removed.
 */
export async function recoverCustomizeJournal(fs: FileSystem, disk: LockedDisk): Promise<{ recovery: Recovery; journal?: string }> {
  const state: JournalState = await inspectCustomizeJournal(fs, disk.path);
  if (state.state === 'none') return { recovery: 'none' };
  if (state.state === 'incomplete') {
    await removeCustomizeJournal(fs, state.path);
    return { recovery: 'discarded', journal: state.path };
  }
  const { journal } = state;
  try {
    if (journal.meta.diskSize !== disk.size || journal.meta.kind !== disk.kind) {
      throw new UbdcowError(
        'bad-journal',
        `${journal.path}: a customize journal for a ${journal.meta.diskSize}-byte ${journal.meta.kind} disk, but ${disk.path} is a ${disk.size}-byte ${disk.kind} disk; move the journal away if it belongs to another image`,
        { file: journal.path },
      );
    }
    await applyPages(disk, journal.entries, (entry, into) => journal.readPage(entry, into));
  } finally {
    await journal.close().catch(() => undefined);
  }
  await removeCustomizeJournal(fs, journal.path);
  return { recovery: 'replayed', journal: journal.path };
}
