import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { commitJournalPath } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { UbdcowError } from '../../src/errors.js';
import { FIXTURE_MTIME, buildCow, holdLockInChild, readRange, snapshot } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';

/** A V3 disk of 1,000,000 bytes: 1954 sectors, so the bitmap's last byte has 6 padding bits (1954-1959). */
const oddSize = 1_000_000;

function setBits(cowPath: string, bitmapOffset: number, bits: number[]): void {
  const fd = fs.openSync(cowPath, 'r+');
  try {
    for (const bit of bits) {
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, bitmapOffset + (bit >> 3));
      byte[0] |= 1 << (bit & 7);
      fs.writeSync(fd, byte, 0, 1, bitmapOffset + (bit >> 3));
    }
  } finally {
    fs.closeSync(fd);
  }
}

describe('checkCow', () => {
  const tmp = useTempDir();

  it('finds nothing wrong with a fresh COW or one with data in it', async () => {
    const base = path.join(tmp.path, 'plain.img');
    fs.writeFileSync(base, Buffer.alloc(1 << 20, 3));
    await createCow(path.join(tmp.path, 'fresh.cow'), base);
    expect(await checkCow(path.join(tmp.path, 'fresh.cow'))).toMatchObject({ clean: true, problems: [], repaired: [], inUse: false });
    for (const layout of ['v1', 'v2', 'v3', 'v3-broken'] as const) {
      const built = buildCow(tmp.path, { layout, size: oddSize, extents: [{ start: 0, end: 1900 }], cowName: `${layout}.cow` });
      const result = await checkCow(built.cowPath);
      expect(result.problems, layout).toEqual([]);
      expect(result.clean).toBe(true);
    }
  });

  it('reports bits set past the last sector; --repair clears exactly those and nothing else', async () => {
    const built = buildCow(tmp.path, { size: oddSize, extents: [{ start: 1950, end: 1954 }] });
    const { bitmapOffset, bitmapLength } = built.geometry;
    expect(bitmapLength * 8).toBe(1960);
    setBits(built.cowPath, bitmapOffset, [1955, 1959]);
    const before = snapshot(tmp.path, [built.cowPath, built.backingPath]);

    const found = await checkCow(built.cowPath);
    expect(found.clean).toBe(false);
    expect(found.problems).toEqual([
      {
        code: 'bits-beyond-end',
        message: `${built.cowPath}: bitmap bits 1955, 1959 are set, expected clear (the disk has 1954 sectors, 0-1953)`,
        repairable: true,
      },
    ]);
    expect(snapshot(tmp.path, [built.cowPath, built.backingPath])).toEqual(before);

    const fileBefore = fs.readFileSync(built.cowPath);
    const repaired = await checkCow(built.cowPath, { repair: true });
    expect(repaired.clean).toBe(true);
    expect(repaired.problems[0]).toMatchObject({ code: 'bits-beyond-end', repaired: true });
    expect(repaired.repaired).toEqual([`${built.cowPath}: cleared 2 bitmap bit(s) past the last sector (1955, 1959)`]);
    const fileAfter = fs.readFileSync(built.cowPath);
    const lastByte = bitmapOffset + bitmapLength - 1;
    const changed = [...fileAfter.keys()].filter((i) => fileAfter[i] !== fileBefore[i]);
    expect(changed).toEqual([lastByte]);
    // Sectors 1952 and 1953 stay allocated; only the padding bits went.
    expect(fileAfter[lastByte]).toBe(0b0000_0011);
    expect(await checkCow(built.cowPath)).toMatchObject({ clean: true, problems: [] });
  });

  it('reports a truncated file and whether allocated data was lost', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 10, end: 20 }, { start: 1000, end: 1010 }] });
    const { dataOffset, fileLength } = built.geometry;
    fs.truncateSync(built.cowPath, dataOffset + 1005 * 512);
    const result = await checkCow(built.cowPath);
    expect(result.problems).toEqual([
      {
        code: 'truncated',
        message: `${built.cowPath}: file length is ${dataOffset + 1005 * 512} bytes, expected ${fileLength} (data_offset ${dataOffset} + size ${1 << 20}); 5 allocated sectors lie past the end and their data is lost`,
        repairable: false,
      },
    ]);
    const clean = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 10, end: 20 }], cowName: 'short.cow' });
    fs.truncateSync(clean.cowPath, clean.geometry.dataOffset + 100 * 512);
    const short = await checkCow(clean.cowPath);
    expect(short.problems.map((p) => p.code)).toEqual(['truncated']);
    expect(short.problems[0].message).toMatch(/no allocated sector lies past the end/);
    expect(await checkCow(clean.cowPath, { repair: true })).toMatchObject({ clean: false, repaired: [] });
    expect(fs.statSync(clean.cowPath).size).toBe(clean.geometry.dataOffset + 100 * 512);
  });

  it('reports a file cut inside its bitmap, and a damaged header, as problems (not failures)', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20 });
    fs.truncateSync(built.cowPath, built.geometry.bitmapOffset + 10);
    const cut = await checkCow(built.cowPath);
    expect(cut.clean).toBe(false);
    expect(cut.problems).toEqual([
      expect.objectContaining({ code: 'truncated', detail: 'truncated-bitmap', repairable: false }),
    ]);
    const bad = path.join(tmp.path, 'bad.cow');
    fs.writeFileSync(bad, Buffer.alloc(8192, 0x41));
    const result = await checkCow(bad);
    expect(result.problems).toEqual([
      { code: 'header', detail: 'bad-magic', message: `${bad}: magic is 0x41414141, expected 0x4f4f4f4d ("MOOO"): not a UML COW file`, repairable: false },
    ]);
  });

  it('reports the backing file missing, resized or with another mtime; --backing checks another file', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20 });
    fs.utimesSync(built.backingPath, FIXTURE_MTIME + 60, FIXTURE_MTIME + 60);
    let result = await checkCow(built.cowPath);
    expect(result.problems.map((p) => p.code)).toEqual(['backing-mtime']);
    expect(result.problems[0].message).toMatch(/backing mtime is 1600000060 .*header says 1600000000/);

    fs.truncateSync(built.backingPath, 4096);
    result = await checkCow(built.cowPath);
    expect(result.problems.map((p) => p.code)).toEqual(['backing-size']);
    expect(result.problems[0].message).toMatch(/backing size is 4096 bytes, header says 1048576/);

    const copy = path.join(tmp.path, 'copy.img');
    fs.writeFileSync(copy, Buffer.alloc(1 << 20));
    fs.utimesSync(copy, FIXTURE_MTIME, FIXTURE_MTIME);
    fs.rmSync(built.backingPath);
    result = await checkCow(built.cowPath);
    expect(result.problems.map((p) => p.code)).toEqual(['backing-missing']);
    expect(result.problems[0].message).toMatch(/base\.img: cannot open backing file: no such file or directory/);
    expect(await checkCow(built.cowPath, { backing: copy })).toMatchObject({ clean: true });
  });

  it('reports an interrupted in-place commit', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20 });
    fs.writeFileSync(commitJournalPath(built.cowPath), JSON.stringify({ format: 'ubdcow-commit-journal', version: 1, backing: built.backingPath, size: 1 << 20, mtime: FIXTURE_MTIME }));
    const result = await checkCow(built.cowPath);
    expect(result.problems.map((p) => p.code)).toEqual(['commit-interrupted']);
    expect(result.problems[0].message).toMatch(/run `ubdcow commit .*vm\.cow` again/);
  });

  it('lists every problem at once', async () => {
    const built = buildCow(tmp.path, { size: oddSize, extents: [{ start: 1500, end: 1510 }] });
    setBits(built.cowPath, built.geometry.bitmapOffset, [1958]);
    fs.truncateSync(built.cowPath, built.geometry.dataOffset + 512);
    fs.rmSync(built.backingPath);
    const result = await checkCow(built.cowPath);
    expect(result.problems.map((p) => p.code)).toEqual(['truncated', 'bits-beyond-end', 'backing-missing']);
  });

  it('cannot check a file that is not there: an error, not a problem', async () => {
    const err = await checkCow(path.join(tmp.path, 'nope.cow')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UbdcowError);
    expect((err as UbdcowError).code).toBe('ENOENT');
  });

  it('checks a COW a running UML holds (saying so), but will not repair it', async () => {
    const built = buildCow(tmp.path, { size: oddSize });
    setBits(built.cowPath, built.geometry.bitmapOffset, [1957]);
    const holder = await holdLockInChild(built.cowPath);
    try {
      const result = await checkCow(built.cowPath);
      expect(result.inUse).toBe(true);
      expect(result.problems.map((p) => p.code)).toEqual(['bits-beyond-end']);
      const before = readRange(built.cowPath, 0, built.geometry.dataOffset);
      const err = await checkCow(built.cowPath, { repair: true }).catch((e: unknown) => e);
      expect((err as UbdcowError).code).toBe('locked');
      expect(readRange(built.cowPath, 0, built.geometry.dataOffset)).toEqual(before);
    } finally {
      await holder.release();
    }
  });
});

describe('ubdcow check (CLI)', () => {
  const tmp = useTempDir();
  const bin = path.join(repoRoot, 'bin', 'ubdcow');
  beforeAll(() => ensureBuiltCli());

  function cli(args: string[]) {
    return spawnSync(process.execPath, [bin, ...args], { cwd: tmp.path, encoding: 'utf8' });
  }

  it('exits 0 when clean, 1 with problems, 2 when it cannot check', () => {
    const built = buildCow(tmp.path, { size: oddSize });
    const clean = cli(['check', 'vm.cow']);
    expect(clean.status, clean.stderr).toBe(0);
    expect(clean.stdout).toBe('vm.cow: clean\n');

    setBits(built.cowPath, built.geometry.bitmapOffset, [1954]);
    const problems = cli(['check', 'vm.cow']);
    expect(problems.status).toBe(1);
    expect(problems.stdout).toMatch(/^problem: vm\.cow: bitmap bit 1954 is set, expected clear .*\[repairable with --repair\]$/m);

    const json = cli(['check', 'vm.cow', '--json']);
    expect(json.status).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({ clean: false, problems: [{ code: 'bits-beyond-end', repairable: true }] });

    const repaired = cli(['check', '--repair', 'vm.cow']);
    expect(repaired.status, repaired.stderr).toBe(0);
    expect(repaired.stdout).toMatch(/^repaired: vm\.cow: cleared 1 bitmap bit\(s\) past the last sector \(1954\)$/m);
    expect(repaired.stdout).toMatch(/vm\.cow: clean after repair/);

    const missing = cli(['check', 'nope.cow']);
    expect(missing.status).toBe(2);
    expect(missing.stderr).toBe('ubdcow check: nope.cow: cannot open COW file: no such file or directory (ENOENT)\n');

    const help = cli(['check', '--help']);
    expect(help.stdout).toMatch(/--repair/);
    expect(help.stdout).toMatch(/Examples:/);
  });
});
