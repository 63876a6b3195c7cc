export { isCowFileLocked, lockCowFile, unlockCowFile } from './lock.js';
export type { CowLockOptions } from './lock.js';
