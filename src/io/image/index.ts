export { backingError, backingMismatches, backingPolicy, checkBacking, mtimeMismatchFix, openBacking, resolveBackingPath } from './backing.js';
export type { BackingReport, BackingState, OpenedFile } from './backing.js';
export { imageSize, isoTime, openImage, openImageFile, openLockedImage, probeHeader, probeReadable, rewriteHeader, statImageFile, withImage } from './image.js';
export type { CowImage, ImageLock, WithImageOptions } from './image.js';
