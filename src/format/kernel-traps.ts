import type { CowGeometry } from './geometry.js';

/*
 * Valid COW files the UML kernel mishandles (issue 15 items 6 and 7). Pure: geometry in, findings
 * out; create, inspect and check decide whether a finding is a refusal, a problem or a warning.
 *
 * Both come from how arch/um/drivers/ubd_kern.c records a write in the bitmap (cowify_bitmap and
 * update_bitmap, same code in 6.1 and later):
 *
 *     *cow_offset = sector / (sizeof(unsigned long) * 8);
 *     if (*cow_offset == (DIV_ROUND_UP(bitmap_len, sizeof(unsigned long)) - 1))
 *             (*cow_offset)--;
 *     bitmap_words[0] = bitmap[*cow_offset];
 *     bitmap_words[1] = bitmap[*cow_offset + 1];
 *     ... update_bitmap(): os_pwrite_file(fd, &bitmap_words, sizeof(bitmap_words), cow_offset)
 *     with cow_offset = bitmap_offset + *cow_offset * sizeof(unsigned long), and
 *     bitmap_words declared unsigned long[2]: 16 bytes per write.
 *
 * 1. The bitmap is written two 8-byte words (16 bytes) at a time, at 8-byte steps from
 *    bitmap_offset, backed up one word at the end: the last write ends at bitmap_offset + the
 *    bitmap length rounded up to 8 bytes. When the data area starts before that (alignment not a
 *    multiple of 8, bitmap length not a multiple of 8), the write lands on the first bytes of
 *    sector 0's data, with whatever the kernel's memory holds past its copy of the bitmap.
 * 2. With a bitmap of one word or less (64 sectors, 32 KiB, or fewer) the back-up makes the word
 *    index -1, which is also the driver's "no bitmap update" marker, and bitmap[-1] is read from
 *    before the bitmap's buffer: measured, any guest write to such a disk hangs in D state.
 */

/** sizeof(unsigned long) on the 64-bit UML kernels in use: the step of the kernel's bitmap writes. */
export const KERNEL_BITMAP_WORD_BYTES = 8;
/** Each bitmap update writes two words. */
export const KERNEL_BITMAP_WRITE_BYTES = 2 * KERNEL_BITMAP_WORD_BYTES;
/** Disks whose bitmap is at most one word (this many sectors of 512 bytes) hang the guest on a write. */
export const KERNEL_MAX_HANGING_SECTORS = 8 * KERNEL_BITMAP_WORD_BYTES;

/** File bytes [start, end) of the data area the kernel's bitmap writes reach, if any. */
export interface BitmapOverlap {
  start: number;
  end: number;
}

/** Where the kernel's last bitmap write ends in the file. */
export function kernelBitmapReach(geometry: Pick<CowGeometry, 'bitmapOffset' | 'bitmapLength'>): number {
  const words = Math.ceil(geometry.bitmapLength / KERNEL_BITMAP_WORD_BYTES);
  return geometry.bitmapOffset + Math.max(words, 2) * KERNEL_BITMAP_WORD_BYTES;
}

/** The data-area bytes the kernel's bitmap writes can overwrite (undefined: none). */
export function kernelBitmapOverlap(geometry: Pick<CowGeometry, 'bitmapOffset' | 'bitmapLength' | 'dataOffset'>): BitmapOverlap | undefined {
  if (isKernelHangingDisk(geometry)) return undefined; // the kernel hangs before writing any bitmap word
  const reach = kernelBitmapReach(geometry);
  return reach > geometry.dataOffset ? { start: geometry.dataOffset, end: reach } : undefined;
}

/** The bitmap is one kernel word or less: any guest write hangs. */
export function isKernelHangingDisk(geometry: Pick<CowGeometry, 'bitmapLength'>): boolean {
  return geometry.bitmapLength <= KERNEL_BITMAP_WORD_BYTES;
}

/** One line about an overlap, naming the bytes at risk and the fix. */
export function describeBitmapOverlap(geometry: Pick<CowGeometry, 'bitmapOffset' | 'bitmapLength' | 'dataOffset'>, alignment: number): string | undefined {
  const overlap = kernelBitmapOverlap(geometry);
  if (!overlap) return undefined;
  const bytes = overlap.end - overlap.start;
  return (
    `alignment ${alignment} puts the data area at byte ${geometry.dataOffset}, inside the last ${KERNEL_BITMAP_WRITE_BYTES}-byte bitmap write of the UML kernel ` +
    `(it writes the ${geometry.bitmapLength}-byte bitmap in 8-byte words up to byte ${overlap.end}): a guest write can overwrite file bytes ` +
    `${overlap.start}-${overlap.end - 1}, the first ${bytes} byte${bytes === 1 ? '' : 's'} of sector 0's data; use an alignment that is a multiple of 8 (uml_mkcow uses 4096)`
  );
}

/** One line about a disk too small for the kernel, naming the limit. */
export function describeHangingDisk(geometry: Pick<CowGeometry, 'bitmapLength' | 'sectors'>): string | undefined {
  if (!isKernelHangingDisk(geometry)) return undefined;
  return (
    `the disk has ${geometry.sectors} sector${geometry.sectors === 1 ? '' : 's'}: a UML guest hangs on any write to a COW-backed disk of ` +
    `${KERNEL_MAX_HANGING_SECTORS} sectors (32 KiB) or fewer (a bitmap of one ${KERNEL_BITMAP_WORD_BYTES}-byte word); make the backing file larger than 32 KiB`
  );
}
