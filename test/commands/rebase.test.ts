import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { commitCow, commitJournalPath } from '../../src/commands/commit/index.js';
import { rebaseCow } from '../../src/commands/rebase.js';
import { UbdcowError } from '../../src/errors.js';
import { type HeaderLayout, parseHeader } from '../../src/format/header.js';
import { FIXTURE_MTIME, buildCow, holdLockInChild, readRange, snapshot } from '../helpers/cow-fixtures.js';
import { inFolder, useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';

const layouts: HeaderLayout[] = ['v1', 'v2', 'v3', 'v3-broken'];

function headerOf(cowPath: string) {
  return parseHeader(readRange(cowPath, 0, 8192)).header;
}

async function refusal(promise: Promise<unknown>, code: string): Promise<UbdcowError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UbdcowError);
  expect((err as UbdcowError).code).toBe(code);
  expect((err as UbdcowError).message).not.toContain('\n');
  return err as UbdcowError;
}

/** Copies a file and its mtime, as `cp -p` does. */
function copyPreservingMtime(from: string, to: string): void {
  fs.copyFileSync(from, to);
  const { atime, mtime } = fs.statSync(from);
  fs.utimesSync(to, atime, mtime);
}

describe('rebaseCow', () => {
  const tmp = useTempDir();

  it.each(layouts)('%s: re-points at a moved backing file, changing only the path; the disk reads the same', async (layout) => {
    const built = buildCow(tmp.path, { layout, size: 600_000, extents: [{ start: 4, end: 300 }, { start: 1000, end: 1100 }] });
    fs.mkdirSync(path.join(tmp.path, 'store'));
    const moved = path.join(tmp.path, 'store', 'base-moved.img');
    fs.renameSync(built.backingPath, moved);
    const before = fs.readFileSync(built.cowPath);

    const result = await rebaseCow(built.cowPath, moved);
    expect(result).toMatchObject({ oldBacking: built.backingPath, newBacking: moved, checked: true, overridden: [] });
    const header = headerOf(built.cowPath);
    expect(header).toEqual({ ...built.header, backingFile: moved });
    // Everything past the header (bitmap, data) is untouched.
    const after = fs.readFileSync(built.cowPath);
    expect(after.length).toBe(before.length);
    expect(Buffer.compare(after.subarray(built.geometry.headerSize), before.subarray(built.geometry.headerSize))).toBe(0);

    expect(await checkCow(built.cowPath)).toMatchObject({ clean: true });
    const output = path.join(tmp.path, 'merged.img');
    await commitCow(built.cowPath, { output });
    expect(Buffer.compare(fs.readFileSync(output), built.expected)).toBe(0);
  });

  it('stores a relative new path as an absolute one, as uml_mkcow would', async () => {
    const built = buildCow(tmp.path, { size: 100_000 });
    fs.mkdirSync(path.join(tmp.path, 'sub'));
    fs.renameSync(built.backingPath, path.join(tmp.path, 'sub', 'b.img'));
    const result = await inFolder(tmp.path, () => rebaseCow('vm.cow', 'sub/b.img'));
    expect(result.newBacking).toBe(path.join(tmp.path, 'sub', 'b.img'));
    expect(headerOf(built.cowPath).backingFile).toBe(path.join(tmp.path, 'sub', 'b.img'));
  });

  it('refuses a file whose mtime or size differ from the header, changing nothing; --unsafe goes ahead', async () => {
    const built = buildCow(tmp.path, { size: 100_000 });
    const copy = path.join(tmp.path, 'copy.img');
    fs.copyFileSync(built.backingPath, copy); // a plain copy gets a new mtime
    const files = [built.cowPath, built.backingPath, copy];
    const before = snapshot(tmp.path, files);
    const err = await refusal(rebaseCow(built.cowPath, copy), 'backing-mismatch');
    expect(err.message).toMatch(/copy\.img: backing mtime is \d+ \(.*\), header says 1600000000 \(.*\); not the same backing file \(use --unsafe/);
    expect(snapshot(tmp.path, files)).toEqual(before);

    const short = path.join(tmp.path, 'short.img');
    fs.writeFileSync(short, Buffer.alloc(4096));
    fs.utimesSync(short, FIXTURE_MTIME, FIXTURE_MTIME);
    const sizeErr = await refusal(rebaseCow(built.cowPath, short), 'backing-mismatch');
    expect(sizeErr.message).toMatch(/short\.img: backing size is 4096 bytes, header says 100000/);
    expect(snapshot(tmp.path, files).files).toEqual(before.files);

    const unsafe = await rebaseCow(built.cowPath, copy, { unsafe: true });
    expect(unsafe.checked).toBe(false);
    expect(unsafe.overridden).toHaveLength(1);
    const header = headerOf(built.cowPath);
    expect(header.backingFile).toBe(copy);
    expect(header.mtime).toBe(FIXTURE_MTIME);
  });

  it('--compare checks the contents of old and new backing files', async () => {
    const built = buildCow(tmp.path, { size: 5 << 20, seed: 3 });
    const same = path.join(tmp.path, 'same.img');
    copyPreservingMtime(built.backingPath, same);
    expect((await rebaseCow(built.cowPath, same, { compare: true })).comparison).toEqual({ compared: true, equal: true });

    // Back to the original, then try a same-size, same-mtime file with one byte changed.
    await rebaseCow(built.cowPath, built.backingPath);
    const forged = path.join(tmp.path, 'forged.img');
    const bytes = fs.readFileSync(built.backingPath);
    bytes[4_500_000] ^= 0xff;
    fs.writeFileSync(forged, bytes);
    fs.utimesSync(forged, FIXTURE_MTIME, FIXTURE_MTIME);
    const before = snapshot(tmp.path, [built.cowPath]);
    const err = await refusal(rebaseCow(built.cowPath, forged, { compare: true }), 'backing-differs');
    expect(err.message).toMatch(/forged\.img: content differs from .*base\.img at byte 4500000/);
    expect(snapshot(tmp.path, [built.cowPath])).toEqual(before);
    // Without --compare the size/mtime check cannot tell.
    await rebaseCow(built.cowPath, forged);

    // Old backing gone: nothing to compare with, said so.
    const other = buildCow(tmp.path, { size: 100_000, cowName: 'other.cow', backingName: 'other.img' });
    const moved = path.join(tmp.path, 'other-moved.img');
    fs.renameSync(other.backingPath, moved);
    const result = await rebaseCow(other.cowPath, moved, { compare: true });
    expect(result.comparison).toMatchObject({ compared: false });
    expect(result.comparison?.reason).toMatch(/other\.img: cannot open the old backing file: no such file/);
  });

  it('refuses when a running UML holds the COW, when a commit is unfinished, and when the path does not fit', async () => {
    const built = buildCow(tmp.path, { layout: 'v1', size: 100_000 });
    const copy = path.join(tmp.path, 'copy.img');
    copyPreservingMtime(built.backingPath, copy);
    const before = snapshot(tmp.path, [built.cowPath]);

    const holder = await holdLockInChild(built.cowPath);
    try {
      const err = await refusal(rebaseCow(built.cowPath, copy), 'locked');
      expect(err.message).toMatch(/vm\.cow: in use by another process/);
    } finally {
      await holder.release();
    }

    fs.writeFileSync(commitJournalPath(built.cowPath), '{"format":"ubdcow-commit-journal","backing":"x","mtime":1}');
    await refusal(rebaseCow(built.cowPath, copy), 'commit-interrupted');
    fs.rmSync(commitJournalPath(built.cowPath));

    // V1 holds 255 bytes of path.
    const deep = path.join(tmp.path, 'd'.repeat(200), 'e'.repeat(60));
    fs.mkdirSync(path.dirname(deep), { recursive: true });
    copyPreservingMtime(built.backingPath, deep);
    const err = await refusal(rebaseCow(built.cowPath, deep), 'backing-too-long');
    expect(err.message).toMatch(/vm\.cow: backing_file is \d+ bytes long, expected at most 255 bytes/);
    expect(snapshot(tmp.path, [built.cowPath]).files).toEqual(before.files);

    const missing = await refusal(rebaseCow(built.cowPath, path.join(tmp.path, 'nope.img')), 'ENOENT');
    expect(missing.message).toMatch(/nope\.img/);
    expect(snapshot(tmp.path, [built.cowPath]).files).toEqual(before.files);
  });
});

describe('ubdcow rebase (CLI)', () => {
  const tmp = useTempDir();
  const bin = path.join(repoRoot, 'bin', 'ubdcow');
  beforeAll(() => ensureBuiltCli());

  function cli(args: string[]) {
    return spawnSync(process.execPath, [bin, ...args], { cwd: tmp.path, encoding: 'utf8' });
  }

  it('rebases, refuses with one line and exit 1, -u overrides, --help has an example', () => {
    const built = buildCow(tmp.path, { size: 100_000 });
    fs.renameSync(built.backingPath, path.join(tmp.path, 'new.img'));
    const ok = cli(['rebase', 'vm.cow', 'new.img', '--json']);
    expect(ok.status, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ newBacking: path.join(tmp.path, 'new.img'), checked: true });

    fs.copyFileSync(path.join(tmp.path, 'new.img'), path.join(tmp.path, 'fresh.img'));
    const refused = cli(['rebase', 'vm.cow', 'fresh.img']);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/^ubdcow rebase: fresh\.img: backing mtime is \d+ .*\(use --unsafe to rebase anyway\)\n$/);

    const unsafe = cli(['rebase', '-u', 'vm.cow', 'fresh.img']);
    expect(unsafe.status, unsafe.stderr).toBe(0);
    expect(unsafe.stdout).toMatch(/rebased vm\.cow: .*new\.img -> .*fresh\.img/);
    expect(unsafe.stderr).toMatch(/warning: .*overridden by --unsafe/);

    const help = cli(['rebase', '--help']);
    expect(help.stdout).toMatch(/--unsafe/);
    expect(help.stdout).toMatch(/Examples:/);
  });
});
