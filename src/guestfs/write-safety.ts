/**
 * Whether `ubdcow customize` may write a file system with libext2fs: it must have been unmounted
 * cleanly (no journal to replay, no orphans being processed, no errors recorded), and use only
 * features libext2fs keeps consistent when it writes. Anything else is refused before a byte is
 * staged; the list of allowed features is closed, so a feature unknown here is refused too.
 */
import { UbdcowError } from '../errors.js';
import { uncleanReason } from './clean-unmount.js';

const allowedIncompat: Record<number, string> = {
  0x2: 'filetype',
  0x10: 'meta_bg',
  0x40: 'extents',
  0x80: '64bit',
  0x200: 'flex_bg',
  0x2000: 'metadata_csum_seed',
  0x4000: 'large_dir',
};
const refusedIncompat: Record<number, string> = {
  0x1: 'compression',
  0x4: 'needs_recovery',
  0x8: 'journal_dev',
  0x100: 'mmp',
  0x400: 'ea_inode',
  0x1000: 'dirdata',
  0x8000: 'inline_data',
  0x10000: 'encrypt',
  0x20000: 'casefold',
};
const allowedRoCompat: Record<number, string> = {
  0x1: 'sparse_super',
  0x2: 'large_file',
  0x8: 'huge_file',
  0x10: 'uninit_bg',
  0x20: 'dir_nlink',
  0x40: 'extra_isize',
  0x400: 'metadata_csum',
};
const refusedRoCompat: Record<number, string> = {
  0x80: 'snapshot',
  0x100: 'quota',
  0x200: 'bigalloc',
  0x800: 'replica',
  0x1000: 'read-only',
  0x2000: 'project',
  0x4000: 'shared_blocks',
  0x8000: 'verity',
  0x10000: 'orphan_present',
};

function names(bits: number, allowed: Record<number, string>, known: Record<number, string>): string[] {
  const found: string[] = [];
  for (let i = 0; i < 32; i++) {
    const bit = 2 ** i;
    if (!((bits >>> i) & 1) || allowed[bit]) continue;
    found.push(known[bit] ?? `unknown feature 0x${bit.toString(16)}`);
  }
  return found;
}

/** Throws unless the file system in `superblock` (its 1024 bytes) may be written. */
export function checkWritable(superblock: Uint8Array, label: string, file: string): void {
  const v = new DataView(superblock.buffer, superblock.byteOffset, superblock.byteLength);
  const incompat = v.getUint32(0x60, true);
  const roCompat = v.getUint32(0x64, true);
  const unclean = uncleanReason(superblock);
  if (unclean) {
    throw new UbdcowError('unclean-fs', `${label}: ${unclean}; refusing to write (boot the guest and shut it down cleanly, or run e2fsck -fy on it, then try again)`, { file });
  }
  const refused = [...names(incompat, allowedIncompat, refusedIncompat), ...names(roCompat, allowedRoCompat, refusedRoCompat)];
  if (refused.length > 0) {
    throw new UbdcowError('unsupported-fs', `${label}: the file system uses ${refused.join(', ')}, which ubdcow customize does not write (libext2fs here would leave it inconsistent); nothing was changed`, { file });
  }
}
