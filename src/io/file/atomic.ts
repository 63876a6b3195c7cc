import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../../errors.js';
import type { FileHandleLike, FileSystem } from './file.js';
import { removeOnSignal } from './signal-cleanup.js';

/** A hidden sibling name for building `destination` before it appears atomically. */
export function temporaryNameFor(destination: string): string {
  const random = Math.random().toString(36).slice(2, 10);
  return path.join(path.dirname(destination), `.${path.basename(destination)}.ubdcow-${process.pid}-${random}.tmp`);
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** What follows `.NAME.ubdcow-` in a temporaryNameFor name; group 1 is the pid. */
const TEMPORARY_SUFFIX = /^(\d+)-[a-z0-9]+\.tmp$/;

/**
 * Removes temporary files an earlier ubdcow left for `destination` when it was killed (SIGKILL
 * allows no cleanup), recognised by name and by their process no longer running. Best effort.
 * `suffix` matches what follows `.NAME.ubdcow-` (group 1: the pid); by default temporaryNameFor's.
 */
export async function removeStaleTemporaries(fs: FileSystem, destination: string, suffix: RegExp = TEMPORARY_SUFFIX): Promise<string[]> {
  const prefix = `.${path.basename(destination)}.ubdcow-`;
  const names = await fs.readdir(path.dirname(destination)).catch(() => [] as string[]);
  const removed: string[] = [];
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(suffix.exec(name.slice(prefix.length))?.[1]);
    if (!Number.isInteger(pid) || pid === process.pid || isRunning(pid)) continue;
    const full = path.join(path.dirname(destination), name);
    if (await fs.unlink(full).then(() => true, () => false)) removed.push(full);
  }
  return removed;
}

/** The refusal to replace `file`, wherever a command finds it already there. */
export function existsError(file: string): UbdcowError {
  return new UbdcowError('exists', `${file}: already exists (use --force to overwrite)`, { file });
}

/**
 * Refuses early when `file` is already there: a fail-fast before long work. writeNewFile's link()
 * is what makes no-clobber atomic (a file appearing meanwhile, or a dangling symlink, fails there).
 */
export async function refuseExisting(fs: FileSystem, file: string): Promise<void> {
  const exists = await fs.stat(file).then(
    () => true,
    (err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? false : Promise.reject(fromSystemError(err, file, 'check whether it exists'))),
  );
  if (exists) throw existsError(file);
}

/**
 * Writes a file under a temporary name in the same folder, syncs it, then puts it in place:
 * with link() when it must not replace anything (atomic no-clobber), rename() when it may.
 * The destination never holds a half-written file, and on failure it is untouched.
 */
export async function writeNewFile(
  fs: FileSystem,
  destination: string,
  replace: boolean,
  fill: (file: FileHandleLike, temporaryPath: string) => Promise<void>,
): Promise<void> {
  await removeStaleTemporaries(fs, destination);
  const temporary = temporaryNameFor(destination);
  let file: FileHandleLike;
  try {
    file = await fs.open(temporary, 'wx');
  } catch (err) {
    throw fromSystemError(err, destination, 'create');
  }
  // Ctrl-C or SIGTERM while the file is being built removes it (issue 15 item 4).
  const forget = removeOnSignal(temporary);
  // Set once `destination` is our new file, linked next to the temporary name (no-clobber mode).
  let linked = false;
  try {
    try {
      await fill(file, temporary);
      await file.sync();
    } finally {
      await file.close();
    }
    if (replace) {
      await fs.rename(temporary, destination);
    } else {
      await fs.link(temporary, destination);
      linked = true;
      await fs.unlink(temporary);
    }
    await fs.syncDirectory(path.dirname(destination));
  } catch (err) {
    // A failure after link() would leave the new file in place while reporting an error, and a
    // re-run would then refuse it as existing: take it away again (it is ours, link never clobbers).
    if (linked) await fs.unlink(destination).catch(() => undefined);
    await fs.unlink(temporary).catch(() => undefined);
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw existsError(destination);
    }
    throw fromSystemError(err, destination, 'write');
  } finally {
    forget();
  }
}
