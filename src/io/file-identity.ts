import * as path from 'node:path';
import type { FileSystem } from './file.js';

/*
 * Which file a path names, as the kernel decides it: by device and inode (ubd_kern.c,
 * path_requires_switch, compares st_dev and st_ino), not by spelling. A symlink, a hard link, a
 * symlinked folder or a relative path all reach the same (dev, ino); comparing paths, even real
 * paths, misses hard links. Invariant: two paths get the same identity exactly when they open the
 * same file (on a file system that reports dev and ino; otherwise the real path stands in).
 */

/** `dev:ino` of the file `file` reaches (symlinks followed); the real path where the file system gives no inode. */
export async function fileIdentity(fs: FileSystem, file: string): Promise<string> {
  const stat = await fs.stat(file);
  if (stat.dev !== undefined && stat.ino !== undefined) return `${stat.dev}:${stat.ino}`;
  return `path:${await fs.realpath(file)}`;
}

/** Like fileIdentity, but undefined when the file cannot be reached (missing, dangling link, no access). */
export async function fileIdentityOrUndefined(fs: FileSystem, file: string): Promise<string | undefined> {
  return fileIdentity(fs, file).catch(() => undefined);
}

/**
 * The names of `file` this process can find without a full scan: the path as written (made
 * absolute) and its real path (every symlink, of the file or of a folder on the way, resolved).
 * Other hard links to it can live anywhere on the device and are not found here.
 */
export async function knownNames(fs: FileSystem, file: string): Promise<string[]> {
  const names = [path.resolve(file)];
  const real = await fs.realpath(file).catch(() => undefined);
  if (real !== undefined && !names.includes(real)) names.push(real);
  return names;
}

/** The folders holding the known names of `file`: where other users of it are most likely kept. */
export async function foldersOfKnownNames(fs: FileSystem, file: string): Promise<string[]> {
  return [...new Set((await knownNames(fs, file)).map((name) => path.dirname(name)))];
}
