import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';

/*
 * Temporary files removed when the process is interrupted (issue 15 item 4). A SIGINT (Ctrl-C) or
 * SIGTERM during `commit COW OUT` used to kill Node on the spot and leave the hidden
 * `.OUT.ubdcow-PID-*.tmp` behind until a later run for the same OUT swept it. While a temporary
 * (or a temporary folder, as convert's) is registered here, those signals first remove it (synchronously: no other code runs between
 * the removal and the exit, so a half-built file can never be put in place), then the process
 * ends by the same signal, as it would have without us (shell status 130 or 143). SIGKILL allows
 * no cleanup: the sweep in removeStaleTemporaries (atomic.ts) stays for that. Child processes
 * registered with killOnSignal (qemu-img writing such a temporary) are killed first, so none
 * outlives us and none recreates a file after it was removed.
 *
 * Invariant: handlers are installed only while something is registered, so a library user's own
 * signal handling is untouched the rest of the time.
 */

const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

const registered = new Set<string>();
const children = new Set<ChildProcess>();

function onSignal(signal: NodeJS.Signals): void {
  for (const child of children) child.kill('SIGKILL');
  children.clear();
  for (const file of registered) {
    try {
      fs.rmSync(file, { recursive: true, force: true });
    } catch {
      // Already gone (renamed into place, or never created on this file system): nothing to do.
    }
  }
  registered.clear();
  uninstall();
  // With our handlers gone, the default action applies: the process ends by this signal. A program
  // using the library with its own handler has already been given this signal: it decides.
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}

function install(): void {
  for (const signal of SIGNALS) process.on(signal, onSignal);
}

function uninstall(): void {
  for (const signal of SIGNALS) process.off(signal, onSignal);
}

function forgetOne(remove: () => boolean): void {
  if (!remove()) return;
  if (registered.size === 0 && children.size === 0) uninstall();
}

function register(add: () => void): void {
  if (registered.size === 0 && children.size === 0) install();
  add();
}

/** Kills `child` (SIGKILL) if the process is interrupted before the returned function is called. */
export function killOnSignal(child: ChildProcess): () => void {
  register(() => children.add(child));
  return () => forgetOne(() => children.delete(child));
}

/** Removes `file` (or a folder and what is in it) if the process is interrupted before the returned function is called. */
export function removeOnSignal(file: string): () => void {
  register(() => registered.add(file));
  return () => forgetOne(() => registered.delete(file));
}
