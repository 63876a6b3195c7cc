import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { removeOnSignal } from '../../src/io/file/signal-cleanup.js';
import { useTempDir } from '../helpers/tmp.js';

describe('removeOnSignal', () => {
  const tmp = useTempDir();

  it('listens for SIGINT, SIGTERM and SIGHUP only while something is registered', () => {
    const before = ['SIGINT', 'SIGTERM', 'SIGHUP'].map((signal) => process.listenerCount(signal));
    const forgetA = removeOnSignal(path.join(tmp.path, 'a'));
    const forgetB = removeOnSignal(path.join(tmp.path, 'b'));
    expect(['SIGINT', 'SIGTERM', 'SIGHUP'].map((signal) => process.listenerCount(signal))).toEqual(before.map((n) => n + 1));
    forgetA();
    forgetA(); // twice is harmless
    expect(process.listenerCount('SIGINT')).toBe(before[0] + 1);
    forgetB();
    expect(['SIGINT', 'SIGTERM', 'SIGHUP'].map((signal) => process.listenerCount(signal))).toEqual(before);
  });

  it('on a signal, removes the registered files and leaves the decision to another handler when there is one', () => {
    const file = path.join(tmp.path, '.out.ubdcow-1-x.tmp');
    fs.writeFileSync(file, 'half');
    let seen = 0;
    const other = () => seen++;
    process.on('SIGTERM', other);
    try {
      removeOnSignal(file);
      process.emit('SIGTERM', 'SIGTERM');
      expect(fs.existsSync(file)).toBe(false);
      expect(seen).toBe(1); // the program's own handler got it once, and the process lives on
      expect(process.listenerCount('SIGTERM')).toBe(1);
    } finally {
      process.off('SIGTERM', other);
    }
  });
});

describe('killOnSignal', () => {
  it('kills a registered child on a signal (so no qemu-img outlives ubdcow), and listens only while one is registered', async () => {
    const { spawn } = await import('node:child_process');
    const { killOnSignal } = await import('../../src/io/file/signal-cleanup.js');
    const before = process.listenerCount('SIGTERM');
    const child = spawn('sleep', ['60'], { stdio: 'ignore' });
    const ended = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
    const other = () => undefined;
    process.on('SIGTERM', other);
    try {
      killOnSignal(child);
      expect(process.listenerCount('SIGTERM')).toBe(before + 2);
      process.emit('SIGTERM', 'SIGTERM');
      expect(await ended).toBe('SIGKILL');
      expect(process.listenerCount('SIGTERM')).toBe(before + 1);
    } finally {
      process.off('SIGTERM', other);
    }
    const quiet = spawn('sleep', ['60'], { stdio: 'ignore' });
    const forget = killOnSignal(quiet);
    forget();
    expect(process.listenerCount('SIGTERM')).toBe(before);
    quiet.kill();
  });
});
