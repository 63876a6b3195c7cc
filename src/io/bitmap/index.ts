export { allocatedExtents, allocatedWindows, bitmapSlices, extentBytes, readBitmapBytes } from './allocation.js';
export type { SectorExtent, WindowRuns } from './allocation.js';
export { lazyBitmapOf } from './bitmap-cache.js';
export type { BitmapView, LazyBitmap } from './bitmap-cache.js';
export { clearNonZeroBytes } from './bitmap-clear.js';
export { BitmapWriter } from './bitmap-writer.js';
