import { usageError } from '../../errors.js';
import { commitInPlace } from './in-place.js';
import { commitToNewFile } from './new-file.js';
import type { CommitOptions, CommitResult } from './shared.js';
import { type OptionKeys, checkOptions } from '../../options.js';
import { refuseInterruptedCustomize } from '../../io/journal/index.js';
import { nodeFileSystem } from '../../io/file/index.js';

/*
 * `ubdcow commit`: the dispatch between the two merges. new-file.ts writes a new image (what
 * `uml_moo COW OUT` makes); in-place.ts merges into the backing file (what `uml_moo -d COW` does),
 * with a journal so an interrupted merge can be finished. shared.ts holds their common checks.
 */

export { COMMIT_CHUNK_BYTES, type CommitOptions, type CommitResult, type InPlaceCommitResult, type NewFileCommitResult } from './shared.js';
export { commitJournalPath, readCommitJournal, interruptedCommitMessage, type CommitJournal } from '../../io/journal/index.js';

const commitCowOptionKeys: OptionKeys<CommitOptions> = { output: true, backing: true, keep: true, force: true, checkSiblings: true, onProgress: true, fs: true, chunkBytes: true };

/**
 * Merges a COW file with its backing file: into a new image file (`output`, what `uml_moo COW OUT`
 * makes) or into the backing file itself (what `uml_moo -d COW` does, then empties the COW so the
 * VM can go on using it over the merged base).
 */
export async function commitCow(cowPath: string, options: CommitOptions = {}): Promise<CommitResult> {
  checkOptions('commitCow', options, commitCowOptionKeys);
  if (options.output !== undefined && options.keep) {
    throw usageError(`${options.output}: --keep only applies to an in-place commit (no OUT); a new image never changes the COW`);
  }
  // The file system is chosen once, here at the API's edge; everything below takes it as given.
  const resolved = { ...options, fs: options.fs ?? nodeFileSystem };
  await refuseInterruptedCustomize(resolved.fs, cowPath);
  return resolved.output === undefined ? commitInPlace(cowPath, resolved) : commitToNewFile(cowPath, resolved.output, resolved);
}
