import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { CowFormatError, UbdcowError } from '../../src/errors.js';
import { checkBacking, resolveBackingPath } from '../../src/io/image/backing.js';
import { openCow } from '../../src/io/engine/engine.js';
import { type FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { openImage } from '../../src/io/image/image.js';
import { useTempDir } from '../helpers/tmp.js';

/** The real file system, except that `device` looks like a block device whose size sysfs cannot tell. */
function unsizableDevice(device: string): FileSystem {
  return {
    ...nodeFileSystem,
    async stat(file) {
      const stat = await nodeFileSystem.stat(file);
      // Major 4000 has no /sys/dev/block entry, so the size look-up fails (ENOENT).
      return path.resolve(file) === device ? { ...stat, kind: 'block-device', rdev: 4000 * 256 } : stat;
    },
  };
}

describe('the backing file module', () => {
  const tmp = useTempDir();

  it('resolves a relative backing path against the current folder, as the kernel does, not the COW\'s folder', () => {
    expect(resolveBackingPath({ backingFile: 'base.img' })).toBe(path.join(process.cwd(), 'base.img'));
    expect(resolveBackingPath({ backingFile: '/srv/base.img' }, 'sub/other.img')).toBe(path.join(process.cwd(), 'sub/other.img'));
  });

  it('a block device whose size cannot be read is "backing-unreadable", naming it, not an internal error', async () => {
    const base = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'vm.cow');
    fs.writeFileSync(base, Buffer.alloc(8192));
    await createCow(cow, base);
    const fsWithDevice = unsizableDevice(base);
    const image = await openImage(cow);
    try {
      const report = await checkBacking(image.header, undefined, fsWithDevice);
      expect(report.state).toBe('unreadable');
      expect(report.problem).toMatch(new RegExp(`${base}: cannot find the size of backing file: .*ENOENT`));
    } finally {
      await image.handle.close();
    }
    const err = await openCow(cow, { fs: fsWithDevice }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(UbdcowError);
    expect((err as UbdcowError).code).toBe('backing-unreadable');
    expect((err as UbdcowError).message).toContain(base);
  });

  it('size and mtime mismatches are one code, backing-mismatch, with one wording wherever they are found', async () => {
    const base = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'vm.cow');
    fs.writeFileSync(base, Buffer.alloc(8192));
    await createCow(cow, base);
    fs.appendFileSync(base, Buffer.alloc(512));
    const err = (await openCow(cow).catch((e: unknown) => e)) as UbdcowError;
    expect(err.code).toBe('backing-mismatch');
    expect(err.message).toBe(`${cow}: ${base}: backing size is 8704 bytes, header says 8192`);
  });

  it('create keeps a format error\'s field, value and expectation', async () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(8192));
    const cow = path.join(tmp.path, 'vm.cow');
    const err = await createCow(cow, base, { sectorSize: 1000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CowFormatError);
    expect(err).toMatchObject({ code: 'bad-sector-size', field: 'sectorsize', value: '1000', file: cow });
    expect((err as Error).message).toMatch(new RegExp(`^${cow}: sectorsize is 1000, expected a power of two`));
  });
});
