import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { type DataExtent, dataExtents, isHole } from '../../src/io/file/extents.js';
import { type FileHandleLike } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { overrideOsCalls } from '../../src/os/libc.js';
import { useTempDir } from '../helpers/tmp.js';
import { dataSegments } from '../helpers/tools.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const MiB = 1 << 20;

async function collect(handle: FileHandleLike, start: number, end: number): Promise<DataExtent[]> {
  const found: DataExtent[] = [];
  for await (const extent of dataExtents(handle, start, end)) found.push(extent);
  return found;
}

/** A sparse file: `size` bytes, data (0xab) at each [start, end). */
function sparseFile(file: string, size: number, data: [number, number][]): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (const [start, end] of data) fs.writeSync(fd, Buffer.alloc(end - start, 0xab), 0, end - start, start);
  } finally {
    fs.closeSync(fd);
  }
}

function withErrno(code: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code} (injected)`), { code, syscall: 'lseek' });
}

describe('dataExtents: SEEK_DATA/SEEK_HOLE over sparse files', () => {
  const tmp = useTempDir();

  it('yields the data extents of a sparse file and skips its holes, as python os.lseek sees them', async () => {
    const file = path.join(tmp.path, 'sparse');
    const data: [number, number][] = [[0, 4096], [MiB, MiB + 64 * 1024], [7 * MiB, 8 * MiB]];
    sparseFile(file, 64 * MiB, data);
    const handle = await nodeFileSystem.open(file, 'r');
    try {
      const found = await collect(handle, 0, 64 * MiB);
      expect(found).toEqual(data.map(([start, end]) => ({ start, end })));
      const python = dataSegments(file);
      if (python) expect(found.map(({ start, end }) => [start, end])).toEqual(python);
      // Clipped to the range asked for, and a range of holes only has none.
      expect(await collect(handle, MiB + 4096, 7 * MiB + 4096)).toEqual([{ start: MiB + 4096, end: MiB + 64 * 1024 }, { start: 7 * MiB, end: 7 * MiB + 4096 }]);
      expect(await collect(handle, 8 * MiB, 64 * MiB)).toEqual([]);
      expect(await isHole(handle, 2 * MiB, 7 * MiB)).toBe(true);
      expect(await isHole(handle, 2 * MiB, 7 * MiB + 1)).toBe(false);
    } finally {
      await handle.close();
    }
  });

  it('offsets past 2^32 and 2^40 (a sparse 2 TiB file) come back exact', async () => {
    const file = path.join(tmp.path, 'huge');
    const at = 2 ** 40 + 3 * 4096;
    sparseFile(file, 2 ** 41, [[2 ** 32, 2 ** 32 + 4096], [at, at + 8192]]);
    const handle = await nodeFileSystem.open(file, 'r');
    try {
      expect(await collect(handle, 0, 2 ** 41)).toEqual([{ start: 2 ** 32, end: 2 ** 32 + 4096 }, { start: at, end: at + 8192 }]);
    } finally {
      await handle.close();
    }
  });

  it('falls back to "all data" when the handle has no seek calls (an injected file system)', async () => {
    const file = path.join(tmp.path, 'sparse');
    sparseFile(file, 16 * MiB, [[MiB, 2 * MiB]]);
    const real = await nodeFileSystem.open(file, 'r');
    try {
      const bare = wrapHandle(real, {});
      expect(bare.seekData).toBeUndefined();
      expect(await collect(bare, 4096, 16 * MiB)).toEqual([{ start: 4096, end: 16 * MiB }]);
    } finally {
      await real.close();
    }
  });

  it('falls back when the bindings are unavailable (ENOSYS from the node handle)', async () => {
    const file = path.join(tmp.path, 'sparse');
    sparseFile(file, 16 * MiB, [[MiB, 2 * MiB]]);
    const restore = overrideOsCalls(undefined);
    const handle = await nodeFileSystem.open(file, 'r');
    try {
      expect(() => handle.seekData!(0)).toThrow(/ENOSYS/);
      expect(await collect(handle, 0, 16 * MiB)).toEqual([{ start: 0, end: 16 * MiB }]);
    } finally {
      restore.reset();
      await handle.close();
    }
  });

  it('a file system that cannot tell (EINVAL/EOPNOTSUPP midway) gives the rest as data; EIO is thrown', async () => {
    const file = path.join(tmp.path, 'sparse');
    sparseFile(file, 16 * MiB, [[MiB, 2 * MiB], [8 * MiB, 9 * MiB]]);
    const real = await nodeFileSystem.open(file, 'r');
    try {
      let calls = 0;
      const flaky = wrapHandle(real, {
        seekData: (position) => {
          if (++calls === 2) throw withErrno('EOPNOTSUPP');
          return real.seekData!(position);
        },
        seekHole: (position) => real.seekHole!(position),
      });
      expect(await collect(flaky, 0, 16 * MiB)).toEqual([{ start: MiB, end: 2 * MiB }, { start: 2 * MiB, end: 16 * MiB }]);
      const failing = wrapHandle(real, {
        seekData: () => {
          throw withErrno('EIO');
        },
        seekHole: (position) => real.seekHole!(position),
      });
      await expect(collect(failing, 0, 16 * MiB)).rejects.toMatchObject({ code: 'EIO' });
    } finally {
      await real.close();
    }
  });
});
