/**
 * Which ext incompatible features the guest-file reader follows, and the names of those it does
 * not (so every command refuses the same file systems with the same one-line reason).
 *
 * Invariant: a feature bit not listed here is refused as unknown; the kernel refuses to mount
 * those too.
 */
import type { Superblock } from './ext-layout.js';

/**
 * Incompatible features by bit, as e2fsprogs names them. The reader follows every one marked
 * true; false ones change the on-disk format in ways it does not decode, and a bit missing here is
 * one it has never heard of: both are refused by name (the kernel refuses to mount those too).
 */
const incompatFeatures: Array<[bit: number, name: string, readable: boolean]> = [
  [0x1, 'compression', false],
  [0x2, 'filetype', true],
  [0x4, 'needs_recovery', true], // the journal is replayed in memory (journal-replay.ts)
  [0x8, 'journal_dev', true], // refused earlier, with its own message
  [0x10, 'meta_bg', true],
  [0x40, 'extent', true],
  [0x80, '64bit', true],
  [0x100, 'mmp', true], // multi-mount protection: a block a read-only reader can ignore
  [0x200, 'flex_bg', true],
  [0x400, 'ea_inode', true], // large extended attributes in inodes; xattrs are not read
  [0x1000, 'dirdata', false],
  [0x2000, 'metadata_csum_seed', true],
  [0x4000, 'large_dir', true], // deeper htrees; directories are read block by block
  [0x8000, 'inline_data', false],
  [0x10000, 'encrypt', true], // names and contents are shown as stored (see docs/guestfs.md)
  [0x20000, 'casefold', true],
];

/**
 * Incompatible features the reader cannot follow, by name (an unknown bit as "unknown incompatible
 * feature 0x…"): it says so instead of returning wrong answers. Unknown read-only-compatible
 * features are fine for a reader, as for a read-only mount.
 */
export function unsupportedFeatures(sb: Superblock): string[] {
  const found: string[] = [];
  let known = 0;
  for (const [bit, name, readable] of incompatFeatures) {
    known |= bit;
    if (sb.featureIncompat & bit && !readable) found.push(name);
  }
  const unknown = (sb.featureIncompat & ~known) >>> 0;
  for (let bit = 1; bit !== 0 && bit <= unknown; bit = (bit << 1) >>> 0) {
    if (unknown & bit) found.push(`unknown incompatible feature 0x${bit.toString(16)}`);
  }
  return found;
}
