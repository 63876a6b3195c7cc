export { commitJournalExists, commitJournalPath, interruptedCommitError, interruptedCommitMessage, readCommitJournal, removeCommitJournal, writeCommitJournal } from './commit-journal.js';
export type { CommitJournal } from './commit-journal.js';
export { applyPages, recoverCustomizeJournal } from './redo-apply.js';
export type { Recovery } from './redo-apply.js';
export { RedoJournalWriter, customizeJournalExists, customizeJournalPath, refuseInterruptedCustomize, removeCustomizeJournal } from './redo-journal.js';
export { StagedPages, anonymousSpill } from './staged-pages.js';
