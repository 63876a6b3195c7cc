import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { firstDifference, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { inFolder, useTempDir } from '../helpers/tmp.js';

const missing = missingTools('uml_mkcow');

function writeBacking(file: string, size: number): void {
  if (size > 64 * 1024 * 1024) {
    fs.closeSync(fs.openSync(file, 'w'));
    fs.truncateSync(file, size);
    return;
  }
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 131 + (i >>> 9)) & 0xff;
  fs.writeFileSync(file, bytes);
}

function umlMkcow(args: string[], cwd: string): void {
  const result = run('uml_mkcow', args, { cwd });
  expect(result.status, `uml_mkcow ${args.join(' ')}: ${result.stderr}`).toBe(0);
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow create matches uml_mkcow byte for byte', missing), () => {
  const tmp = useTempDir();

  const sizes: Array<[string, number]> = [
    ['0 bytes', 0],
    ['1 byte', 1],
    ['511 bytes', 511],
    ['512 bytes', 512],
    ['1 MiB', 1024 * 1024],
    ['8 MiB + 512', 8 * 1024 * 1024 + 512],
    ['3 GiB (sparse)', 3 * 1024 ** 3],
  ];

  it.each(sizes)('backing of %s', async (_name, size) => {
    const backing = path.join(tmp.path, 'base.img');
    writeBacking(backing, size);
    const theirs = path.join(tmp.path, 'mkcow.cow');
    const ours = path.join(tmp.path, 'ubdcow.cow');
    umlMkcow([theirs, backing], tmp.path);
    await createCow(ours, backing);
    expect(fs.statSync(ours).size).toBe(fs.statSync(theirs).size);
    expect(await firstDifference(theirs, ours)).toBeUndefined();

    // And inspect reads what uml_mkcow wrote.
    const report = await inspectCow(theirs);
    expect(report).toMatchObject({ version: 3, layout: 'v3', backingFile: backing, size, truncated: false, extents: 0 });
    expect(report.fileSize).toBe(report.expectedFileSize);
    expect(report.backing.state).toBe('ok');
  });

  it('an 8 MiB backing gives the documented geometry in both', async () => {
    const backing = path.join(tmp.path, 'base.img');
    writeBacking(backing, 8 * 1024 * 1024);
    umlMkcow(['mkcow.cow', 'base.img'], tmp.path);
    const report = await inspectCow(path.join(tmp.path, 'mkcow.cow'));
    expect(report).toMatchObject({ bitmapOffset: 8192, bitmapLength: 2048, dataOffset: 12288, fileSize: 8400896 });
  });

  describe('stored backing paths, both tools run from the same folder', () => {
    async function compareFrom(cwd: string, backingArg: string): Promise<string> {
      umlMkcow([path.join(tmp.path, 'mkcow.cow'), backingArg], cwd);
      await inFolder(cwd, () => createCow(path.join(tmp.path, 'ubdcow.cow'), backingArg));
      expect(await firstDifference(path.join(tmp.path, 'mkcow.cow'), path.join(tmp.path, 'ubdcow.cow'))).toBeUndefined();
      return (await inspectCow(path.join(tmp.path, 'mkcow.cow'))).backingFile;
    }

    it('a relative path', async () => {
      writeBacking(path.join(tmp.path, 'base.img'), 4096);
      expect(await compareFrom(tmp.path, 'base.img')).toBe(path.join(tmp.path, 'base.img'));
    });

    it('a path with ".." from a subfolder', async () => {
      writeBacking(path.join(tmp.path, 'base.img'), 4096);
      fs.mkdirSync(path.join(tmp.path, 'sub'));
      expect(await compareFrom(path.join(tmp.path, 'sub'), '../base.img')).toBe(path.join(tmp.path, 'base.img'));
    });

    it('a backing reached through a symlinked folder (the folder is resolved)', async () => {
      fs.mkdirSync(path.join(tmp.path, 'real'));
      fs.symlinkSync('real', path.join(tmp.path, 'link'));
      writeBacking(path.join(tmp.path, 'real', 'base.img'), 4096);
      expect(await compareFrom(tmp.path, 'link/base.img')).toBe(path.join(tmp.path, 'real', 'base.img'));
    });

    it('an absolute path through a symlinked folder', async () => {
      fs.mkdirSync(path.join(tmp.path, 'real'));
      fs.symlinkSync(path.join(tmp.path, 'real'), path.join(tmp.path, 'link'));
      writeBacking(path.join(tmp.path, 'real', 'base.img'), 4096);
      expect(await compareFrom('/', path.join(tmp.path, 'link', 'base.img'))).toBe(path.join(tmp.path, 'real', 'base.img'));
    });

    it('a symlinked backing file (its own name is kept)', async () => {
      writeBacking(path.join(tmp.path, 'base.img'), 4096);
      fs.symlinkSync('base.img', path.join(tmp.path, 'alias.img'));
      expect(await compareFrom(tmp.path, 'alias.img')).toBe(path.join(tmp.path, 'alias.img'));
    });
  });

  it('-f over a longer file: uml_mkcow keeps its stale bytes (a bogus bitmap); ubdcow writes what a fresh uml_mkcow does', async () => {
    const backing = path.join(tmp.path, 'base.img');
    writeBacking(backing, 64 * 1024);
    const theirs = path.join(tmp.path, 'mkcow.cow');
    const ours = path.join(tmp.path, 'ubdcow.cow');
    const fresh = path.join(tmp.path, 'fresh.cow');
    fs.writeFileSync(theirs, Buffer.alloc(200 * 1024, 0x77));
    fs.writeFileSync(ours, Buffer.alloc(200 * 1024, 0x77));
    umlMkcow(['-f', theirs, backing], tmp.path);
    umlMkcow([fresh, backing], tmp.path);
    await createCow(ours, backing, { force: true });
    expect(await firstDifference(fresh, ours)).toBeUndefined();

    // uml_mkcow opens without O_TRUNC: the old length and old bytes survive, bitmap included.
    const stale = await inspectCow(theirs);
    expect(stale.fileSize).toBe(200 * 1024);
    // 16 bitmap bytes of stale 0x77, six bits set in each.
    expect(stale.allocated.sectors).toBe(16 * 6);
    expect((await inspectCow(ours)).allocated.sectors).toBe(0);
  });

  it('the sparse comparison still finds one differing byte in the middle of 3 GiB', async () => {
    const a = path.join(tmp.path, 'a.img');
    const b = path.join(tmp.path, 'b.img');
    for (const file of [a, b]) writeBacking(file, 3 * 1024 ** 3);
    const fd = fs.openSync(b, 'r+');
    fs.writeSync(fd, Buffer.of(1), 0, 1, 1536 * 1024 ** 2 + 12345);
    fs.closeSync(fd);
    expect(await firstDifference(a, b)).toBe(`first difference at byte ${1536 * 1024 ** 2 + 12345}: 0 vs 1`);
  });

  it('both refuse an existing file without -f, leaving it as it was', async () => {
    const backing = path.join(tmp.path, 'base.img');
    writeBacking(backing, 4096);
    const existing = path.join(tmp.path, 'existing.cow');
    fs.writeFileSync(existing, 'keep me');
    const result = run('uml_mkcow', [existing, backing]);
    expect(result.status).not.toBe(0);
    await expect(createCow(existing, backing)).rejects.toMatchObject({ code: 'exists' });
    expect(fs.readFileSync(existing, 'utf8')).toBe('keep me');
  });

  it('on a missing backing file uml_mkcow leaves an empty COW file behind; ubdcow leaves nothing', async () => {
    const result = run('uml_mkcow', ['mkcow.cow', 'missing.img'], { cwd: tmp.path });
    expect(result.status).not.toBe(0);
    expect(fs.statSync(path.join(tmp.path, 'mkcow.cow')).size).toBe(0);
    await expect(inFolder(tmp.path, () => createCow('ubdcow.cow', 'missing.img'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(fs.existsSync(path.join(tmp.path, 'ubdcow.cow'))).toBe(false);
  });
});
