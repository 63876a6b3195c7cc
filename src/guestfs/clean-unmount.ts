/**
 * Whether an ext2/3/4 file system was left in a state its metadata can be trusted in: journal
 * replayed, no errors recorded, unmounted cleanly. One rule for every command that relies on the
 * on-disk metadata (customize writes through it, sparsify trusts its free-block bitmaps), so both
 * refuse the same file systems with the same reason (code `unclean-fs`).
 */

const STATE_VALID = 0x1;
const STATE_ERROR = 0x2;
const INCOMPAT_RECOVER = 0x4;

/** Why the file system whose superblock (its 1024 bytes) is `superblock` cannot be trusted, or undefined when it can. */
export function uncleanReason(superblock: Uint8Array): string | undefined {
  const v = new DataView(superblock.buffer, superblock.byteOffset, superblock.byteLength);
  const state = v.getUint16(0x3a, true);
  const incompat = v.getUint32(0x60, true);
  const errorCount = v.getUint32(0x194, true);
  if (incompat & INCOMPAT_RECOVER) return 'the journal needs recovery (the guest did not unmount cleanly)';
  if (state & STATE_ERROR || errorCount > 0) return `the file system has errors recorded (${errorCount} since the last check)`;
  if (!(state & STATE_VALID)) return 'the file system was not unmounted cleanly (or is mounted)';
  return undefined;
}
