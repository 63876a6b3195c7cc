import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { type FileHandleLike } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { isCowFileLocked, lockCowFile, parseProcLocks, procLocksId, unlockCowFile } from '../../src/io/lock/lock.js';
import { overrideOsCalls } from '../../src/os/libc.js';
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
      // The holder is named from fcntl(F_GETLK)'s pid: python3 here, not "a running UML".
      expect((err as UbdcowError).message).toBe(
        `${file}: in use by another process: held by python3 (pid ${holder.child.pid}); stop it or wait until it ends, then retry; see /proc/locks`,
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

/** A child process holding a shared (read) POSIX lock on `file`, as a UML reading a backing file does. */
async function holdReadLockInChild(file: string): Promise<{ release(): Promise<void> }> {
  const script = ['import fcntl, sys', "f = open(sys.argv[1], 'rb')", 'fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)', "print('locked', flush=True)", 'sys.stdin.read()'].join('\n');
  const child = spawn('python3', ['-c', script, file], { stdio: ['pipe', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => chunk.toString().includes('locked') && resolve());
    child.on('exit', (code) => reject(new Error(`read-lock holder exited with ${code}`)));
  });
  return {
    release: () =>
      new Promise<void>((resolve) => {
        child.on('exit', () => resolve());
        child.stdin.end();
      }),
  };
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('without the fcntl binding: holders found in /proc/locks, one warning', missing), () => {
  const tmp = useTempDir();
  let restore: { reset(): void };
  let warnings: string[];
  beforeEach(() => {
    restore = overrideOsCalls(undefined, 'koffi did not load (forced by a test)');
    warnings = [];
    vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => {
      warnings.push(String(chunk));
      return true;
    });
  });
  afterEach(() => {
    vi.restoreAllMocks();
    restore.reset();
  });

  function makeFile(): string {
    const file = path.join(tmp.path, 'vm.cow');
    fs.writeFileSync(file, Buffer.alloc(8192, 1));
    return file;
  }

  it('a free file is used, with one one-line warning that it cannot be locked, given once per process', async () => {
    const file = makeFile();
    // A probe alone (check's "in use?") only looks, and warns of nothing.
    const prober = await nodeFileSystem.open(file, 'r');
    try {
      expect(await isCowFileLocked(prober, file, { exclusive: false })).toBe(false);
    } finally {
      await prober.close();
    }
    expect(warnings).toEqual([]);
    for (let round = 0; round < 2; round++) {
      const handle = await nodeFileSystem.open(file, 'r+');
      try {
        await lockCowFile(handle, file);
        // Nothing was locked: another process still can.
        expect(await childCanLock(file)).toBe(true);
        expect(await isCowFileLocked(handle, file)).toBe(false);
      } finally {
        await handle.close();
      }
    }
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^ubdcow: warning: .*vm\.cow: .*cannot be locked here \(koffi did not load \(forced by a test\)\).*\n$/);
    expect(warnings[0]!.trimEnd().split('\n')).toHaveLength(1);
  });

  it('a file another process holds a write lock on is refused as "locked", for writing and for reading', async () => {
    const file = makeFile();
    const holder = await holdLockInChild(file);
    try {
      for (const [mode, exclusive] of [['r+', true], ['r', false]] as const) {
        const handle = await nodeFileSystem.open(file, mode);
        try {
          const err = await lockCowFile(handle, file, { exclusive }).then(() => undefined, (e: unknown) => e);
          expect(err).toBeInstanceOf(UbdcowError);
          expect((err as UbdcowError).code).toBe('locked');
          expect((err as UbdcowError).message).toContain(`held by python3 (pid ${holder.child.pid})`);
          expect(await isCowFileLocked(handle, file, { exclusive })).toBe(true);
        } finally {
          await handle.close();
        }
      }
    } finally {
      await holder.release();
    }
    // Once the holder is gone, /proc/locks no longer lists it.
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      await expect(lockCowFile(handle, file)).resolves.toBeUndefined();
    } finally {
      await handle.close();
    }
  });

  it('a read lock held elsewhere refuses a write lock but not a read lock', async () => {
    const file = makeFile();
    const holder = await holdReadLockInChild(file);
    try {
      const writer = await nodeFileSystem.open(file, 'r+');
      const reader = await nodeFileSystem.open(file, 'r');
      try {
        expect(await isCowFileLocked(writer, file, { exclusive: true })).toBe(true);
        expect(await isCowFileLocked(reader, file, { exclusive: false })).toBe(false);
      } finally {
        await writer.close();
        await reader.close();
      }
    } finally {
      await holder.release();
    }
  });
});

describe('/proc/locks parsing', () => {
  it('reads kind, access, pid and the device:inode id, and leaves out blocked waiters', () => {
    const text = [
      '1: POSIX  ADVISORY  WRITE 6783 fe:00:2146738 0 EOF',
      '1: -> POSIX  ADVISORY  WRITE 6790 fe:00:2146738 0 EOF',
      '2: OFDLCK ADVISORY  READ  -1 00:2e:17 0 EOF',
      '3: FLOCK  ADVISORY  WRITE 812 00:19:1022 0 EOF',
      '',
    ].join('\n');
    expect(parseProcLocks(text)).toEqual([
      { kind: 'POSIX', access: 'WRITE', pid: 6783, id: 'fe:00:2146738' },
      { kind: 'OFDLCK', access: 'READ', pid: -1, id: '00:2e:17' },
      { kind: 'FLOCK', access: 'WRITE', pid: 812, id: '00:19:1022' },
    ]);
  });

  it('names a file as the kernel does: the id of a file this process locks appears in /proc/locks', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-lockid-'));
    const file = path.join(dir, 'x');
    fs.writeFileSync(file, 'x');
    const handle = await nodeFileSystem.open(file, 'r+');
    try {
      await lockCowFile(handle, file);
      const stat = fs.statSync(file, { bigint: true });
      const ids = parseProcLocks(fs.readFileSync('/proc/locks', 'utf8')).filter((lock) => lock.pid === process.pid).map((lock) => lock.id);
      expect(ids).toContain(procLocksId(Number(stat.dev), stat.ino));
    } finally {
      await handle.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
