/*
 * ImageWriter: a new image's bytes go through an O_DIRECT descriptor where the file system takes
 * one, through the ordinary descriptor otherwise, and the file ends up the same either way.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { DIRECT_IO_ALIGNMENT, type FileSystem, alignedBuffer, nodeFileSystem } from '../../src/io/file.js';
import { ImageWriter } from '../../src/io/image-writer.js';
import { useTempDir } from '../helpers/tmp.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

function pattern(length: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 131 + seed * 7 + (i >> 9)) & 0xff;
  return bytes;
}

/** The open(2) flags of a descriptor of this process, from /proc. */
function openFlags(fd: number): number {
  const line = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').split('\n').find((text) => text.startsWith('flags:'));
  return parseInt(line!.split(/\s+/)[1], 8);
}

/** Whether the folder's file system takes O_DIRECT (tmpfs before Linux 6.6 and some FUSE ones do not). */
function directIoWorks(dir: string): boolean {
  const probe = path.join(dir, 'direct-probe');
  try {
    const fd = fs.openSync(probe, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_DIRECT);
    try {
      fs.writeSync(fd, alignedBuffer(DIRECT_IO_ALIGNMENT), 0, DIRECT_IO_ALIGNMENT, 0);
      return true;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return false;
  } finally {
    fs.rmSync(probe, { force: true });
  }
}

function expectFileHolds(file: string, expected: Uint8Array): void {
  const actual = fs.readFileSync(file);
  expect(actual.length).toBe(expected.length);
  // Buffer.compare, not toEqual: a byte-by-byte deep comparison of 300 KiB takes most of a second.
  expect(Buffer.compare(actual, expected)).toBe(0);
}

/** Writes `data` in pieces (aligned ones, then an unaligned tail), the way commit does. */
async function writeInPieces(writer: ImageWriter, buffer: Uint8Array, pieces: Array<[number, number]>): Promise<void> {
  await Promise.all(pieces.map(([start, end]) => writer.write(buffer, start, end - start, start)));
}

const SIZE = 5 * 65536 + 1234;
const PIECES: Array<[number, number]> = [
  [0, 65536],
  [65536, 3 * 65536],
  [3 * 65536, 4 * 65536],
  [4 * 65536, SIZE],
];

describe('ImageWriter', () => {
  const tmp = useTempDir();

  it('writes aligned blocks through an O_DIRECT descriptor and the tail through the ordinary one', async (context) => {
    if (!directIoWorks(tmp.path)) context.skip(`${tmp.path}: this file system refuses O_DIRECT, so only the fallback can be tested here`);
    const file = path.join(tmp.path, 'image');
    const out = await nodeFileSystem.open(file, 'wx');
    const directWrites: number[] = [];
    const recordingFs: FileSystem = {
      ...nodeFileSystem,
      async open(target, mode) {
        const handle = await nodeFileSystem.open(target, mode);
        if (mode !== 'w-direct') return handle;
        expect(openFlags(handle.fd!) & fs.constants.O_DIRECT).toBe(fs.constants.O_DIRECT);
        return wrapHandle(handle, {
          write: (buffer, offset, length, position) => {
            directWrites.push(position, length);
            return handle.write(buffer, offset, length, position);
          },
        });
      },
    };
    const writer = await ImageWriter.open(recordingFs, out, file);
    expect(writer.isDirect).toBe(true);
    const buffer = writer.allocate(SIZE);
    buffer.set(pattern(SIZE, 1));
    await writeInPieces(writer, buffer, PIECES);
    await writer.close();
    await out.close();
    expectFileHolds(file, pattern(SIZE, 1));
    // Every byte up to the last whole 4 KiB block went direct; only the 1234-byte tail did not.
    const directBytes = directWrites.filter((_, i) => i % 2 === 1).reduce((sum, length) => sum + length, 0);
    expect(directBytes).toBe(SIZE - (SIZE % DIRECT_IO_ALIGNMENT));
  });

  it('falls back to ordinary writes where the file system refuses O_DIRECT at open', async () => {
    const file = path.join(tmp.path, 'image');
    const out = await nodeFileSystem.open(file, 'wx');
    const refusingFs: FileSystem = {
      ...nodeFileSystem,
      async open(target, mode) {
        if (mode === 'w-direct') throw Object.assign(new Error('EINVAL: invalid argument, open'), { code: 'EINVAL' });
        return nodeFileSystem.open(target, mode);
      },
    };
    const writer = await ImageWriter.open(refusingFs, out, file);
    expect(writer.isDirect).toBe(false);
    const buffer = writer.allocate(SIZE);
    buffer.set(pattern(SIZE, 2));
    await writeInPieces(writer, buffer, PIECES);
    await writer.close();
    await out.close();
    expectFileHolds(file, pattern(SIZE, 2));
  });

  it('switches to ordinary writes for good when a direct write is refused (EINVAL), losing nothing', async () => {
    const file = path.join(tmp.path, 'image');
    const out = await nodeFileSystem.open(file, 'wx');
    let directAttempts = 0;
    let directClosed = false;
    const flakyFs: FileSystem = {
      ...nodeFileSystem,
      async open(target, mode) {
        const handle = await nodeFileSystem.open(target, mode);
        if (mode !== 'w-direct') return handle;
        return wrapHandle(handle, {
          write: async () => {
            directAttempts++;
            throw Object.assign(new Error('EINVAL: invalid argument, write'), { code: 'EINVAL' });
          },
          close: () => {
            directClosed = true;
            return handle.close();
          },
        });
      },
    };
    const writer = await ImageWriter.open(flakyFs, out, file);
    expect(writer.isDirect).toBe(true);
    const buffer = writer.allocate(SIZE);
    buffer.set(pattern(SIZE, 3));
    await writer.write(buffer, 0, 65536, 0);
    expect(writer.isDirect).toBe(false);
    expect(directClosed).toBe(true);
    await writeInPieces(writer, buffer, PIECES.slice(1));
    expect(directAttempts).toBe(1);
    await writer.close();
    await out.close();
    expectFileHolds(file, pattern(SIZE, 3));
  });

  it('passes other errors of a direct write on (a full disk is not a reason to retry)', async () => {
    const file = path.join(tmp.path, 'image');
    const out = await nodeFileSystem.open(file, 'wx');
    const fullFs: FileSystem = {
      ...nodeFileSystem,
      async open(target, mode) {
        const handle = await nodeFileSystem.open(target, mode);
        if (mode !== 'w-direct') return handle;
        return wrapHandle(handle, {
          write: async () => {
            throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
          },
        });
      },
    };
    const writer = await ImageWriter.open(fullFs, out, file);
    const buffer = writer.allocate(65536);
    await expect(writer.write(buffer, 0, 65536, 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    await writer.close();
    await out.close();
  });

  it('hands out page-aligned buffers (what O_DIRECT needs of memory)', async (context) => {
    if (!directIoWorks(tmp.path)) context.skip(`${tmp.path}: this file system refuses O_DIRECT, so alignment cannot be observed here`);
    const file = path.join(tmp.path, 'image');
    fs.writeFileSync(file, '');
    const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_DIRECT);
    try {
      for (const bytes of [4096, 65536, 4 << 20, 5000]) {
        const buffer = alignedBuffer(bytes);
        expect(buffer.length).toBe(bytes);
        expect(buffer.every((byte) => byte === 0)).toBe(true);
        expect(fs.writeSync(fd, buffer, 0, DIRECT_IO_ALIGNMENT, 0)).toBe(DIRECT_IO_ALIGNMENT);
      }
      // The control: the kernel does check, and answers EINVAL to memory 16 bytes off.
      const misaligned = alignedBuffer(2 * DIRECT_IO_ALIGNMENT);
      expect(() => fs.writeSync(fd, misaligned, 16, DIRECT_IO_ALIGNMENT, 0)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    } finally {
      fs.closeSync(fd);
    }
  });
});
