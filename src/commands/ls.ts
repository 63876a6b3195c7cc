/**
 * `ubdcow ls`: the entries of a directory in a guest's ext2/3/4 file system (like virt-ls),
 * read from a raw image or a COW seen through its backing file, without booting anything.
 */
import { type GuestFsOptions, type GuestStat, openGuestFs } from '../guestfs/guest-fs.js';
import type { JournalReplayNote } from '../guestfs/journal-replay.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface LsOptions extends GuestFsOptions {
  /** Every entry below PATH, with full paths. */
  recursive?: boolean;
}

export interface LsEntry {
  /** Full guest path. */
  path: string;
  name: string;
  type: GuestStat['type'];
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Seconds since the epoch. */
  mtime: number;
  /** Symlinks only. */
  target?: string;
}

export interface LsResult {
  image: string;
  path: string;
  location: string;
  entries: LsEntry[];
  warnings: string[];
  /** Set when the journal needed recovery and was replayed in memory. */
  journal?: JournalReplayNote;
}

function join(dir: string, name: string): string {
  return dir === '/' ? `/${name}` : `${dir}/${name}`;
}

const listGuestOptionKeys: OptionKeys<LsOptions> = { backing: true, partition: true, recursive: true };

export async function listGuest(image: string, guestPath = '/', options: LsOptions = {}): Promise<LsResult> {
  checkOptions('listGuest', options, listGuestOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  try {
    const start = await guest.realpath(guestPath);
    const entries: LsEntry[] = [];
    const startStat = await guest.stat(start);
    const visit = async (dir: string): Promise<void> => {
      for (const { name, stat } of await guest.list(dir)) {
        const path = join(dir, name);
        const entry: LsEntry = { path, name, type: stat.type, mode: stat.mode, uid: stat.uid, gid: stat.gid, size: stat.size, mtime: stat.mtime };
        if (stat.type === 'symlink') entry.target = await guest.readlink(path);
        entries.push(entry);
        if (options.recursive && stat.type === 'dir') await visit(path);
      }
    };
    if (startStat.type === 'dir') {
      await visit(start);
    } else {
      const stat = await guest.lstat(start);
      const name = start.slice(start.lastIndexOf('/') + 1);
      entries.push({ path: start, name, type: stat.type, mode: stat.mode, uid: stat.uid, gid: stat.gid, size: stat.size, mtime: stat.mtime });
    }
    return { image, path: start, location: guest.location, entries, warnings: guest.warnings, ...(guest.journal ? { journal: guest.journal } : {}) };
  } finally {
    await guest.close();
  }
}
