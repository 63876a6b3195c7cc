import * as path from 'node:path';
import { UbdcowError, commitInterrupted, fromSystemError, interruptedCommitText } from '../../errors.js';
import { type FileHandleLike, type FileSystem, writeNewFile } from '../file/index.js';

/*
 * The journal of an in-place commit, `COW.ubdcow-commit`: written (atomically, synced) before the
 * backing file is touched, removed once the merge is complete. Its presence means "a merge into
 * the backing file may have started and not finished". Commit resumes from it; check reports it;
 * rebase and a commit to a new file refuse to go on while it is there. See docs/commit.md.
 */

/** What the journal records: enough to recognise "this COW, this backing, before the merge". */
export interface CommitJournal {
  format: 'ubdcow-commit-journal';
  version: 1;
  backing: string;
  size: number;
  /** The header's mtime before the merge changed the backing file. */
  mtime: number;
  started: string;
}

export function commitJournalPath(cowPath: string): string {
  return `${cowPath}.ubdcow-commit`;
}

/** What to tell the user when the journal of an interrupted in-place commit of `cowPath` is there. */
export function interruptedCommitMessage(cowPath: string, suffix = ''): string {
  return interruptedCommitText(cowPath, commitJournalPath(cowPath), suffix);
}

/** The error for "an in-place commit of `cowPath` was interrupted; finish it first". */
export function interruptedCommitError(cowPath: string, suffix = ''): UbdcowError {
  return commitInterrupted(cowPath, commitJournalPath(cowPath), suffix);
}

/** The journal of an interrupted in-place commit of `cowPath`, if there is one. */
export async function readCommitJournal(fs: FileSystem, cowPath: string): Promise<CommitJournal | undefined> {
  const journalPath = commitJournalPath(cowPath);
  let file: FileHandleLike;
  try {
    file = await fs.open(journalPath, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromSystemError(err, journalPath, 'read commit journal');
  }
  let text: string;
  try {
    const { size } = await file.stat();
    const bytes = new Uint8Array(Math.min(size, 1 << 16));
    const got = await file.read(bytes, 0, bytes.length, 0);
    text = Buffer.from(bytes.subarray(0, got)).toString('utf8');
  } catch (err) {
    throw fromSystemError(err, journalPath, 'read commit journal');
  } finally {
    await file.close().catch(() => undefined);
  }
  let journal: CommitJournal;
  try {
    journal = JSON.parse(text) as CommitJournal;
  } catch {
    throw new UbdcowError('bad-journal', `${journalPath}: not a ubdcow commit journal (invalid JSON); remove it if no commit was running`, {
      file: journalPath,
    });
  }
  if (journal?.format !== 'ubdcow-commit-journal' || typeof journal.backing !== 'string' || typeof journal.mtime !== 'number') {
    throw new UbdcowError('bad-journal', `${journalPath}: not a ubdcow commit journal (format field missing); remove it if no commit was running`, {
      file: journalPath,
    });
  }
  return journal;
}

/** True when a journal is there, readable as one or not (a damaged one still means "interrupted"). */
export async function commitJournalExists(fs: FileSystem, cowPath: string): Promise<boolean> {
  return readCommitJournal(fs, cowPath).then(
    (journal) => journal !== undefined,
    (err: unknown) => {
      if (err instanceof UbdcowError && err.code === 'bad-journal') return true;
      throw err;
    },
  );
}

export async function writeCommitJournal(fs: FileSystem, cowPath: string, journal: CommitJournal): Promise<void> {
  const bytes = Buffer.from(`${JSON.stringify(journal, null, 2)}\n`);
  await writeNewFile(fs, commitJournalPath(cowPath), true, (file) => file.write(bytes, 0, bytes.length, 0));
}

export async function removeCommitJournal(fs: FileSystem, cowPath: string): Promise<void> {
  const journalPath = commitJournalPath(cowPath);
  try {
    await fs.unlink(journalPath);
    await fs.syncDirectory(path.dirname(journalPath));
  } catch (err) {
    throw fromSystemError(err, journalPath, 'remove commit journal');
  }
}
