/**
 * Reads answered from the page cache on the calling thread (FileHandleLike.readCached, preadv2
 * with RWF_NOWAIT): the binding against the kernel, and the engine's use of it, which must give
 * the same bytes whatever part of a span the cache answers (all, some, none).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import type { FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { CACHED_READ_MAX, osCalls, osCallsUnavailable } from '../../src/os/libc.js';
import { seededRandom } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const unavailable = osCallsUnavailable();

describe.skipIf(unavailable !== undefined)(titleWithSkipReason('readCached (preadv2 RWF_NOWAIT) against the kernel', unavailable ? [unavailable] : []), () => {
  const tmp = useTempDir();

  it('answers cached bytes at any offset, up to its native buffer, and 0 at the end of the file', () => {
    const file = path.join(tmp.path, 'f');
    const bytes = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 13) & 0xff));
    fs.writeFileSync(file, bytes);
    const fd = fs.openSync(file, 'r');
    try {
      const into = Buffer.alloc(CACHED_READ_MAX + 10, 0xee);
      expect(osCalls()!.readCached(fd, into, 3, 1000, 12_345)).toBe(1000);
      expect(into.subarray(3, 1003).equals(bytes.subarray(12_345, 13_345))).toBe(true);
      expect(into[2]).toBe(0xee);
      expect(into[1003]).toBe(0xee);
      expect(osCalls()!.readCached(fd, into, 0, CACHED_READ_MAX + 10, 0)).toBe(CACHED_READ_MAX);
      expect(osCalls()!.readCached(fd, into, 0, 100, 200_000)).toBe(0);
    } finally {
      fs.closeSync(fd);
    }
  });

  it.skipIf(missingTools('python3').length > 0)('answers undefined for data not in the page cache (dropped with POSIX_FADV_DONTNEED), instead of waiting for it', () => {
    const file = path.join(tmp.path, 'cold');
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 0x33));
    const drop = spawnSync('python3', ['-c', `import os; fd = os.open(${JSON.stringify(file)}, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)`]);
    expect(drop.status, String(drop.stderr)).toBe(0);
    const fd = fs.openSync(file, 'r');
    try {
      const into = Buffer.alloc(4096);
      const answer = osCalls()!.readCached(fd, into, 0, 4096, 512 << 10);
      // Some file systems (tmpfs) keep everything in memory: there the data is always cached.
      if (answer !== undefined) expect(into.equals(Buffer.alloc(4096, 0x33))).toBe(true);
      else {
        fs.readSync(fd, into, 0, 4096, 512 << 10);
        expect(osCalls()!.readCached(fd, into, 0, 4096, 512 << 10)).toBe(4096);
      }
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe('the engine over a cache that answers all, part or none of a span', () => {
  const tmp = useTempDir();

  /**
   * nodeFileSystem whose handles answer readCached with the first `answer(length)` bytes (read for
   * real), or not at all when it says undefined; no readCached at all when `answer` is undefined.
   */
  function fileSystemWith(answer: ((length: number) => number | undefined) | undefined): FileSystem {
    return {
      ...nodeFileSystem,
      async open(file, mode) {
        const real = await nodeFileSystem.open(file, mode);
        const readCached = (buffer: Uint8Array, offset: number, length: number, position: number) => {
          const n = answer!(length);
          return n === undefined ? undefined : real.readSync!(buffer, offset, n, position);
        };
        return wrapHandle(real, answer ? { readCached } : {});
      },
    };
  }

  it('reads the same bytes as the thread-pool path for any mix of cached, partly cached and uncached spans', async () => {
    const base = path.join(tmp.path, 'base.img');
    const random = seededRandom(5);
    const baseBytes = Buffer.alloc(4 << 20);
    for (let i = 0; i < baseBytes.length; i++) baseBytes[i] = Math.floor(random() * 256);
    fs.writeFileSync(base, baseBytes);
    const cow = path.join(tmp.path, 'disk.cow');
    await createCow(cow, base);
    const writer = await openCow(cow);
    for (let n = 0; n < 300; n++) {
      const data = Buffer.alloc(512 * (1 + Math.floor(random() * 16)));
      for (let i = 0; i < data.length; i++) data[i] = Math.floor(random() * 256);
      await writer.write(512 * Math.floor(random() * (8192 - 16)), data);
    }
    await writer.close();

    const reference = await openCow(cow, { readOnly: true, fs: fileSystemWith(undefined) });
    let calls = 0;
    const flaky = fileSystemWith((length) => {
      calls++;
      const roll = random();
      if (roll < 0.3) return undefined;
      return roll < 0.6 ? 1 + Math.floor(random() * length) : length;
    });
    const device = await openCow(cow, { readOnly: true, fs: flaky });
    try {
      await fc.assert(
        fc.asyncProperty(fc.integer({ min: 0, max: (4 << 20) - 1 }), fc.integer({ min: 1, max: 200_000 }), async (offset, rawLength) => {
          const length = Math.min(rawLength, (4 << 20) - offset);
          const expected = Buffer.from(await reference.read(offset, length));
          const got = Buffer.alloc(length);
          await device.readInto(offset, got);
          expect(got.equals(expected)).toBe(true);
        }),
        { numRuns: 150, seed: 9 },
      );
      expect(calls).toBeGreaterThan(0);
    } finally {
      await device.close();
      await reference.close();
    }
  });
});
