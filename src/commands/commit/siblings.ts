import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../../errors.js';
import { probeHeader, resolveBackingPath } from '../../io/image/index.js';
import { fileIdentity, type FileSystem, foldersOfKnownNames } from '../../io/file/index.js';

/** Errors that mean "this is not something we could read anyway", not "we could not look". */
const skippable = new Set(['ENOENT', 'EACCES', 'EPERM', 'ELOOP', 'ENOTDIR']);

export interface SiblingSearch {
  siblings: string[];
  /** Files or folders that could not be read, so whether they are siblings is unknown. */
  unreadable: UbdcowError[];
}

/**
 * COW files in `folders` (other than `cowPath`) whose header names `backingPath` as their backing
 * file. Committing one VM's changes into a base that other COWs read from would silently change
 * the disks those VMs see. Only regular files are opened (a FIFO would block), and only their
 * first bytes are read; files that are not COWs are skipped. I/O errors are collected, not
 * swallowed: the caller must not take "could not look" for "none there".
 */
export async function findSiblingCows(fs: FileSystem, cowPath: string, backingPath: string, folders: string[]): Promise<SiblingSearch> {
  // Files are told apart by (dev, ino), as the kernel does (issue 15 item 1): a sibling may name
  // the base through a symlink, a hard link or a symlinked folder. The folders of every known
  // name of the base (as written, real path) are searched besides the ones given.
  const self = await fileIdentity(fs, cowPath).catch((err) => {
    throw fromSystemError(err, cowPath, 'read');
  });
  const backing = await fileIdentity(fs, backingPath).catch((err) => {
    throw fromSystemError(err, backingPath, 'read');
  });
  const found = new Set<string>();
  const seen = new Set<string>();
  const unreadable: UbdcowError[] = [];
  const searched = [...folders, ...(await foldersOfKnownNames(fs, backingPath))];
  for (const folder of new Set(searched.map((f) => path.resolve(f)))) {
    let names: string[];
    try {
      names = await fs.readdir(folder);
    } catch (err) {
      unreadable.push(fromSystemError(err, folder, 'list folder'));
      continue;
    }
    for (const name of names) {
      const candidate = path.join(folder, name);
      try {
        // One file seen under two names (a folder and its symlink, two hard links) counts once;
        // a name that reaches no file (a dangling link) is nothing a UML could open.
        const identity = await fileIdentity(fs, candidate);
        if (identity === self || seen.has(identity)) continue;
        seen.add(identity);
        if (await namesBacking(fs, candidate, backing)) found.add(candidate);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (!code || !skippable.has(code)) unreadable.push(fromSystemError(err, candidate, 'read'));
      }
    }
  }
  return { siblings: [...found].sort(), unreadable };
}

async function namesBacking(fs: FileSystem, file: string, backing: string): Promise<boolean> {
  const stat = await fs.stat(file);
  if (stat.kind !== 'file' || stat.size < 8) return false;
  const handle = await fs.open(file, 'r');
  let probe;
  try {
    probe = await probeHeader(handle, file, 'read');
  } finally {
    await handle.close();
  }
  // Not a COW file (or not one any reader would use).
  if (!('parsed' in probe)) return false;
  // Where the kernel would look for it (resolveBackingPath), so a sibling is what a UML would read.
  const named = resolveBackingPath(probe.parsed.header);
  // A backing that is not there is not this one; any other failure to look is the caller's to report.
  const identity = await fileIdentity(fs, named).catch((err: NodeJS.ErrnoException) => {
    if (err.code && skippable.has(err.code)) return undefined;
    throw err;
  });
  return identity === backing;
}
