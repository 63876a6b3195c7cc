import { checkByteRange } from '../errors.js';
import type { ReadOptions } from './engine-io.js';
import { openVirtualDisk } from '../io/engine/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** `read`'s options (cat reads through the same engine read path), and the chunk size. */
export interface CatOptions extends ReadOptions {
  /** Bytes per chunk yielded. */
  chunkBytes?: number;
}

export const CAT_CHUNK_BYTES = 1 << 20;

const catImageOptionKeys: OptionKeys<CatOptions> = { offset: true, length: true, backing: true, fs: true, chunkBytes: true, onWarning: true };

/**
 * The contents of a virtual disk (a COW seen through its backing, or a raw file), a chunk at a
 * time. Each chunk is a fresh buffer the consumer may keep. The range is checked before anything
 * is yielded; the file stays open until the iteration ends.
 */
export async function* catImage(file: string, options: CatOptions = {}): AsyncGenerator<Uint8Array> {
  checkOptions('catImage', options, catImageOptionKeys);
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
