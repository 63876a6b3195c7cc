/*
 * ImageWriter: a new image's bytes go through an O_DIRECT descriptor where the file system takes
 * one, through the ordinary descriptor otherwise, and the file ends up the same either way.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { DIRECT_IO_ALIGNMENT, type FileHandleLike, type FileSystem, alignedBuffer } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { ImageWriter } from '../../src/io/file/image-writer.js';
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

/** nodeFileSystem, with each O_DIRECT handle it opens passed through `change`. */
function changingDirectHandles(change: (handle: FileHandleLike) => FileHandleLike): FileSystem {
  return {
    ...nodeFileSystem,
    async open(target, mode) {
      const handle = await nodeFileSystem.open(target, mode);
      return mode === 'w-direct' ? change(handle) : handle;
    },
  };
}

function systemError(code: string, call: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: injected, ${call}`), { code });
}

describe('ImageWriter', () => {
  const tmp = useTempDir();

  /** A new file in the test folder with an ImageWriter over it, and a way to check what it holds. */
  async function newImage(fileSystem: FileSystem, seed: number) {
    const file = path.join(tmp.path, 'image');
    const out = await nodeFileSystem.open(file, 'wx');
    const writer = await ImageWriter.open(fileSystem, out, file);
    const buffer = writer.allocate(SIZE);
    buffer.set(pattern(SIZE, seed));
    return {
      writer,
      buffer,
      out,
      async closeAndCheck() {
        await writer.close();
        await out.close();
        expectFileHolds(file, pattern(SIZE, seed));
      },
    };
  }

  it('writes aligned blocks through an O_DIRECT descriptor and the tail through the ordinary one', async (context) => {
    if (!directIoWorks(tmp.path)) context.skip(`${tmp.path}: this file system refuses O_DIRECT, so only the fallback can be tested here`);
    let directBytes = 0;
    const recording = changingDirectHandles((handle) => {
      expect(openFlags(handle.fd!) & fs.constants.O_DIRECT).toBe(fs.constants.O_DIRECT);
      return wrapHandle(handle, {
        write: (buffer, offset, length, position) => {
          directBytes += length;
          return handle.write(buffer, offset, length, position);
        },
      });
    });
    const image = await newImage(recording, 1);
    expect(image.writer.isDirect).toBe(true);
    await writeInPieces(image.writer, image.buffer, PIECES);
    await image.closeAndCheck();
    // Every byte up to the last whole 4 KiB block went direct; only the 1234-byte tail did not.
    expect(directBytes).toBe(SIZE - (SIZE % DIRECT_IO_ALIGNMENT));
  });

  it('falls back to ordinary writes where the file system refuses O_DIRECT at open', async () => {
    const refusing: FileSystem = {
      ...nodeFileSystem,
      async open(target, mode) {
        if (mode === 'w-direct') throw systemError('EINVAL', 'open');
        return nodeFileSystem.open(target, mode);
      },
    };
    const image = await newImage(refusing, 2);
    expect(image.writer.isDirect).toBe(false);
    await writeInPieces(image.writer, image.buffer, PIECES);
    await image.closeAndCheck();
  });

  it('switches to ordinary writes for good when a direct write is refused (EINVAL), losing nothing', async () => {
    let directAttempts = 0;
    let directClosed = false;
    const refusingWrites = changingDirectHandles((handle) =>
      wrapHandle(handle, {
        write: async () => {
          directAttempts++;
          throw systemError('EINVAL', 'write');
        },
        close: () => {
          directClosed = true;
          return handle.close();
        },
      }),
    );
    const image = await newImage(refusingWrites, 3);
    expect(image.writer.isDirect).toBe(true);
    await writeInPieces(image.writer, image.buffer, PIECES.slice(0, 1));
    expect(image.writer.isDirect).toBe(false);
    expect(directClosed).toBe(true);
    await writeInPieces(image.writer, image.buffer, PIECES.slice(1));
    expect(directAttempts).toBe(1);
    await image.closeAndCheck();
  });

  it('passes other errors of a direct write on (a full disk is not a reason to retry)', async () => {
    const full = changingDirectHandles((handle) => wrapHandle(handle, { write: async () => Promise.reject(systemError('ENOSPC', 'write')) }));
    const image = await newImage(full, 4);
    await expect(image.writer.write(image.buffer, 0, 65536, 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(image.writer.isDirect).toBe(true);
    await image.writer.close();
    await image.out.close();
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
