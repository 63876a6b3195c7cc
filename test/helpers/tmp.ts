import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';

/** A fresh folder under os.tmpdir(), its real path (so it compares equal to what tools store). */
export function makeTempDir(prefix = 'ubdcow-test-'): string {
  return fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), prefix)));
}

export function removeTempDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

/**
 * One temp folder per test: call at describe level, read `.path` inside tests.
 * `scope: 'file'` shares one folder across the suite instead (for expensive setup).
 */
export function useTempDir(scope: 'test' | 'file' = 'test'): { readonly path: string } {
  let current: string | undefined;
  const holder = {
    get path(): string {
      if (!current) throw new Error('temp dir used outside a test');
      return current;
    },
  };
  const setUp = () => {
    current = makeTempDir();
  };
  const tearDown = () => {
    if (current) removeTempDir(current);
    current = undefined;
  };
  if (scope === 'test') {
    beforeEach(setUp);
    afterEach(tearDown);
  } else {
    beforeAll(setUp);
    afterAll(tearDown);
  }
  return holder;
}

/** Runs `fn` in `dir` as the current folder, then goes back (vitest's forks pool allows chdir). */
export async function inFolder<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const previous = process.cwd();
  process.chdir(dir);
  try {
    return await fn();
  } finally {
    process.chdir(previous);
  }
}
