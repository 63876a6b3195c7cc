import { UbdcowError, fileEndsEarly, fromSystemError } from '../../errors.js';
import { openCow } from './engine.js';
import { type FileHandleLike, type FileSystem, readExactly, sizeOf, writeAll } from '../file/index.js';
import { lockCowFile } from '../lock/index.js';
import { looksLikeCow } from './virtual-disk.js';

/*
 * A disk opened to be changed, held under a write lock from open to close (the lock UML takes,
 * so a running guest or another ubdcow writer makes the open refuse, and neither can start
 * meanwhile): a COW through the engine (writes land in its data area and bitmap; the backing file
 * is only read), or a raw image file itself. Reads and writes are byte ranges of the virtual disk.
 *
 * The same descriptor does the reading and the writing: POSIX locks vanish when the process
 * closes any descriptor of the file, so nothing here opens the image twice.
 */
export interface LockedDisk {
  path: string;
  kind: 'cow' | 'raw';
  size: number;
  /** Bytes from the start that can be written: less than `size` only in V1/V2 COWs (the last sectors have no bitmap bit). */
  writableBytes: number;
  warnings: string[];
  read(offset: number, into: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes every write so far durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

export interface OpenLockedDiskOptions {
  fs: FileSystem;
  backing?: string;
  /** Raw images are written only when this is set (a COW is what customize is for). */
  allowRaw: boolean;
}

export async function openLockedDisk(image: string, options: OpenLockedDiskOptions): Promise<LockedDisk> {
  if (await looksLikeCow(options.fs, image)) {
    const device = await openCow(image, { backing: options.backing, fs: options.fs, blockingReads: true });
    return {
      path: image,
      kind: 'cow',
      size: device.size,
      writableBytes: Math.min(device.size, device.geometry.coveredSectors * device.sectorSize),
      warnings: device.warnings,
      read: async (offset, into) => {
        await device.readInto(offset, into);
      },
      write: (offset, data) => device.write(offset, data),
      flush: () => device.flush(),
      close: () => device.close(),
    };
  }
  if (options.backing !== undefined) throw new UbdcowError('not-a-cow', `${image}: is not a UML COW file, so a backing file (${options.backing}) makes no sense for it`, { file: image });
  if (!options.allowRaw) {
    throw new UbdcowError('not-a-cow', `${image}: is a raw image, not a COW; customize changes a raw image only with --in-place (or create a COW over it with ubdcow create and customize that)`, { file: image });
  }
  let handle: FileHandleLike;
  try {
    handle = await options.fs.open(image, 'r+');
  } catch (err) {
    throw fromSystemError(err, image, 'open for writing');
  }
  try {
    await lockCowFile(handle, image, { exclusive: true });
    const size = await sizeOf(await handle.stat());
    return {
      path: image,
      kind: 'raw',
      size,
      writableBytes: size,
      warnings: [],
      read: (offset, into) =>
        readExactly(handle, image, 'read', { buffer: into, offset: 0, length: into.length, position: offset }, (got) =>
          fileEndsEarly(image, offset, got, offset + into.length, 'disk image'),
        ),
      write: (offset, data) => writeAll(handle, image, 'write', { buffer: data, offset: 0, length: data.length, position: offset }),
      flush: () => handle.datasync().catch((err) => { throw fromSystemError(err, image, 'flush'); }),
      close: () => handle.close(),
    };
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}
