/**
 * `ubdcow get`: a guest file's bytes (like virt-cat), symlinks resolved inside the guest, streamed
 * in large chunks straight from the extents. With an output file, the file appears whole or not
 * at all (written under a temporary name, then linked or renamed into place), holes kept.
 * A path is a string (UTF-8) or bytes (guest names are bytes).
 */
import { type GuestFsOptions, type GuestPath, openGuestFs } from '../guestfs/guest-fs.js';
import { nodeFileSystem, writeNewFile } from '../io/file/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface GetOptions extends GuestFsOptions {
  onWarning?: (warning: string) => void;
}

const getGuestFileOptionKeys: OptionKeys<GetOptions> = { backing: true, partition: true, onWarning: true };

/** The bytes of a regular guest file, chunk by chunk (the image stays open until iteration ends). */
export async function* getGuestFile(image: string, guestPath: GuestPath, options: GetOptions = {}): AsyncGenerator<Uint8Array> {
  checkOptions('getGuestFile', options, getGuestFileOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  try {
    for (const warning of guest.warnings) options.onWarning?.(warning);
    yield* guest.readChunks(guestPath);
  } finally {
    await guest.close();
  }
}

/**
 * Copies a guest file to a new host file; `replace` allows overwriting one that exists. Only the
 * file's written extents are written (positionally), then the length is set: the guest file's
 * holes and unwritten extents stay holes in the copy, as `get > FILE` leaves them.
 */
export async function getGuestFileTo(image: string, guestPath: GuestPath, output: string, replace: boolean, options: GetOptions = {}): Promise<{ bytes: number }> {
  checkOptions('getGuestFileTo', options, getGuestFileOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  try {
    for (const warning of guest.warnings) options.onWarning?.(warning);
    // Resolve first, so a missing guest path (or one that is not a regular file) never creates a host file.
    const { inode } = await guest.resolve(guestPath, true);
    if (inode.type !== 'file') await guest.readRuns(guestPath).next();
    await writeNewFile(nodeFileSystem, output, replace, async (file) => {
      for await (const run of guest.volume.readRuns(inode)) await file.write(run.bytes, 0, run.bytes.length, run.position);
      await file.truncate(inode.size);
    });
    return { bytes: inode.size };
  } finally {
    await guest.close();
  }
}
