/**
 * `ubdcow get`: a guest file's bytes (like virt-cat), symlinks resolved inside the guest, streamed
 * in large chunks straight from the extents. With an output file, the file appears whole or not
 * at all (written under a temporary name, then linked or renamed into place).
 */
import { type GuestFsOptions, openGuestFs } from '../guestfs/guest-fs.js';
import { nodeFileSystem } from '../io/node-fs.js';
import { writeNewFile } from '../io/atomic.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface GetOptions extends GuestFsOptions {
  onWarning?: (warning: string) => void;
}

const getGuestFileOptionKeys: OptionKeys<GetOptions> = { backing: true, partition: true, onWarning: true };

/** The bytes of a regular guest file, chunk by chunk (the image stays open until iteration ends). */
export async function* getGuestFile(image: string, guestPath: string, options: GetOptions = {}): AsyncGenerator<Uint8Array> {
  checkOptions('getGuestFile', options, getGuestFileOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  try {
    for (const warning of guest.warnings) options.onWarning?.(warning);
    yield* guest.readChunks(guestPath);
  } finally {
    await guest.close();
  }
}

/** Copies a guest file to a new host file; `replace` allows overwriting one that exists. */
export async function getGuestFileTo(image: string, guestPath: string, output: string, replace: boolean, options: GetOptions = {}): Promise<{ bytes: number }> {
  checkOptions('getGuestFileTo', options, getGuestFileOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  let bytes = 0;
  try {
    for (const warning of guest.warnings) options.onWarning?.(warning);
    // Resolve first, so a missing guest path never creates a host file.
    const stat = await guest.stat(guestPath);
    // readChunks refuses a non-file with the same message get prints, before reading anything.
    if (stat.type !== 'file') await guest.readChunks(guestPath).next();
    await writeNewFile(nodeFileSystem, output, replace, async (file) => {
      for await (const chunk of guest.readChunks(guestPath)) {
        await file.write(chunk, 0, chunk.length, bytes);
        bytes += chunk.length;
      }
    });
    return { bytes };
  } finally {
    await guest.close();
  }
}
