/*
 * sameFile and refuseOutputOverInput (issue 18 item 1): one file is one (dev, ino), whatever name
 * reaches it: the same path, a relative spelling, a symlink, a hard link. A missing file is no
 * file's twin, so a new output is never refused for it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { refuseOutputOverInput, sameFile } from '../../src/io/file/file-identity.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { useTempDir } from '../helpers/tmp.js';

describe('sameFile', () => {
  const tmp = useTempDir();

  it('is true for the same path, a symlink and a hard link; false for a copy and a missing file', async () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, 'disk');
    const copy = path.join(tmp.path, 'copy.img');
    fs.copyFileSync(base, copy);
    fs.symlinkSync('base.img', path.join(tmp.path, 'link.img'));
    fs.linkSync(base, path.join(tmp.path, 'hard.img'));
    fs.mkdirSync(path.join(tmp.path, 'sub'));
    fs.symlinkSync('..', path.join(tmp.path, 'sub', 'up'));
    for (const name of ['base.img', 'link.img', 'hard.img', 'sub/up/base.img', 'sub/../hard.img']) {
      expect(await sameFile(nodeFileSystem, path.join(tmp.path, name), base), name).toBe(true);
    }
    expect(await sameFile(nodeFileSystem, copy, base)).toBe(false);
    expect(await sameFile(nodeFileSystem, path.join(tmp.path, 'missing.img'), base)).toBe(false);
    expect(await sameFile(nodeFileSystem, path.join(tmp.path, 'missing.img'), path.join(tmp.path, 'missing.img'))).toBe(false);
  });

  it('refuseOutputOverInput names the output, the role, the other name and the fix, in one line', async () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, 'disk');
    const hard = path.join(tmp.path, 'hard.img');
    fs.linkSync(base, hard);
    const inputs = [{ file: path.join(tmp.path, 'src.img'), role: 'the source' }, { file: base, role: 'the backing file' }];
    await expect(refuseOutputOverInput(nodeFileSystem, path.join(tmp.path, 'new.img'), inputs)).resolves.toBeUndefined();
    const err = await refuseOutputOverInput(nodeFileSystem, hard, inputs).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(UbdcowError);
    expect((err as UbdcowError).code).toBe('same-file');
    expect((err as UbdcowError).message).toBe(`${hard}: is the backing file (${base}, by another name); writing there would destroy it, even with -f: name another output file`);
    const direct = await refuseOutputOverInput(nodeFileSystem, base, inputs).then(() => undefined, (e: unknown) => e);
    expect((direct as UbdcowError).message).toBe(`${base}: is the backing file; writing there would destroy it, even with -f: name another output file`);
  });
});
