/**
 * `ubdcow cat vm.cow > disk.img` should leave holes where the disk holds zeros, as `commit` does:
 * a 64 MiB disk with 2 MiB of data then costs 2 MiB, not 64. When standard output is a regular
 * file that ends at its descriptor's offset (a fresh `>`; not `>>`, which appends wherever we
 * seek), zero blocks are skipped with positional writes, the file is extended to its final length
 * and the descriptor's offset is moved there, so a shell writing after us continues at the end.
 * Anywhere else (a pipe, a terminal, an append, no lseek binding) nothing of this applies and the
 * caller streams.
 */
import * as fs from 'node:fs';
import { isAllZero } from '../format/zero-bytes.js';
import { osCalls } from '../os/libc.js';

const BLOCK = 4096;
const O_APPEND = 0o2000;

export interface SparseTarget {
  /** Writes a chunk at the current position, skipping whole zero blocks. */
  write(chunk: Uint8Array): void;
  /** Extends the file to the bytes written and moves the descriptor's offset to the end. */
  finish(): void;
}

/** A sparse writer for `fd` when it is a regular file we may seek in, else undefined. */
export function sparseTarget(fd: number): SparseTarget | undefined {
  const calls = osCalls();
  if (!calls) return undefined;
  let start: number;
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) return undefined;
    const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
    const pos = /^pos:\s*(\d+)/m.exec(info);
    const flags = /^flags:\s*([0-7]+)/m.exec(info);
    if (!pos || !flags || (parseInt(flags[1], 8) & O_APPEND) !== 0) return undefined;
    start = Number(pos[1]);
    // Bytes after our start would show through the blocks we skip.
    if (stat.size > start) return undefined;
  } catch {
    return undefined;
  }
  let position = start;
  return {
    write(chunk) {
      let at = 0;
      while (at < chunk.length) {
        // Blocks are aligned to the file, so a skipped one is a whole file-system block.
        const blockEnd = Math.min(chunk.length, at + BLOCK - ((position + at) % BLOCK));
        if (isAllZero(chunk.subarray(at, blockEnd))) {
          at = blockEnd;
          continue;
        }
        let runEnd = blockEnd;
        while (runEnd < chunk.length) {
          const next = Math.min(chunk.length, runEnd + BLOCK);
          if (isAllZero(chunk.subarray(runEnd, next))) break;
          runEnd = next;
        }
        writeAllAt(fd, chunk, at, runEnd - at, position + at);
        at = runEnd;
      }
      position += chunk.length;
    },
    finish() {
      if (fs.fstatSync(fd).size < position) fs.ftruncateSync(fd, position);
      calls.seekSet(fd, position);
    },
  };
}

function writeAllAt(fd: number, bytes: Uint8Array, offset: number, length: number, position: number): void {
  let done = 0;
  while (done < length) done += fs.writeSync(fd, bytes, offset + done, length - done, position + done);
}
