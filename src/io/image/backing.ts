import * as path from 'node:path';
import { UbdcowError, backingMismatch, fromSystemError } from '../../errors.js';
import type { CowHeader } from '../../format/header.js';
import {
  describeKind,
  type FileHandleLike,
  type FileStat,
  type FileSystem,
  nodeFileSystem,
  type OpenMode,
} from '../file/index.js';
import { imageSize, isoTime, openImageFile } from './image.js';

/*
 * The backing file, in one place: where it is, whether it is the file the COW was made over
 * (size and mtime, the kernel's backing_file_mismatch()), opening it, and the errors about it.
 * Every command and the engine go through here, so a backing problem reads the same everywhere
 * and has one code: `backing-mismatch` for size or mtime, `backing-<state>` for the rest.
 */

/**
 * Where the backing file is: the override (`-b`, `backing:`) when given, else the header's path,
 * resolved against the CURRENT FOLDER of this process, not the COW's folder. That is the
 * kernel's rule: ubd_kern.c hands the header's string as it is to os_file_modtime(),
 * os_file_size() and os_open_file() (see backing_file_mismatch() and open_ubd_file()), and the
 * C library resolves a relative path against the UML process's current directory. uml_mkcow
 * stores absolute paths, so this matters only for headers written by other tools.
 */
export function resolveBackingPath(header: Pick<CowHeader, 'backingFile'>, override?: string): string {
  return path.resolve(override ?? header.backingFile);
}

export type BackingState = 'ok' | 'missing' | 'unreadable' | 'size-mismatch' | 'mtime-mismatch' | 'not-a-file';

export interface BackingReport {
  /** The path checked: the override if one was given, else the header's, resolved (resolveBackingPath). */
  path: string;
  state: BackingState;
  expected: { size: number; mtime: number };
  actual?: { size: number; mtime: number };
  /** One line saying what is wrong, when something is. */
  problem?: string;
}

/** What the header recorded against what the file is: one line per difference, size first. */
export function backingMismatches(
  backingPath: string,
  expected: { size: number; mtime: number },
  actual: { size: number; mtime: number },
): Array<{ state: 'size-mismatch' | 'mtime-mismatch'; problem: string }> {
  const found: Array<{ state: 'size-mismatch' | 'mtime-mismatch'; problem: string }> = [];
  if (actual.size !== expected.size) {
    found.push({ state: 'size-mismatch', problem: `${backingPath}: backing size is ${actual.size} bytes, header says ${expected.size}` });
  }
  if (actual.mtime !== expected.mtime) {
    found.push({
      state: 'mtime-mismatch',
      problem: `${backingPath}: backing mtime is ${actual.mtime} (${isoTime(actual.mtime)}), header says ${expected.mtime} (${isoTime(expected.mtime)})`,
    });
  }
  return found;
}

/** The kernel's open-time checks on the backing file: there, a file or device, size and mtime as the header says. */
export async function checkBacking(header: CowHeader, override?: string, fs: FileSystem = nodeFileSystem): Promise<BackingReport> {
  const backingPath = resolveBackingPath(header, override);
  const expected = { size: header.size, mtime: header.mtime };
  let stat: FileStat;
  try {
    stat = await fs.stat(backingPath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const state: BackingState = code === 'ENOENT' || code === 'ENOTDIR' ? 'missing' : 'unreadable';
    return { path: backingPath, state, expected, problem: fromSystemError(err, backingPath, 'open backing file').message };
  }
  if (stat.kind !== 'file' && stat.kind !== 'block-device') {
    return { path: backingPath, state: 'not-a-file', expected, problem: `${backingPath}: backing file is ${describeKind(stat.kind)}` };
  }
  let size: number;
  try {
    size = await imageSize(stat, backingPath, 'backing file');
  } catch (err) {
    // A block device whose size cannot be read (sysfs) is a backing file we cannot use.
    return { path: backingPath, state: 'unreadable', expected, problem: (err as Error).message };
  }
  const actual = { size, mtime: stat.mtime };
  const [first] = backingMismatches(backingPath, expected, actual);
  if (first) return { path: backingPath, state: first.state, expected, actual, problem: first.problem };
  return { path: backingPath, state: 'ok', expected, actual };
}

/**
 * What to do about a backing file whose mtime differs from the header's. One rule for every
 * command: reading goes on with a warning (the bytes are most likely right: a copy, a touch), while
 * writing, like the kernel, refuses; both name this way out.
 */
export function mtimeMismatchFix(cowPath: string, backingPath: string): string {
  return `if ${backingPath} is a copy or was only touched, "ubdcow rebase ${cowPath} ${backingPath} --compare" records its mtime; -b FILE names another backing file`;
}

/**
 * The one backing policy for opening a COW's disk, decided here for every command: a backing
 * file that is missing or not a file refuses everything. A size or mtime that differs from the
 * header's refuses writing, as the kernel does, but reading goes on with one warning per
 * difference (the bytes are most likely right: a copy, a touch, a grown image); a read that needs
 * bytes past the backing file's end then fails as `truncated`, never reads zeros. So `cat`,
 * `read`, `diff`, `ls`, `get`, `serve -r` agree. Returns the warnings.
 */
export function backingPolicy(cowPath: string, report: BackingReport, access: 'read' | 'write'): string[] {
  if (report.state === 'ok') return [];
  if ((report.state !== 'size-mismatch' && report.state !== 'mtime-mismatch') || !report.actual) throw backingError(cowPath, report);
  const fix = mtimeMismatchFix(cowPath, report.path);
  if (access === 'write') {
    throw backingError(cowPath, report, report.state === 'mtime-mismatch' ? `refusing to write (${fix})` : undefined);
  }
  return backingMismatches(report.path, report.expected, report.actual).map(
    (mismatch) => `${cowPath}: ${mismatch.problem} (the kernel would refuse it${mismatch.state === 'mtime-mismatch' ? `; ${fix}` : ''})`,
  );
}

/**
 * The error for a backing file that is not usable as is. `cowPath` is the COW it backs;
 * `advice` is appended to a size or mtime mismatch (e.g. "use --force to commit anyway").
 */
export function backingError(cowPath: string, report: BackingReport, advice?: string): UbdcowError {
  const problem = `${cowPath}: ${report.problem ?? `backing file ${report.path} is ${report.state}`}`;
  if (report.state === 'size-mismatch' || report.state === 'mtime-mismatch') {
    return backingMismatch(report.path, advice ? `${problem}; ${advice}` : problem);
  }
  const code = report.state === 'ok' ? 'backing-unreadable' : (`backing-${report.state}` as const);
  return new UbdcowError(code, problem, { file: report.path });
}

/** An open backing file (or raw image): the path it was opened by, the handle, its size and mtime. */
export interface OpenedFile {
  path: string;
  handle: FileHandleLike;
  size: number;
  mtime: number;
}

/**
 * Opens a backing file (or any raw image: `what` names it in errors) after refusing what cannot be
 * one; its size is looked up (sysfs for a block device) and a failure there names the file.
 * The caller closes `handle`.
 */
export async function openBacking(fs: FileSystem, file: string, mode: Extract<OpenMode, 'r' | 'r+'> = 'r', what = 'backing file'): Promise<OpenedFile> {
  const action = mode === 'r' ? `read ${what}` : `open ${what} for writing`;
  const { handle, stat } = await openImageFile(fs, file, what, mode, action);
  try {
    return { path: file, handle, size: await imageSize(stat, file, what), mtime: stat.mtime };
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}
