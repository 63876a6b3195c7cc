/**
 * What a disk or partition that holds no ext2/3/4 file system holds instead, from the few bytes
 * that identify common formats (as blkid finds them), so an error can say "partition 2 holds Linux
 * swap" rather than "magic 0x0".
 *
 * Invariant: reads at most the first 68 KiB; an unrecognised start is reported as such, never guessed.
 */
import type { GuestDisk } from './disk-adapter.js';

/** Page sizes a swap signature may be placed for (it ends at the first page's last byte). */
const SWAP_PAGE_SIZES = [4096, 8192, 16384, 65536];

/** A phrase naming what starts at `offset` ("Linux swap", "a FAT file system", ...). */
export async function describeContents(disk: GuestDisk, offset: number, size: number): Promise<string> {
  const head = await disk.read(offset, Math.min(size, 68 << 10));
  const text = (at: number, length: number) => (head.length >= at + length ? new TextDecoder('latin1').decode(head.subarray(at, at + length)) : '');
  for (const page of SWAP_PAGE_SIZES) {
    const magic = text(page - 10, 10);
    if (magic === 'SWAPSPACE2' || magic === 'SWAP-SPACE') return 'Linux swap';
  }
  if (text(0, 4) === 'XFSB') return 'an XFS file system';
  if (text(0x10040, 8) === '_BHRfS_M') return 'a btrfs file system';
  if (text(0, 6) === 'LUKS\xba\xbe') return 'a LUKS encrypted volume';
  if (text(512, 8) === 'LABELONE' && text(512 + 24, 4) === 'LVM2') return 'an LVM physical volume';
  if (text(0, 4) === 'hsqs') return 'a squashfs file system';
  if (text(0x8001, 5) === 'CD001') return 'an ISO 9660 image';
  if (text(3, 8) === 'NTFS    ') return 'an NTFS file system';
  if (text(3, 8) === 'EXFAT   ') return 'an exFAT file system';
  if (text(0x52, 5) === 'FAT32' || text(0x36, 5) === 'FAT12' || text(0x36, 5) === 'FAT16' || text(0x36, 3) === 'FAT') return 'a FAT file system';
  if (head.every((byte) => byte === 0)) return `only zeros in its first ${head.length} bytes (an empty, unformatted disk?)`;
  return 'no file system signature ubdcow knows';
}
