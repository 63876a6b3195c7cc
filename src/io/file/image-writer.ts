import { DIRECT_IO_ALIGNMENT, type FileHandleLike, type FileSystem, alignedBuffer } from './file.js';

/** Errors meaning "this file system does not do direct I/O (or not with these buffers)". */
const DIRECT_IO_REFUSED = new Set(['EINVAL', 'EOPNOTSUPP', 'ENOTSUP']);

function refusesDirectIo(err: unknown): boolean {
  return DIRECT_IO_REFUSED.has((err as NodeJS.ErrnoException).code ?? '');
}

/**
 * Writes a new image file that is about to be fsync'ed whole: through a second, O_DIRECT
 * descriptor where the file system takes one, else through the ordinary descriptor.
 *
 * Why: with buffered writes every byte is first copied into the page cache and the final fsync
 * then pushes it all out in one burst, so the time depends on how the kernel's write-back happens
 * to go (0.45 to 1.6 s for 512 MiB on the test VM). Direct writes go to the disk while the next
 * window is being read, leave the page cache to the user's other files, and take a steady
 * 0.35 to 0.55 s. Only aligned blocks go direct; an unaligned tail, and everything after the
 * file system first refuses direct I/O, goes through the ordinary descriptor.
 */
export class ImageWriter {
  private constructor(
    private readonly buffered: FileHandleLike,
    private direct: FileHandleLike | undefined,
  ) {}

  /** `file` is the open new file at `filePath` (both on `fs`). */
  static async open(fs: FileSystem, file: FileHandleLike, filePath: string): Promise<ImageWriter> {
    try {
      return new ImageWriter(file, await fs.open(filePath, 'w-direct'));
    } catch (err) {
      if (refusesDirectIo(err)) return new ImageWriter(file, undefined);
      throw err;
    }
  }

  /** Whether writes currently bypass the page cache. */
  get isDirect(): boolean {
    return this.direct !== undefined;
  }

  /** A buffer to assemble data in: page-aligned when writes are direct. */
  allocate(bytes: number): Uint8Array {
    return this.direct ? alignedBuffer(bytes) : new Uint8Array(bytes);
  }

  /**
   * Writes `length` bytes of `buffer` from `offset` at `position`. Direct writes need `offset` and
   * `position` aligned (DIRECT_IO_ALIGNMENT) in a buffer from allocate(); others take anything.
   */
  async write(buffer: Uint8Array, offset: number, length: number, position: number): Promise<void> {
    let done = 0;
    const direct = this.direct;
    if (direct && offset % DIRECT_IO_ALIGNMENT === 0 && position % DIRECT_IO_ALIGNMENT === 0) {
      const aligned = length - (length % DIRECT_IO_ALIGNMENT);
      if (aligned > 0) {
        try {
          await direct.write(buffer, offset, aligned, position);
          done = aligned;
        } catch (err) {
          if (!refusesDirectIo(err)) throw err;
          await this.stopDirect(direct);
        }
      }
    }
    if (done < length) await this.buffered.write(buffer, offset + done, length - done, position + done);
  }

  /** Closes the direct descriptor (the ordinary one stays the caller's). */
  async close(): Promise<void> {
    if (this.direct) await this.stopDirect(this.direct);
  }

  private async stopDirect(direct: FileHandleLike): Promise<void> {
    if (this.direct === direct) this.direct = undefined;
    await direct.close();
  }
}
