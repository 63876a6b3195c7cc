import * as path from 'node:path';
import { UbdcowError } from '../../errors.js';
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

/** Whether paths `a` and `b` reach the same file (by identity); false when either cannot be reached. */
export async function sameFile(fs: FileSystem, a: string, b: string): Promise<boolean> {
  const [first, second] = await Promise.all([fileIdentityOrUndefined(fs, a), fileIdentityOrUndefined(fs, b)]);
  return first !== undefined && first === second;
}

/** A file a command reads or depends on, and how messages name its role ("the backing file of vm.cow"). */
export interface ProtectedFile {
  file: string;
  role: string;
}

/**
 * Refuses to write `output` when it is, by identity, one of `inputs` (by any name: the same path,
 * a symlink, a hard link): replacing it would destroy what the command reads, or the file another
 * image depends on. Call before anything is written. `--force` does not lift it.
 */
export async function refuseOutputOverInput(fs: FileSystem, output: string, inputs: readonly ProtectedFile[]): Promise<void> {
  for (const input of inputs) {
    if (!(await sameFile(fs, output, input.file))) continue;
    const alias = path.resolve(output) === path.resolve(input.file) ? '' : ` (${input.file}, by another name)`;
    throw new UbdcowError('same-file', `${output}: is ${input.role}${alias}; writing there would destroy it, even with -f: name another output file`, { file: output });
  }
}
