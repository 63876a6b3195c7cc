/*
 * The real file layer (nodeFileSystem's handles): reads and writes run on the raw descriptor with
 * callbacks, so what FileHandle used to guarantee is checked here against the OS.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { useTempDir } from '../helpers/tmp.js';

/** A new empty file opened read-write ('wx' opens write-only, as O_EXCL creation does). */
async function openNew(file: string) {
  fs.writeFileSync(file, '');
  return nodeFileSystem.open(file, 'r+');
}

function pattern(length: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 31 + seed) & 0xff;
  return bytes;
}

describe('nodeFileSystem handles', () => {
  const tmp = useTempDir();

  it('writes at positions and reads the same bytes back, into the given buffer offset', async () => {
    const file = path.join(tmp.path, 'data');
    const handle = await openNew(file);
    const data = pattern(10_000, 3);
    await handle.write(data, 1000, 5000, 7);
    const target = new Uint8Array(6000).fill(0xee);
    expect(await handle.read(target, 500, 5000, 7)).toBe(5000);
    await handle.close();
    expect(target.subarray(0, 500).every((byte) => byte === 0xee)).toBe(true);
    expect(target.subarray(500, 5500)).toEqual(data.subarray(1000, 6000));
    expect(target.subarray(5500).every((byte) => byte === 0xee)).toBe(true);
    const onDisk = fs.readFileSync(file);
    expect(onDisk.length).toBe(5007);
    expect(new Uint8Array(onDisk.subarray(7))).toEqual(data.subarray(1000, 6000));
  });

  it('returns a short count at end of file and 0 past it or for an empty read', async () => {
    const file = path.join(tmp.path, 'short');
    fs.writeFileSync(file, pattern(100, 1));
    const handle = await nodeFileSystem.open(file, 'r');
    const buffer = new Uint8Array(64);
    expect(await handle.read(buffer, 0, 64, 60)).toBe(40);
    expect(buffer.subarray(0, 40)).toEqual(pattern(100, 1).subarray(60));
    expect(await handle.read(buffer, 0, 64, 100)).toBe(0);
    expect(await handle.read(buffer, 0, 64, 5000)).toBe(0);
    expect(await handle.read(buffer, 0, 0, 0)).toBe(0);
    await handle.close();
  });

  it('blocking calls: the same bytes at the same places, short count at EOF, errors as system errors, EBADF once closing', async () => {
    const file = path.join(tmp.path, 'blocking');
    const handle = await openNew(file);
    const data = pattern(3 * 1024 * 1024 + 17, 4);
    handle.writeSync!(data, 5, data.length - 5, 100);
    const back = new Uint8Array(data.length);
    expect(handle.readSync!(back, 0, data.length, 100)).toBe(data.length - 5);
    expect(Buffer.from(back.subarray(0, data.length - 5)).equals(Buffer.from(data.subarray(5)))).toBe(true);
    expect(handle.readSync!(back, 0, 64, 10 << 20)).toBe(0);
    // The async and blocking views agree.
    const viaAsync = new Uint8Array(4096);
    expect(await handle.read(viaAsync, 0, 4096, 100)).toBe(4096);
    expect(viaAsync).toEqual(data.subarray(5, 4101));
    const closed = handle.close();
    expect(() => handle.readSync!(back, 0, 16, 0)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'read' }));
    expect(() => handle.writeSync!(data, 0, 16, 0)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'write' }));
    await closed;
    const readOnly = await nodeFileSystem.open(file, 'r');
    expect(() => readOnly.writeSync!(data, 0, 16, 0)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    await readOnly.close();
    const folder = await nodeFileSystem.open(tmp.path, 'r');
    expect(() => folder.readSync!(back, 0, 16, 0)).toThrow(expect.objectContaining({ code: 'EISDIR' }));
    await folder.close();
  });

  it('writes and reads a multi-megabyte range whole', async () => {
    const file = path.join(tmp.path, 'large');
    const data = pattern(3 * 1024 * 1024 + 17, 9);
    const handle = await openNew(file);
    await handle.write(data, 0, data.length, 0);
    const back = new Uint8Array(data.length);
    expect(await handle.read(back, 0, back.length, 0)).toBe(data.length);
    expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true);
    await handle.close();
  });

  it('keeps many concurrent reads and writes apart', async () => {
    const file = path.join(tmp.path, 'concurrent');
    const handle = await openNew(file);
    const blocks = Array.from({ length: 64 }, (_, index) => pattern(4096, index));
    await Promise.all(blocks.map((block, index) => handle.write(block, 0, block.length, index * 4096)));
    const back = await Promise.all(
      blocks.map(async (_, index) => {
        const buffer = new Uint8Array(4096);
        await handle.read(buffer, 0, 4096, index * 4096);
        return buffer;
      }),
    );
    expect(Buffer.concat(back).equals(Buffer.concat(blocks))).toBe(true);
    await handle.close();
  });

  it('close waits for reads and writes in flight, then refuses new ones with EBADF', async () => {
    const file = path.join(tmp.path, 'closing');
    const handle = await nodeFileSystem.open(file, 'wx');
    const data = pattern(1 << 20, 5);
    const writes = Array.from({ length: 8 }, (_, index) => handle.write(data, 0, data.length, index * data.length));
    const closed = handle.close();
    await expect(handle.read(new Uint8Array(16), 0, 16, 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'read' });
    await expect(handle.write(data, 0, 16, 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'write' });
    await Promise.all(writes);
    await closed;
    expect(handle.close()).toBe(closed);
    expect(fs.statSync(file).size).toBe(8 * data.length);
    expect(fs.readFileSync(file).subarray(7 * data.length).equals(Buffer.from(data))).toBe(true);
  });

  it('rejects an I/O error with the system error code', async () => {
    const handle = await nodeFileSystem.open(tmp.path, 'r');
    await expect(handle.read(new Uint8Array(16), 0, 16, 0)).rejects.toMatchObject({ code: 'EISDIR', syscall: 'read' });
    await handle.close();
  });

  it('rejects a write through a read-only handle with EBADF', async () => {
    const file = path.join(tmp.path, 'readonly');
    fs.writeFileSync(file, 'x');
    const handle = await nodeFileSystem.open(file, 'r');
    await expect(handle.write(new Uint8Array(4), 0, 4, 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'write' });
    await handle.close();
  });

  it('rejects bad buffer arguments instead of throwing', async () => {
    const file = path.join(tmp.path, 'args');
    fs.writeFileSync(file, pattern(64, 2));
    const handle = await nodeFileSystem.open(file, 'r');
    const result = handle.read(new Uint8Array(8), 4, 8, 0);
    expect(result).toBeInstanceOf(Promise);
    await expect(result).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    // The refused call is not counted as in flight: close still completes.
    await handle.close();
  });
});
