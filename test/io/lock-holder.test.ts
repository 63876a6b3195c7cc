/*
 * Naming the holder of a lock from /proc/PID/cmdline and exe: a UML kernel, this program's CLI
 * (bin/ubdcow or dist/cli inside the ubdcow package), anything else. The fake /proc trees below
 * hold what the kernel shows for each; the real cases (a python3 holder, `ubdcow serve` holding
 * a COW that `ubdcow commit` wants, a booted UML) are in lock.test.ts, nbd/serve-lock-holder.test.ts
 * and uml/lock-while-running.test.ts.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { describeLockHolder, procSource } from '../../src/io/lock/lock-holder.js';
import { useTempDir } from '../helpers/tmp.js';

describe('describeLockHolder', () => {
  const tmp = useTempDir();
  const realRoot = procSource.root;
  afterEach(() => {
    procSource.root = realRoot;
  });

  function fakeProcess(pid: number, args: string[], links: { exe?: string; cwd?: string } = {}): void {
    procSource.root = path.join(tmp.path, 'proc');
    const dir = path.join(procSource.root, String(pid));
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'cmdline'), `${args.join('\0')}\0`);
    if (links.exe) fs.symlinkSync(links.exe, path.join(dir, 'exe'));
    if (links.cwd) fs.symlinkSync(links.cwd, path.join(dir, 'cwd'));
  }

  it('a UML kernel by its program name or by its ubdN= arguments', () => {
    fakeProcess(100, ['linux.uml', 'mem=64M', 'ubdb=vm.cow,base.img']);
    expect(describeLockHolder(100)).toEqual({ pid: 100, kind: 'uml', name: 'a running UML' });
    fakeProcess(101, ['./my-kernel', 'ubd0=root.cow,root.img'], { exe: '/opt/my-kernel' });
    expect(describeLockHolder(101).kind).toBe('uml');
    fakeProcess(102, ['/usr/bin/vmlinux', 'con=null']);
    expect(describeLockHolder(102).kind).toBe('uml');
  });

  it('ubdcow run as bin/ubdcow, or as a script inside the ubdcow package given relative to its cwd', () => {
    fakeProcess(200, ['node', '/usr/lib/node_modules/ubdcow/bin/ubdcow', 'serve', 'vm.cow', '--socket', 's']);
    expect(describeLockHolder(200)).toEqual({ pid: 200, kind: 'ubdcow', name: 'ubdcow serve' });
    const pkg = path.join(tmp.path, 'checkout');
    fs.mkdirSync(path.join(pkg, 'dist', 'cli'), { recursive: true });
    fs.writeFileSync(path.join(pkg, 'package.json'), JSON.stringify({ name: 'ubdcow' }));
    // A package.json without a name (dist's {"type": "module"}) does not decide; the one above does.
    fs.writeFileSync(path.join(pkg, 'dist', 'package.json'), JSON.stringify({ type: 'module' }));
    fakeProcess(201, ['/usr/local/bin/node', '--enable-source-maps', 'dist/cli/main.js', '-v', 'commit', 'vm.cow'], { cwd: pkg });
    expect(describeLockHolder(201)).toEqual({ pid: 201, kind: 'ubdcow', name: 'ubdcow commit' });
  });

  it('any other program by its name; a process that cannot be read by its pid alone', () => {
    const other = path.join(tmp.path, 'other');
    fs.mkdirSync(other);
    fs.writeFileSync(path.join(other, 'package.json'), JSON.stringify({ name: 'not-ubdcow' }));
    fakeProcess(300, ['node', 'tool.js', 'serve'], { cwd: other });
    expect(describeLockHolder(300)).toEqual({ pid: 300, kind: 'other', name: 'node' });
    fakeProcess(301, ['/usr/bin/python3', '-c', 'import fcntl']);
    expect(describeLockHolder(301)).toEqual({ pid: 301, kind: 'other', name: 'python3' });
    expect(describeLockHolder(999_999)).toEqual({ pid: 999_999, kind: 'other', name: 'process' });
  });
});
