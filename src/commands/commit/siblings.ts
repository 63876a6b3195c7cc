import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../../errors.js';
import { resolveBackingPath } from '../../io/backing.js';
import type { FileSystem } from '../../io/file.js';
import { probeHeader } from '../../io/image.js';

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
  const self = await fs.realpath(cowPath).catch(() => path.resolve(cowPath));
  const backing = await fs.realpath(backingPath).catch(() => path.resolve(backingPath));
  const found = new Set<string>();
  const unreadable: UbdcowError[] = [];
  for (const folder of new Set(folders.map((f) => path.resolve(f)))) {
    let names: string[];
    try {
      names = await fs.readdir(folder);
    } catch (err) {
      unreadable.push(fromSystemError(err, folder, 'list folder'));
      continue;
    }
    for (const name of names) {
      const candidate = path.join(folder, name);
      if (found.has(candidate) || (await fs.realpath(candidate).catch(() => candidate)) === self) continue;
      try {
        if (await namesBacking(fs, candidate, backing)) found.add(candidate);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (!code || !skippable.has(code)) unreadable.push(fromSystemError(err, candidate, 'read'));
      }
    }
  }
  return { siblings: [...found].sort(), unreadable };
}

async function namesBacking(fs: FileSystem, file: string, backingRealPath: string): Promise<boolean> {
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
  const resolved = await fs.realpath(named).catch(() => named);
  return resolved === backingRealPath;
}
