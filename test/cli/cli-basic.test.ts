import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseHeader } from '../../src/format/header.js';
import { ensureBuiltCli, firstDifference, missingTools, repoRoot, run, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

let cli: string;

beforeAll(() => {
  cli = ensureBuiltCli();
});

function ubdcow(args: string[], cwd?: string) {
  return run(process.execPath, [cli, ...args], { cwd });
}

const version = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')).version as string;

/** A user-facing failure: non-zero exit, nothing on stdout, exactly one line on stderr, no stack. */
function expectOneLineError(result: ReturnType<typeof ubdcow>, prefix: string): string {
  expect(result.status).toBe(1);
  expect(result.stdout).toBe('');
  const lines = result.stderr.split('\n').filter((line) => line !== '');
  expect(lines, result.stderr).toHaveLength(1);
  expect(lines[0].startsWith(prefix), lines[0]).toBe(true);
  expect(result.stderr).not.toMatch(/^\s+at /m);
  expect(result.stderr).not.toContain('internal error');
  return lines[0];
}

describe('ubdcow CLI basics', () => {
  const tmp = useTempDir();

  function makeBacking(name = 'base.img', size = 64 * 1024): string {
    const file = path.join(tmp.path, name);
    fs.writeFileSync(file, Buffer.alloc(size, 0x5a));
    return file;
  }

  describe('help and version', () => {
    it('--help lists the commands and exits 0', () => {
      const result = ubdcow(['--help']);
      expect(result.status).toBe(0);
      expect(result.stdout).toContain('ubdcow <command> [options]');
      expect(result.stdout).toContain('ubdcow create <cow> <backing>');
      expect(result.stdout).toContain('ubdcow inspect <cow>');
      expect(result.stdout).toContain('Exit codes');
    });

    it('create --help documents its options', () => {
      const result = ubdcow(['create', '--help']);
      expect(result.status).toBe(0);
      for (const text of ['ubdcow create <cow> <backing>', '--force', '-f', '--sector-size', '--alignment', '--json']) {
        expect(result.stdout).toContain(text);
      }
    });

    it('inspect --help documents its options', () => {
      const result = ubdcow(['inspect', '--help']);
      expect(result.status).toBe(0);
      for (const text of ['ubdcow inspect <cow>', '--json', '--backing']) expect(result.stdout).toContain(text);
    });

    it('--version prints the package version', () => {
      const result = ubdcow(['--version']);
      expect(result.status).toBe(0);
      expect(result.stdout.trim()).toBe(version);
    });
  });

  describe('success', () => {
    it('create then inspect --json', () => {
      const backing = makeBacking();
      const cow = path.join(tmp.path, 'disk.cow');
      const created = ubdcow(['create', cow, backing]);
      expect(created.status, created.stderr).toBe(0);
      expect(created.stdout.trim()).toBe(`created ${cow}: 64.0 KiB over ${backing}`);
      expect(parseHeader(fs.readFileSync(cow)).header.backingFile).toBe(backing);

      const inspected = ubdcow(['inspect', '--json', cow]);
      expect(inspected.status, inspected.stderr).toBe(0);
      const report = JSON.parse(inspected.stdout);
      expect(report).toMatchObject({ file: cow, version: 3, size: 65536, bitmapOffset: 8192, bitmapLength: 16, dataOffset: 12288, truncated: false });
      expect(report.backing.state).toBe('ok');
    });

    it('inspect prints a table naming the backing state', () => {
      const backing = makeBacking();
      const cow = path.join(tmp.path, 'disk.cow');
      ubdcow(['create', cow, backing]);
      const result = ubdcow(['inspect', cow]);
      expect(result.status).toBe(0);
      expect(result.stdout).toMatch(/^backing state: +ok$/m);
      expect(result.stdout).toMatch(/^bitmap: +offset 8192, 16 bytes$/m);
    });

    const noMkcow = missingTools('uml_mkcow');
    it.skipIf(noMkcow.length > 0)(titleWithSkipReason('create from a relative path writes what uml_mkcow writes', noMkcow), () => {
      makeBacking();
      expect(ubdcow(['create', 'ours.cow', 'base.img'], tmp.path).status).toBe(0);
      expect(run('uml_mkcow', ['theirs.cow', 'base.img'], { cwd: tmp.path }).status).toBe(0);
      return expect(firstDifference(path.join(tmp.path, 'ours.cow'), path.join(tmp.path, 'theirs.cow'))).resolves.toBeUndefined();
    });
  });

  describe('errors: one line on stderr, exit 1, no stack trace', () => {
    it('missing backing file', () => {
      const cow = path.join(tmp.path, 'disk.cow');
      const missing = path.join(tmp.path, 'missing.img');
      const line = expectOneLineError(ubdcow(['create', cow, missing]), 'ubdcow create: ');
      expect(line).toBe(`ubdcow create: ${missing}: cannot open backing file: no such file or directory (ENOENT)`);
      expect(fs.readdirSync(tmp.path)).toEqual([]);
    });

    it('existing COW without -f: the file is untouched, byte for byte and mtime', () => {
      const backing = makeBacking();
      const cow = path.join(tmp.path, 'disk.cow');
      fs.writeFileSync(cow, Buffer.alloc(5000, 0x33));
      fs.utimesSync(cow, 1_400_000_000.5, 1_400_000_000.5);
      const before = { bytes: fs.readFileSync(cow), mtimeMs: fs.statSync(cow).mtimeMs };
      const line = expectOneLineError(ubdcow(['create', cow, backing]), 'ubdcow create: ');
      expect(line).toBe(`ubdcow create: ${cow}: already exists (use --force to overwrite)`);
      expect({ bytes: fs.readFileSync(cow), mtimeMs: fs.statSync(cow).mtimeMs }).toEqual(before);
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'disk.cow']);
    });

    it('-f replaces it', () => {
      const backing = makeBacking();
      const cow = path.join(tmp.path, 'disk.cow');
      fs.writeFileSync(cow, 'old');
      expect(ubdcow(['create', '-f', cow, backing]).status).toBe(0);
      expect(fs.statSync(cow).size).toBe(12288 + 65536);
    });

    it('not a COW file', () => {
      const file = makeBacking('plain.img');
      const line = expectOneLineError(ubdcow(['inspect', file]), 'ubdcow inspect: ');
      expect(line).toBe(`ubdcow inspect: ${file}: magic is 0x5a5a5a5a, expected 0x4f4f4f4d ("MOOO"): not a UML COW file`);
    });

    it('a directory, as COW file and as backing file', () => {
      expect(expectOneLineError(ubdcow(['inspect', tmp.path]), 'ubdcow inspect: ')).toBe(
        `ubdcow inspect: ${tmp.path}: is a directory, expected a COW file`,
      );
      expect(expectOneLineError(ubdcow(['create', path.join(tmp.path, 'x.cow'), tmp.path]), 'ubdcow create: ')).toBe(
        `ubdcow create: ${tmp.path}: is a directory, expected a backing file`,
      );
      expect(fs.readdirSync(tmp.path)).toEqual([]);
    });

    it('a missing COW file', () => {
      const missing = path.join(tmp.path, 'nope.cow');
      expect(expectOneLineError(ubdcow(['inspect', missing]), 'ubdcow inspect: ')).toBe(
        `ubdcow inspect: ${missing}: cannot open COW file: no such file or directory (ENOENT)`,
      );
    });

    it('a bad sector size', () => {
      const backing = makeBacking();
      const cow = path.join(tmp.path, 'disk.cow');
      expect(expectOneLineError(ubdcow(['create', '--sector-size', '1000', cow, backing]), 'ubdcow create: ')).toBe(
        `ubdcow create: ${cow}: sectorsize is 1000, expected a power of two from 512 to 65536`,
      );
      expect(fs.existsSync(cow)).toBe(false);
    });

    it('an unknown command and missing arguments are usage errors', () => {
      expectOneLineError(ubdcow(['frobnicate']), 'ubdcow frobnicate: ');
      expectOneLineError(ubdcow(['create']), 'ubdcow create: ');
    });

    it('--debug adds the stack trace (so its absence above is deliberate)', () => {
      const result = ubdcow(['inspect', tmp.path, '--debug']);
      expect(result.status).toBe(1);
      expect(result.stderr).toMatch(/^\s+at /m);
    });
  });
});
