import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { removeOnSignal } from '../../src/io/signal-cleanup.js';
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
