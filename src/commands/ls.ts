/**
 * `ubdcow ls`: the entries of a directory in a guest's ext2/3/4 file system (like virt-ls),
 * read from a raw image or a COW seen through its backing file, without booting anything.
 *
 * The walk goes by inode (each directory's blocks read once, each child's inode decoded from the
 * inode table), never re-resolving a path from the root, so `-R` costs time linear in the entries
 * whatever the depth. Names are bytes: each entry keeps a best-effort string and, when that string
 * is not the exact bytes, their base64. One broken entry (a corrupt inode, an unreadable directory,
 * a directory hard link that loops) is reported in `errors` and the walk goes on.
 */
import { UbdcowError } from '../errors.js';
import { type GuestFsOptions, type GuestPath, type GuestStat, openGuestFs, statOf } from '../guestfs/guest-fs.js';
import type { Inode } from '../guestfs/ext-layout.js';
import { decodeName, escapeName, joinPathBytes, lossless } from '../guestfs/guest-names.js';
import type { JournalReplayNote } from '../guestfs/journal-replay.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface LsOptions extends GuestFsOptions {
  /** Every entry below PATH, with full paths. */
  recursive?: boolean;
}

export interface LsEntry {
  /** Full guest path (U+FFFD where its bytes are not UTF-8). */
  path: string;
  /** The exact bytes of `path`, base64, only when `path` is not them (a name that is not UTF-8). */
  pathBytes?: string;
  name: string;
  /** As pathBytes, for `name`. */
  nameBytes?: string;
  type: GuestStat['type'];
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Seconds since the epoch (negative before 1970; ext4's epoch bits give times past 2038). */
  mtime: number;
  /** Symlinks only. */
  target?: string;
  /** As pathBytes, for `target`. */
  targetBytes?: string;
}

/** An entry that could not be listed (the rest of the listing is still there). */
export interface LsProblem {
  path: string;
  pathBytes?: string;
  /** One line, terminal-safe (control characters and non-UTF-8 bytes escaped). */
  message: string;
}

export interface LsResult {
  image: string;
  path: string;
  location: string;
  entries: LsEntry[];
  errors: LsProblem[];
  warnings: string[];
  /** Set when the journal needed recovery and was replayed in memory. */
  journal?: JournalReplayNote;
}

const listGuestOptionKeys: OptionKeys<LsOptions> = { backing: true, partition: true, recursive: true };

function withBytes<K extends string>(key: K, bytes: Uint8Array): Partial<Record<K, string>> {
  const exact = lossless(bytes);
  return exact === undefined ? {} : ({ [key]: exact } as Record<K, string>);
}

export async function listGuest(image: string, guestPath: GuestPath = '/', options: LsOptions = {}): Promise<LsResult> {
  checkOptions('listGuest', options, listGuestOptionKeys);
  const guest = await openGuestFs(image, { backing: options.backing, partition: options.partition });
  try {
    const volume = guest.volume;
    const start = await guest.resolve(guestPath, true);
    const entries: LsEntry[] = [];
    const errors: LsProblem[] = [];
    const problem = (pathBytes: Uint8Array, err: unknown) => {
      if (!(err instanceof UbdcowError)) throw err;
      errors.push({ path: decodeName(pathBytes), ...withBytes('pathBytes', pathBytes), message: err.message });
    };
    const entryOf = async (pathBytes: Uint8Array, nameBytes: Uint8Array, inode: Inode): Promise<LsEntry> => {
      const stat = statOf(inode);
      const entry: LsEntry = {
        path: decodeName(pathBytes),
        ...withBytes('pathBytes', pathBytes),
        name: decodeName(nameBytes),
        ...withBytes('nameBytes', nameBytes),
        type: stat.type,
        mode: stat.mode,
        uid: stat.uid,
        gid: stat.gid,
        size: stat.size,
        mtime: stat.mtime,
      };
      if (stat.type === 'symlink') {
        const target = await volume.readLink(inode);
        entry.target = decodeName(target);
        Object.assign(entry, withBytes('targetBytes', target));
      }
      return entry;
    };
    // Directory inode -> the path it was first listed at: a directory met twice (a hard link to a
    // directory, which only a corrupt or crafted file system has) is not walked again, so a loop ends.
    const listed = new Map<number, Uint8Array>();
    const visit = async (dirBytes: Uint8Array, dir: Inode): Promise<void> => {
      listed.set(dir.ino, dirBytes);
      const children: Array<{ pathBytes: Uint8Array; nameBytes: Uint8Array; ino: number }> = [];
      for (const child of await volume.readDir(dir)) children.push({ pathBytes: joinPathBytes(dirBytes, child.nameBytes), nameBytes: child.nameBytes, ino: child.ino });
      children.sort((x, y) => Buffer.compare(x.nameBytes, y.nameBytes));
      // A directory's entries are read together (inodes, slow symlinks' blocks): the reads overlap
      // in the I/O threads instead of waiting one by one; the listing keeps the sorted order.
      const read = await Promise.all(
        children.map(async (child) => {
          try {
            const inode = await volume.readInode(child.ino);
            return { inode, entry: await entryOf(child.pathBytes, child.nameBytes, inode) };
          } catch (err) {
            return { err };
          }
        }),
      );
      for (const [i, child] of children.entries()) {
        const { inode, entry, err } = read[i]!;
        if (!inode || !entry) {
          problem(child.pathBytes, err);
          continue;
        }
        entries.push(entry);
        if (!options.recursive || inode.type !== 'dir') continue;
        const first = listed.get(inode.ino);
        if (first !== undefined) {
          problem(
            child.pathBytes,
            volume.corrupt(`${escapeName(child.pathBytes)} is directory inode ${inode.ino} again, already listed at ${escapeName(first)} (a hard link to a directory${isPrefix(child.pathBytes, first) ? ', which loops' : ''}); not listed twice`),
          );
          continue;
        }
        try {
          await visit(child.pathBytes, inode);
        } catch (err) {
          problem(child.pathBytes, err);
        }
      }
    };
    if (start.inode.type === 'dir') {
      await visit(start.pathBytes, start.inode);
    } else {
      // Resolved with every symlink followed, so this is the file itself.
      entries.push(await entryOf(start.pathBytes, start.pathBytes.subarray(start.pathBytes.lastIndexOf(0x2f) + 1), start.inode));
    }
    return { image, path: start.path, location: guest.location, entries, errors, warnings: guest.warnings, ...(guest.journal ? { journal: guest.journal } : {}) };
  } finally {
    await guest.close();
  }
}

/** `first` is an ancestor of `path` (so walking `path` would go round in a circle). */
function isPrefix(path: Uint8Array, first: Uint8Array): boolean {
  if (first.length === 1) return true;
  return path.length > first.length && path[first.length] === 0x2f && Buffer.compare(path.subarray(0, first.length), first) === 0;
}
