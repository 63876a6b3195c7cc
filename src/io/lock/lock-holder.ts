/**
 * Who holds a lock: a process id (from fcntl F_GETLK or /proc/locks) described from
 * /proc/PID/cmdline and /proc/PID/exe, so a refusal names the holder (a running UML, `ubdcow
 * serve`, any other program) instead of guessing. Everything here is best effort: a process
 * that is gone or unreadable is described by its pid alone.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface LockHolder {
  pid: number;
  /** 'uml': a UML kernel; 'ubdcow': this program's CLI; 'other': anything else. */
  kind: 'uml' | 'ubdcow' | 'other';
  /** "a running UML", "ubdcow serve", "python3", or "process" when nothing could be read. */
  name: string;
}

/** Where process facts are read from (tests point it elsewhere). */
export const procSource = { root: '/proc' };

export function describeLockHolder(pid: number): LockHolder {
  const args = readCmdline(pid);
  const exe = readLink(path.join(procSource.root, String(pid), 'exe'));
  const program = path.basename(args[0] ?? exe ?? '');
  if (isUmlKernel(program, exe, args)) return { pid, kind: 'uml', name: 'a running UML' };
  const command = ubdcowCommand(pid, program, exe, args);
  if (command !== undefined) return { pid, kind: 'ubdcow', name: command };
  return { pid, kind: 'other', name: program || 'process' };
}

function readCmdline(pid: number): string[] {
  try {
    const text = fs.readFileSync(path.join(procSource.root, String(pid), 'cmdline'), 'utf8');
    return text.split('\0').filter((arg, i, all) => arg !== '' || i < all.length - 1);
  } catch {
    return [];
  }
}

function readLink(file: string): string | undefined {
  try {
    return fs.readlinkSync(file);
  } catch {
    return undefined;
  }
}

/** linux.uml / linux / vmlinux, or a command line with ubdN= devices (a self-built UML kernel). */
function isUmlKernel(program: string, exe: string | undefined, args: string[]): boolean {
  const kernelName = /^(linux|vmlinux)([.-]?uml)?$/i;
  if (kernelName.test(program) || (exe !== undefined && kernelName.test(path.basename(exe)))) return true;
  return args.slice(1).some((arg) => /^ubd\d+[a-z]*=/.test(arg));
}

/**
 * "ubdcow SUBCOMMAND" when the process runs this program: node running a script named ubdcow, or
 * a script inside a package named "ubdcow" (bin/ubdcow, dist/cli/main.js of a checkout).
 */
function ubdcowCommand(pid: number, program: string, exe: string | undefined, args: string[]): string | undefined {
  const isNode = /^node(js)?\d*$/.test(program) || (exe !== undefined && /^node(js)?\d*$/.test(path.basename(exe)));
  let scriptAt = 1;
  if (isNode) {
    // Skip node's own options (--enable-source-maps, --import x is rare enough to ignore).
    while (scriptAt < args.length && args[scriptAt]!.startsWith('-')) scriptAt++;
  } else if (program === 'ubdcow') {
    scriptAt = 0;
  } else {
    return undefined;
  }
  const script = args[scriptAt];
  if (script === undefined) return undefined;
  if (path.basename(script) !== 'ubdcow' && !insideUbdcowPackage(pid, script)) return undefined;
  const subcommand = args.slice(scriptAt + 1).find((arg) => !arg.startsWith('-'));
  return subcommand === undefined ? 'ubdcow' : `ubdcow ${subcommand}`;
}

function insideUbdcowPackage(pid: number, script: string): boolean {
  const cwd = readLink(path.join(procSource.root, String(pid), 'cwd')) ?? '/';
  let dir = path.dirname(path.resolve(cwd, script));
  for (;;) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown };
      if (pkg.name !== undefined) return pkg.name === 'ubdcow';
    } catch {
      // No package.json here (or not readable): look further up.
    }
    const parent = path.dirname(dir);
    if (parent === dir) return false;
    dir = parent;
  }
}
