import { fromSystemError } from '../../errors.js';
import { type FileHandleLike, writeAll } from '../file/index.js';

/*
 * Clearing a bitmap without filling its holes. A COW's bitmap is sparse like the rest of the file:
 * a 1 TiB disk has a 256 MiB bitmap of which a nearly empty COW stores a few blocks. Writing zeros
 * over all of it would allocate every block (a 16 KiB file became 256 MiB on disk, issue 15
 * item 5). So only bytes that hold a bit are rewritten. Invariant: afterwards every bitmap byte
 * reads zero, and no file-system block that was a hole has been written.
 */

/** Bytes read at a time. */
const CHUNK_BYTES = 1 << 20;

/**
 * Zero runs shorter than this between two non-zero bytes are rewritten with them (fewer writes).
 * That fills no hole: a hole is a whole file-system block, at least 512 bytes, and a shorter run
 * with data on both sides shares a block with that data.
 */
const MERGE_GAP_BYTES = 512;

/** Zeroes the non-zero bytes of [offset, offset + length) in `file`. Returns the bytes written. */
export async function clearNonZeroBytes(file: FileHandleLike, filePath: string, offset: number, length: number): Promise<number> {
  const buffer = new Uint8Array(Math.min(CHUNK_BYTES, Math.max(length, 1)));
  const zeros = new Uint8Array(buffer.length);
  let written = 0;
  for (let at = 0; at < length; at += buffer.length) {
    const chunk = Math.min(buffer.length, length - at);
    let got: number;
    try {
      got = await file.read(buffer, 0, chunk, offset + at);
    } catch (err) {
      throw fromSystemError(err, filePath, 'read the bitmap of');
    }
    // Past the end of the file there is nothing to clear (it reads as zeros).
    for (const run of nonZeroRuns(buffer.subarray(0, got))) {
      await writeAll(file, filePath, 'clear the bitmap of', { buffer: zeros, offset: 0, length: run.end - run.start, position: offset + at + run.start });
      written += run.end - run.start;
    }
  }
  return written;
}

const SCAN_BLOCK_BYTES = 4096;
const zeroBlock = new Uint8Array(SCAN_BLOCK_BYTES);

/** [start, end) runs covering every non-zero byte, neighbours closer than MERGE_GAP_BYTES joined. */
export function nonZeroRuns(bytes: Uint8Array): Array<{ start: number; end: number }> {
  const runs: Array<{ start: number; end: number }> = [];
  const add = (start: number, end: number) => {
    const last = runs[runs.length - 1];
    if (last && start - last.end < MERGE_GAP_BYTES) last.end = end;
    else runs.push({ start, end });
  };
  for (let block = 0; block < bytes.length; block += SCAN_BLOCK_BYTES) {
    const blockEnd = Math.min(block + SCAN_BLOCK_BYTES, bytes.length);
    // memcmp skips the (usual) all-zero blocks; a byte loop over 256 MiB would take about a second.
    if (Buffer.compare(bytes.subarray(block, blockEnd), zeroBlock.subarray(0, blockEnd - block)) === 0) continue;
    for (let i = block; i < blockEnd; ) {
      if (bytes[i] === 0) {
        i++;
        continue;
      }
      let end = i + 1;
      while (end < blockEnd && bytes[end] !== 0) end++;
      add(i, end);
      i = end;
    }
  }
  return runs;
}
