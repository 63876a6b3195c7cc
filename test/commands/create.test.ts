import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { UbdcowError } from '../../src/errors.js';
import { parseHeader, serializeV3 } from '../../src/format/header.js';
import { absoluteBackingPath, createCow } from '../../src/commands/create.js';
import { type FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { inFolder, useTempDir } from '../helpers/tmp.js';
import { wrapHandle } from '../helpers/wrap-handle.js';

const tmp = useTempDir();

function makeBacking(file: string, size: number, mtime = 1_650_000_000): void {
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + 3) & 0xff;
  fs.writeFileSync(file, bytes);
  fs.utimesSync(file, mtime, mtime);
}

async function failure(promise: Promise<unknown>): Promise<UbdcowError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UbdcowError);
  return err as UbdcowError;
}

/** Names in `dir` other than `keep`: a failed create must leave no temporary file behind. */
function strayFiles(dir: string, ...keep: string[]): string[] {
  return fs.readdirSync(dir).filter((name) => !keep.includes(name));
}

function snapshot(file: string): { bytes: Buffer; mtimeMs: number } {
  return { bytes: fs.readFileSync(file), mtimeMs: fs.statSync(file).mtimeMs };
}

describe('createCow', () => {
  it('writes a V3 header, a sparse zero bitmap and data area, and the right length', async () => {
    const backing = path.join(tmp.path, 'base.img');
    const cow = path.join(tmp.path, 'disk.cow');
    makeBacking(backing, 1024 * 1024 + 512);
    const result = await createCow(cow, backing);

    expect(result.path).toBe(cow);
    expect(result.header).toEqual({
      version: 3,
      layout: 'v3',
      littleEndian: false,
      backingFile: backing,
      mtime: 1_650_000_000,
      size: 1024 * 1024 + 512,
      sectorSize: 512,
      alignment: 4096,
      cowFormat: 0,
    });
    expect(result.geometry).toMatchObject({ bitmapOffset: 8192, bitmapLength: 257, dataOffset: 12288, sectors: 2049 });
    expect(result.warnings).toEqual([]);

    const bytes = fs.readFileSync(cow);
    expect(bytes.length).toBe(12288 + 1024 * 1024 + 512);
    expect(bytes.subarray(0, 4128)).toEqual(Buffer.from(serializeV3(result.header)));
    expect(bytes.subarray(4128).every((b) => b === 0)).toBe(true);
    expect(parseHeader(bytes).header).toEqual(result.header);
    // Holes, not written zeros: a 1 MiB data area should take (almost) nothing on disk.
    expect(fs.statSync(cow).blocks * 512).toBeLessThan(64 * 1024);
    expect(strayFiles(tmp.path, 'base.img', 'disk.cow')).toEqual([]);
  });

  it('stores the mtime in whole seconds, as the kernel compares it', async () => {
    const backing = path.join(tmp.path, 'base.img');
    makeBacking(backing, 512);
    fs.utimesSync(backing, 1_600_000_000.75, 1_600_000_000.75);
    const result = await createCow(path.join(tmp.path, 'c.cow'), backing);
    expect(result.header.mtime).toBe(1_600_000_000);
  });

  it('makes an empty backing file into a COW with no bitmap', async () => {
    const backing = path.join(tmp.path, 'empty.img');
    fs.writeFileSync(backing, '');
    const result = await createCow(path.join(tmp.path, 'c.cow'), backing);
    expect(result.geometry).toMatchObject({ bitmapLength: 0, dataOffset: 8192, fileLength: 8192 });
    expect(fs.statSync(path.join(tmp.path, 'c.cow')).size).toBe(8192);
  });

  it('honours sector size and alignment options, warning about a sector size other than 512', async () => {
    const backing = path.join(tmp.path, 'base.img');
    makeBacking(backing, 64 * 1024);
    const result = await createCow(path.join(tmp.path, 'c.cow'), backing, { sectorSize: 4096, alignment: 512 });
    expect(result.header).toMatchObject({ sectorSize: 4096, alignment: 512 });
    expect(result.geometry).toMatchObject({ bitmapOffset: 4608, bitmapLength: 2, dataOffset: 5120 });
    // 16 sectors: also under the kernel's 64-sector limit (issue 15 item 7).
    expect(result.warnings).toEqual(["sector size is 4096; the kernel's ubd driver assumes 512", expect.stringContaining('64 sectors (32 KiB) or fewer')]);
  });

  describe('the stored backing path (what uml_mkcow stores)', () => {
    it('a relative path is made absolute against the current folder', async () => {
      makeBacking(path.join(tmp.path, 'base.img'), 512);
      const result = await inFolder(tmp.path, () => createCow('disk.cow', 'base.img'));
      expect(result.header.backingFile).toBe(path.join(tmp.path, 'base.img'));
      expect(fs.existsSync(path.join(tmp.path, 'disk.cow'))).toBe(true);
    });

    it('a symlinked folder is resolved; "..", "." and doubled slashes disappear', async () => {
      fs.mkdirSync(path.join(tmp.path, 'real'));
      fs.symlinkSync('real', path.join(tmp.path, 'link'));
      makeBacking(path.join(tmp.path, 'real', 'base.img'), 512);
      const expected = path.join(tmp.path, 'real', 'base.img');
      for (const given of ['link/base.img', 'link/../real/./base.img', 'link//base.img', './real/base.img']) {
        const cow = path.join(tmp.path, 'c.cow');
        const result = await inFolder(tmp.path, () => createCow(cow, given, { force: true }));
        expect(result.header.backingFile, given).toBe(expected);
      }
    });

    it('a symlinked backing file keeps its link name', async () => {
      makeBacking(path.join(tmp.path, 'base.img'), 512);
      fs.symlinkSync('base.img', path.join(tmp.path, 'alias.img'));
      const result = await createCow(path.join(tmp.path, 'c.cow'), path.join(tmp.path, 'alias.img'));
      expect(result.header.backingFile).toBe(path.join(tmp.path, 'alias.img'));
    });

    it('a file in / keeps a single slash', async () => {
      const fakeRoot: FileSystem = { ...nodeFileSystem, realpath: async () => '/' };
      expect(await absoluteBackingPath('/base.img', fakeRoot)).toBe('/base.img');
    });

    it('a path too long for the header is refused, naming the COW file', async () => {
      makeBacking(path.join(tmp.path, 'base.img'), 512);
      const longFolder: FileSystem = { ...nodeFileSystem, realpath: async () => '/' + 'd'.repeat(4090) };
      const cow = path.join(tmp.path, 'c.cow');
      const err = await failure(createCow(cow, path.join(tmp.path, 'base.img'), { fs: longFolder }));
      expect(err.code).toBe('backing-too-long');
      expect(err.message).toBe(`${cow}: backing_file is 4100 bytes long, expected at most 4095 bytes (the field holds 4096 with its terminator)`);
      expect(fs.existsSync(cow)).toBe(false);
    });
  });

  describe('refusals leave everything as it was', () => {
    it('an existing COW without force: error, file untouched byte for byte and mtime unchanged', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 4096);
      fs.writeFileSync(cow, 'precious');
      fs.utimesSync(cow, 1_500_000_000, 1_500_000_000);
      const before = snapshot(cow);
      const err = await failure(createCow(cow, backing));
      expect(err.code).toBe('exists');
      expect(err.message).toBe(`${cow}: already exists (use --force to overwrite)`);
      expect(snapshot(cow)).toEqual(before);
      expect(strayFiles(tmp.path, 'base.img', 'disk.cow')).toEqual([]);
    });

    it('an existing symlink (even a dangling one) counts as existing', async () => {
      const backing = path.join(tmp.path, 'base.img');
      makeBacking(backing, 512);
      fs.symlinkSync('nowhere', path.join(tmp.path, 'dangling.cow'));
      const err = await failure(createCow(path.join(tmp.path, 'dangling.cow'), backing));
      expect(err.code).toBe('exists');
    });

    it('force replaces an existing file with a fresh COW', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 4096);
      fs.writeFileSync(cow, Buffer.alloc(100000, 0x55));
      await createCow(cow, backing, { force: true });
      const bytes = fs.readFileSync(cow);
      expect(bytes.length).toBe(12288 + 4096);
      expect(parseHeader(bytes).header.backingFile).toBe(backing);
      expect(bytes.subarray(4128).every((b) => b === 0)).toBe(true);
    });

    it('force never replaces the backing file itself (named directly, or reached through symlinks)', async () => {
      const backing = path.join(tmp.path, 'base.img');
      makeBacking(backing, 4096);
      fs.symlinkSync('base.img', path.join(tmp.path, 'alias.img'));
      fs.symlinkSync('.', path.join(tmp.path, 'here'));
      const before = snapshot(backing);
      const attempts: Array<[string, string]> = [
        [backing, backing],
        [backing, path.join(tmp.path, 'alias.img')],
        [path.join(tmp.path, 'here', 'base.img'), backing],
      ];
      for (const [cow, given] of attempts) {
        const err = await failure(createCow(cow, given, { force: true }));
        expect(err.code).toBe('same-file');
        expect(err.message).toBe(`${cow}: is the backing file itself, refusing to overwrite it`);
      }
      expect(snapshot(backing)).toEqual(before);
      expect(strayFiles(tmp.path, 'base.img', 'alias.img', 'here')).toEqual([]);
    });

    it('force never replaces the backing file through a hard link to it (same inode, another name)', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const twin = path.join(tmp.path, 'twin.img');
      makeBacking(backing, 4096);
      fs.linkSync(backing, twin);
      const before = snapshot(backing);
      const err = await failure(createCow(twin, backing, { force: true }));
      expect(err.code).toBe('same-file');
      expect(err.message).toBe(`${twin}: is the backing file itself, refusing to overwrite it`);
      expect(snapshot(backing)).toEqual(before);
      expect(fs.statSync(twin).ino).toBe(fs.statSync(backing).ino);
    });

    it('force may replace a symlink that points at the backing file (the link goes, the file stays)', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const alias = path.join(tmp.path, 'alias.img');
      makeBacking(backing, 4096);
      fs.symlinkSync('base.img', alias);
      const before = snapshot(backing);
      await createCow(alias, backing, { force: true });
      expect(fs.lstatSync(alias).isFile()).toBe(true);
      expect(parseHeader(fs.readFileSync(alias)).header.backingFile).toBe(backing);
      expect(snapshot(backing)).toEqual(before);
    });

    it('a missing backing file: ENOENT naming it, no COW file made', async () => {
      const backing = path.join(tmp.path, 'missing.img');
      const cow = path.join(tmp.path, 'disk.cow');
      const err = await failure(createCow(cow, backing));
      expect(err.code).toBe('ENOENT');
      expect(err.message).toBe(`${backing}: cannot open backing file: no such file or directory (ENOENT)`);
      expect(fs.readdirSync(tmp.path)).toEqual([]);
    });

    it('a directory as backing file', async () => {
      const err = await failure(createCow(path.join(tmp.path, 'disk.cow'), tmp.path));
      expect(err.code).toBe('not-a-file');
      expect(err.message).toBe(`${tmp.path}: is a directory, expected a backing file`);
      expect(fs.readdirSync(tmp.path)).toEqual([]);
    });

    it('an unreadable backing file', async () => {
      const backing = path.join(tmp.path, 'base.img');
      makeBacking(backing, 512);
      const denied: FileSystem = {
        ...nodeFileSystem,
        open: async (file, mode) => {
          if (file === backing) throw Object.assign(new Error('EACCES'), { code: 'EACCES' });
          return nodeFileSystem.open(file, mode);
        },
      };
      const err = await failure(createCow(path.join(tmp.path, 'disk.cow'), backing, { fs: denied }));
      expect(err.code).toBe('EACCES');
      expect(err.message).toBe(`${backing}: cannot read backing file: permission denied (EACCES)`);
      expect(strayFiles(tmp.path, 'base.img')).toEqual([]);
    });

    it.each([
      [0, 4096, 'bad-sector-size'],
      [1000, 4096, 'bad-sector-size'],
      [256, 4096, 'bad-sector-size'],
      [512, 0, 'bad-alignment'],
    ])('sector size %d, alignment %d: %s, no file made', async (sectorSize, alignment, code) => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 512);
      const err = await failure(createCow(cow, backing, { sectorSize, alignment }));
      expect(err.code).toBe(code);
      expect(err.message.startsWith(`${cow}: `)).toBe(true);
      expect(strayFiles(tmp.path, 'base.img')).toEqual([]);
    });

    /** A file system whose COW-file handles fail at `step`. */
    function failingAt(step: 'write' | 'truncate' | 'sync'): FileSystem {
      return {
        ...nodeFileSystem,
        async open(file, mode) {
          const handle = await nodeFileSystem.open(file, mode);
          if (mode !== 'wx') return handle;
          return wrapHandle(handle, {
            [step]: async () => {
              throw Object.assign(new Error('injected'), { code: step === 'truncate' ? 'ENOSPC' : 'EIO' });
            },
          });
        },
      };
    }

    it.each(['write', 'truncate', 'sync'] as const)('an I/O error at %s: error naming the COW, no file left', async (step) => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 4096);
      const err = await failure(createCow(cow, backing, { fs: failingAt(step) }));
      expect(err.message).toMatch(new RegExp(`^${cow}: cannot write: .*\\((EIO|ENOSPC)\\)$`));
      expect(strayFiles(tmp.path, 'base.img')).toEqual([]);
    });

    it('an I/O error with force leaves the existing file as it was', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 4096);
      fs.writeFileSync(cow, 'old contents');
      const before = snapshot(cow);
      await failure(createCow(cow, backing, { force: true, fs: failingAt('sync') }));
      expect(snapshot(cow)).toEqual(before);
      expect(strayFiles(tmp.path, 'base.img', 'disk.cow')).toEqual([]);
    });

    it('a COW file that appears while creating is not clobbered (no-clobber link)', async () => {
      const backing = path.join(tmp.path, 'base.img');
      const cow = path.join(tmp.path, 'disk.cow');
      makeBacking(backing, 4096);
      const racing: FileSystem = {
        ...nodeFileSystem,
        async link(existing, newPath) {
          fs.writeFileSync(newPath, 'someone else');
          return nodeFileSystem.link(existing, newPath);
        },
      };
      const err = await failure(createCow(cow, backing, { fs: racing }));
      expect(err.code).toBe('exists');
      expect(fs.readFileSync(cow, 'utf8')).toBe('someone else');
      expect(strayFiles(tmp.path, 'base.img', 'disk.cow')).toEqual([]);
    });
  });
});
