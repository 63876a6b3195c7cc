/*
 * The public API (the package entry): the commands as library functions, the engine, the image
 * and backing readers, the FileSystem seam and the pure format layer. Internals (the bitmap cache,
 * the OS bindings and file-operation helpers) stay behind it; test/packaging/public-api.test.ts
 * keeps them out.
 */
export { UbdcowError, CowFormatError, type UbdcowErrorCode, type FormatErrorCode, type SystemErrorCode } from './errors.js';
export * from './format/header.js';
export * from './format/geometry.js';
export * from './format/bitmap.js';
export type { FileHandleLike, FileStat, FileSystem, OpenMode } from './io/file/index.js';
export { nodeFileSystem } from './io/file/index.js';
export { openImage, withImage, type CowImage, type ImageLock, type WithImageOptions } from './io/image/index.js';
export { allocatedExtents, bitmapSlices, type SectorExtent } from './io/bitmap/index.js';
export { checkBacking, resolveBackingPath, type BackingReport, type BackingState } from './io/image/index.js';
export { planRead, type ReadSpan, type ReadPlan } from './format/read-plan.js';
export { createCow, absoluteBackingPath, type CreateOptions, type CreateResult } from './commands/create.js';
export { inspectCow, type InspectReport, type InspectOptions } from './commands/inspect.js';
export { openVirtualDisk, allocatedByteExtents, type VirtualDisk, type RawDisk, type CowDisk, type OpenVirtualDiskOptions, type FileIdentity } from './io/engine/index.js';
export { diffImages, type DiffOptions, type DiffResult, type DiffMode, type ByteRange } from './commands/diff.js';
export { mapCow, type MapOptions, type MapResult, type MappedExtent } from './commands/map.js';
export { catImage, type CatOptions } from './commands/cat.js';
export { openCow, type CowDevice, type OpenCowOptions } from './io/engine/index.js';
export { readThroughEngine, writeThroughEngine, type ReadOptions, type WriteOptions, type WriteResult } from './commands/engine-io.js';
export { runDemo, bundledImage, type DemoResult, type DemoStep } from './commands/demo.js';
export { lockCowFile, unlockCowFile, isCowFileLocked, type CowLockOptions } from './io/lock/index.js';
export { commitCow, type CommitOptions, type CommitResult, type NewFileCommitResult, type InPlaceCommitResult } from './commands/commit/index.js';
export { commitJournalPath, readCommitJournal, type CommitJournal } from './io/journal/index.js';
export { checkCow, type CheckOptions, type CheckResult, type CheckProblem, type CheckProblemCode } from './commands/check.js';
export { rebaseCow, type RebaseOptions, type RebaseResult } from './commands/rebase.js';
export { rebaseRewrite, type RebaseRewriteOptions, type RebaseRewriteResult, type RebasedCow } from './commands/rebase-rewrite.js';
export { sparsifyCow, type SparsifyOptions, type SparsifyResult } from './commands/sparsify.js';
export type { CloneRange } from './io/file/index.js';
export { serveNbd, BLOCK_SIZES as NBD_BLOCK_SIZES, type NbdBlockDevice, type NbdServeOptions, type NbdServer } from './nbd/index.js';
export { serveImage, type ServeOptions, type ServeHandle } from './commands/serve.js';
export { convertImage, CONVERT_FORMATS, type ConvertOptions, type ConvertResult, type ConvertFormat } from './commands/convert.js';
export { importImage, type ImportOptions, type ImportResult } from './commands/import.js';
export { openGuestFs, type GuestFs, type GuestFsOptions, type GuestPath, type GuestStat } from './guestfs/guest-fs.js';
export type { JournalReplayNote } from './guestfs/journal-replay.js';
export { diffFiles, type DiffFilesOptions, type DiffFilesResult, type FileChange, type FileChangeWhat } from './guestfs/diff-files.js';
export { listGuest, type LsOptions, type LsEntry, type LsProblem, type LsResult } from './commands/ls.js';
export { getGuestFile, getGuestFileTo, type GetOptions } from './commands/get.js';
export type { AllocatedRun } from './io/engine/index.js';
export { customize, type CustomizeOptions, type CustomizeResult, type CustomizeStep, type CustomizeOperation } from './commands/customize.js';
export { parseOperation, parseCommandsFile, type SshKeySource } from './guestfs/customize-spec.js';
export { customizeJournalPath } from './io/journal/index.js';
