/**
 * The disk object libext2fs (npm `ext2fs`) writes to during `ubdcow customize`: reads see the
 * image's current bytes overlaid with the pages staged so far, writes go to staged 4 KiB pages
 * (src/io/journal/staged-pages.ts) and never to the image. Whatever libext2fs does, the image is unchanged
 * until the run has finished and its redo journal is durable (src/commands/customize.ts).
 */
import type { StagedPages } from '../io/journal/index.js';
import type { GuestDisk } from './disk-adapter.js';

function ioError(message: string, code: string): Error {
  return Object.assign(new Error(message), { code });
}

export class StagedExt2fsDisk {
  readonly readOnly = false;
  /** Bytes libext2fs wrote (the same page may count many times). */
  bytesWritten = 0;

  constructor(private readonly pages: StagedPages) {}

  async read(buffer: Buffer, bufferOffset: number, length: number, fileOffset: number): Promise<{ bytesRead: number; buffer: Buffer }> {
    // libext2fs asks for whole blocks; the last one may run past a disk whose size is not a multiple.
    const wanted = Math.max(0, Math.min(length, this.pages.size - fileOffset));
    if (wanted > 0) await this.pages.read(fileOffset, buffer.subarray(bufferOffset, bufferOffset + wanted));
    if (wanted < length) buffer.fill(0, bufferOffset + wanted, bufferOffset + length);
    return { bytesRead: length, buffer };
  }

  async write(buffer: Buffer, bufferOffset: number, length: number, fileOffset: number): Promise<{ bytesWritten: number; buffer: Buffer }> {
    if (fileOffset < 0 || fileOffset + length > this.pages.size) throw ioError(`write past the end of the disk (${fileOffset}+${length})`, 'ENOSPC');
    await this.pages.write(fileOffset, buffer.subarray(bufferOffset, bufferOffset + length));
    this.bytesWritten += length;
    return { bytesWritten: length, buffer };
  }

  async discard(): Promise<void> {
    // Freed blocks keep their old bytes, as on a disk without discard: nothing to stage.
  }

  async flush(): Promise<void> {
    // Durability comes from the redo journal, after libext2fs has closed the file system.
  }

  async getCapacity(): Promise<number> {
    return this.pages.size;
  }
}

/** The staged disk as a read-only GuestDisk, so the file system can be located and checked as `ls` does. */
export function stagedGuestDisk(image: string, kind: 'raw' | 'cow', pages: StagedPages, warnings: string[]): GuestDisk {
  return {
    path: image,
    kind,
    size: pages.size,
    base: { realPath: image },
    warnings,
    async read(offset, length, into) {
      const buffer = into ?? new Uint8Array(length);
      await pages.read(offset, buffer.subarray(0, length));
      return buffer.subarray(0, length);
    },
    close: async () => undefined,
  };
}
