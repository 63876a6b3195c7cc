import { checkByteRange } from '../errors.js';
import type { FileSystem } from '../io/file.js';
import { openVirtualDisk } from '../io/virtual-disk.js';

export interface CatOptions {
  /** First byte to read; default 0. */
  offset?: number;
  /** Bytes to read; default up to the end of the disk. */
  length?: number;
  /** Backing file instead of the one the COW header names. */
  backing?: string;
  fs?: FileSystem;
  /** Bytes per chunk yielded. */
  chunkBytes?: number;
  /** Told about things worth a word that do not stop reading (e.g. a backing mtime mismatch). */
  onWarning?: (warning: string) => void;
}

export const CAT_CHUNK_BYTES = 1 << 20;

/**
 * The contents of a virtual disk (a COW seen through its backing, or a raw file), a chunk at a
 * time. Each chunk is a fresh buffer the consumer may keep. The range is checked before anything
 * is yielded; the file stays open until the iteration ends.
 */
export async function* catImage(file: string, options: CatOptions = {}): AsyncGenerator<Uint8Array> {
  const disk = await openVirtualDisk(file, { fs: options.fs, backing: options.backing });
  try {
    for (const warning of disk.warnings) options.onWarning?.(warning);
    const offset = options.offset ?? 0;
    const length = options.length ?? Math.max(0, disk.size - offset);
    checkByteRange(file, 'read', offset, length, disk.size);
    const chunkBytes = Math.max(1, options.chunkBytes ?? CAT_CHUNK_BYTES);
    const end = offset + length;
    for (let position = offset; position < end; position += chunkBytes) {
      yield await disk.read(position, Math.min(chunkBytes, end - position));
    }
  } finally {
    await disk.close();
  }
}
