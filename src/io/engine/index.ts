export { DEFAULT_ALLOCATION_UNIT, defaultUnitSectors, sectorsPerUnit } from './allocation-unit.js';
export { openCow } from './engine.js';
export type { AllocatedRun, CowDevice, OpenCowOptions } from './engine.js';
export { openLockedDisk } from './locked-disk.js';
export type { LockedDisk } from './locked-disk.js';
export { allocatedByteExtents, looksLikeCow, openVirtualDisk, sameBaseFile } from './virtual-disk.js';
export type { BaseFile, CowDisk, FileIdentity, OpenVirtualDiskOptions, RawDisk, VirtualDisk } from './virtual-disk.js';
