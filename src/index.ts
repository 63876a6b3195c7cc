export { UbdcowError, CowFormatError } from './errors.js';
export * from './format/header.js';
export * from './format/geometry.js';
export * from './format/bitmap.js';
export type { FileHandleLike, FileStat, FileSystem, OpenMode } from './io/file.js';
export { nodeFileSystem } from './io/file.js';
export { openImage, allocatedExtents, bitmapSlices, checkBacking, type CowImage, type BackingReport, type SectorExtent } from './io/image.js';
export { createCow, absoluteBackingPath, type CreateOptions, type CreateResult } from './commands/create.js';
export { inspectCow, type InspectReport, type InspectOptions } from './commands/inspect.js';
