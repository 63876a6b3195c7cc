import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import { UbdcowError } from '../../src/errors.js';
import { holdLockInChild } from '../helpers/cow-fixtures.js';

async function codeOf(promise: Promise<unknown>): Promise<string | undefined> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UbdcowError);
  expect((err as Error).message).not.toContain('\n');
  return (err as UbdcowError).code;
}

describe('openCow API contract', () => {
  let dir: string;
  let base: string;
  let cow: string;
  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-engine-api-'));
    base = path.join(dir, 'base.img');
    cow = path.join(dir, 'disk.cow');
    await fsp.writeFile(base, Buffer.alloc(64 * 1024, 0xab));
    await createCow(cow, base);
  });
  afterEach(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('reports size and sector size, reads the backing through an empty COW', async () => {
    const dev = await openCow(cow);
    expect(dev.size).toBe(64 * 1024);
    expect(dev.sectorSize).toBe(512);
    expect(Buffer.from(await dev.read(100, 1000)).equals(Buffer.alloc(1000, 0xab))).toBe(true);
    expect((await dev.read(0, 0)).length).toBe(0);
    const buffer = new Uint8Array(700);
    await dev.write(600, Buffer.alloc(200, 0x5a));
    expect(await dev.readInto(300, buffer)).toBe(buffer);
    expect(Buffer.from(buffer).equals(Buffer.concat([Buffer.alloc(300, 0xab), Buffer.alloc(200, 0x5a), Buffer.alloc(200, 0xab)]))).toBe(true);
    await dev.close();
  });

  it('blockingReads: the same bytes through the blocking path, and a cut-short backing still names the file', async () => {
    const dev = await openCow(cow, { blockingReads: true });
    await dev.write(1000, Buffer.alloc(5000, 0x11));
    const blocking = Buffer.from(await dev.read(0, 64 * 1024));
    await dev.close();
    const plain = await openCow(cow, { readOnly: true });
    expect(blocking.equals(Buffer.from(await plain.read(0, 64 * 1024)))).toBe(true);
    await plain.close();
    expect(blocking.subarray(1000, 6000).equals(Buffer.alloc(5000, 0x11))).toBe(true);
    // A read past the end of a backing file that shrank under us: an error, never zeros.
    const reader = await openCow(cow, { readOnly: true, blockingReads: true });
    await fsp.truncate(base, 32 * 1024);
    const err = await reader.read(40 * 1024, 4096).catch((e: Error) => e);
    expect(String(err)).toMatch(/base\.img/);
    await reader.close();
  });

  it('rejects out-of-range and malformed requests with clear errors', async () => {
    const dev = await openCow(cow);
    expect(await codeOf(dev.read(64 * 1024 - 10, 11))).toBe('out-of-range');
    expect(await codeOf(dev.write(64 * 1024, new Uint8Array(1)))).toBe('out-of-range');
    expect(await codeOf(dev.read(-1, 10))).toBe('out-of-range');
    expect(await codeOf(dev.read(1.5, 10))).toBe('out-of-range');
    await dev.close();
  });

  it('rejects writes on a read-only device, and use after close', async () => {
    const ro = await openCow(cow, { readOnly: true });
    expect(await codeOf(ro.write(0, new Uint8Array(1)))).toBe('read-only');
    await ro.close();
    expect(await codeOf(ro.read(0, 1))).toBe('closed');
    expect(await codeOf(ro.flush())).toBe('closed');
    await ro.close(); // closing twice is harmless
  });

  it('close() drains requests still in flight', async () => {
    const dev = await openCow(cow);
    const writes = Array.from({ length: 50 }, (_, i) => dev.write(i * 700, Buffer.alloc(300, i + 1)));
    await dev.close();
    await Promise.all(writes);
    const again = await openCow(cow, { readOnly: true });
    for (let i = 0; i < 50; i++) expect(Buffer.from(await again.read(i * 700, 300)).equals(Buffer.alloc(300, i + 1))).toBe(true);
    await again.close();
  });

  it('refuses a backing file whose size or mtime changed, as the kernel does', async () => {
    await fsp.utimes(base, new Date(), new Date(Date.now() + 5000));
    expect(await codeOf(openCow(cow))).toBe('backing-mismatch');
    // Reading goes on, with a warning naming the way out (one rule for every reader, as cat has).
    const reader = await openCow(cow, { readOnly: true });
    expect(reader.warnings.join('\n')).toMatch(/the kernel would refuse it; .*ubdcow rebase .* --compare" records its mtime/);
    await reader.close();
    const writer = await openCow(cow).catch((err: Error) => err);
    expect(String(writer)).toMatch(/refusing to write \(if .* is a copy or was only touched, "ubdcow rebase/);
    await fsp.appendFile(base, Buffer.alloc(512));
    expect(await codeOf(openCow(cow))).toBe('backing-mismatch');
    await fsp.rm(base);
    expect(await codeOf(openCow(cow))).toBe('backing-missing');
  });

  it('names the backing file it opened (the override, not the header\'s) when a read from it fails', async () => {
    const moved = path.join(dir, 'moved.img');
    await fsp.cp(base, moved, { preserveTimestamps: true });
    const dev = await openCow(cow, { backing: moved, readOnly: true });
    try {
      // The override shrinks under the open device: the read of its second half comes up short.
      await fsp.truncate(moved, 32 * 1024);
      const err = await dev.read(40 * 1024, 512).then(
        () => undefined,
        (e: unknown) => e as UbdcowError,
      );
      expect(err).toBeInstanceOf(UbdcowError);
      expect(err!.code).toBe('truncated');
      expect(err!.file).toBe(moved);
      expect(err!.message).toContain(moved);
      expect(err!.message).not.toContain(base);
    } finally {
      await dev.close();
    }
  });

  it('uses a backing file given in place of the stored path, after the same checks', async () => {
    const moved = path.join(dir, 'moved.img');
    await fsp.cp(base, moved, { preserveTimestamps: true });
    await fsp.rm(base);
    const dev = await openCow(cow, { backing: moved });
    expect(Buffer.from(await dev.read(0, 4)).equals(Buffer.alloc(4, 0xab))).toBe(true);
    await dev.close();
  });

  it('refuses a COW another process holds a POSIX lock on (as a running UML does)', async () => {
    const holder = await holdLockInChild(cow);
    try {
      expect(await codeOf(openCow(cow))).toBe('locked');
    } finally {
      await holder.release();
    }
    const dev = await openCow(cow);
    await dev.close();
  });

  it('with sync, acknowledged writes read back after reopening', async () => {
    const dev = await openCow(cow, { sync: true });
    await Promise.all([dev.write(10, Buffer.from('first')), dev.write(5000, Buffer.from('second'))]);
    await dev.flush();
    await dev.close();
    const again = await openCow(cow, { readOnly: true });
    expect(Buffer.from(await again.read(10, 5)).toString()).toBe('first');
    expect(Buffer.from(await again.read(5000, 6)).toString()).toBe('second');
    // Whole 4 KiB pages (allocationUnit): sectors 0-7 and 8-15, nothing after.
    expect(again.isAllocated(0)).toBe(true);
    expect(again.isAllocated(9)).toBe(true);
    expect(again.isAllocated(1)).toBe(true);
    expect(again.isAllocated(15)).toBe(true);
    expect(again.isAllocated(16)).toBe(false);
    await again.close();
  });
});
