import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { type FileHandleLike, nodeFileSystem } from '../../src/io/file.js';
import { isCowFileLocked, lockCowFile, unlockCowFile } from '../../src/io/lock.js';
import { holdLockInChild, procLocksFor } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';

const missing = missingTools('python3');

/** Asks another process (python's lockf, i.e. fcntl F_SETLK) whether it could take a write lock. */
function childCanLock(file: string): Promise<boolean> {
  const script = [
    'import fcntl, sys',
    "f = open(sys.argv[1], 'r+b')",
    'try:',
    '    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)',
    "    print('free')",
    'except OSError:',
    "    print('held')",
  ].join('\n');
  return new Promise((resolve, reject) => {
    const child = spawn('python3', ['-c', script, file]);
    let out = '';
    child.stdout.on('data', (chunk) => (out += chunk));
    child.on('error', reject);
    child.on('exit', () => resolve(out.trim() === 'free'));
  });
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('COW file locks (POSIX fcntl, as the UML kernel takes them)', missing), () => {
  const tmp = useTempDir();

  function makeFile(): string {
    const file = path.join(tmp.path, 'vm.cow');
    fs.writeFileSync(file, Buffer.alloc(8192, 1));
    return file;
  }

  it('refuses a file another process holds a write lock on, with a one-line "locked" error', async () => {
    const file = makeFile();
    const holder = await holdLockInChild(file);
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      const err = await lockCowFile(handle, file).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(UbdcowError);
      expect((err as UbdcowError).code).toBe('locked');
      expect((err as UbdcowError).message).toBe(
        `${file}: in use by another process (a running UML holds a lock on it; see /proc/locks)`,
      );
      // A read lock conflicts with the kernel's write lock too.
      const reader = await nodeFileSystem.open(file, 'r');
      try {
        expect(await isCowFileLocked(reader, file, { exclusive: false })).toBe(true);
      } finally {
        await reader.close();
      }
    } finally {
      await handle.close();
      await holder.release();
    }
  });

  it('succeeds once the other process lets go', async () => {
    const file = makeFile();
    const holder = await holdLockInChild(file);
    await holder.release();
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      await lockCowFile(handle, file);
    } finally {
      await handle.close();
    }
  });

  it('the lock it takes is the kind UML takes: whole-file POSIX write lock, seen by other processes', async () => {
    const file = makeFile();
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      expect(await childCanLock(file)).toBe(true);
      await lockCowFile(handle, file);
      expect(await childCanLock(file)).toBe(false);
      const locks = procLocksFor(file);
      expect(locks).toHaveLength(1);
      expect(locks[0]).toMatch(new RegExp(`POSIX\\s+ADVISORY\\s+WRITE\\s+${process.pid}\\s+\\S+\\s+0\\s+EOF`));
      await unlockCowFile(handle, file);
      expect(await childCanLock(file)).toBe(true);
      expect(procLocksFor(file)).toHaveLength(0);
    } finally {
      await handle.close();
    }
  });

  it('a read lock (for reading a COW) also keeps a UML from taking its write lock', async () => {
    const file = makeFile();
    const handle = await nodeFileSystem.open(file, 'r');
    try {
      await lockCowFile(handle, file, { exclusive: false });
      expect(await childCanLock(file)).toBe(false);
      expect(procLocksFor(file)[0]).toMatch(/POSIX\s+ADVISORY\s+READ/);
    } finally {
      await handle.close();
    }
    expect(await childCanLock(file)).toBe(true);
  });

  it('probing leaves no lock behind', async () => {
    const file = makeFile();
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      expect(await isCowFileLocked(handle, file)).toBe(false);
      expect(procLocksFor(file)).toHaveLength(0);
    } finally {
      await handle.close();
    }
  });

  it('a write lock on a read-only handle is an error naming the file, not "locked"', async () => {
    const file = makeFile();
    const handle = await nodeFileSystem.open(file, 'r');
    try {
      const err = await lockCowFile(handle, file, { exclusive: true }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(UbdcowError);
      expect((err as UbdcowError).code).toBe('EBADF');
      expect((err as UbdcowError).message).toMatch(/vm\.cow: cannot lock/);
    } finally {
      await handle.close();
    }
  });
});

describe('handles without a descriptor', () => {
  it('are not locked (an injected test file system has nothing to lock)', async () => {
    const handle = { fd: undefined } as unknown as FileHandleLike;
    await expect(lockCowFile(handle, 'memory.cow')).resolves.toBeUndefined();
    await expect(isCowFileLocked(handle, 'memory.cow')).resolves.toBe(false);
  });
});
