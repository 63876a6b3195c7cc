import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { createCow } from '../../src/commands/create.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { UbdcowError } from '../../src/errors.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { serializeV3 } from '../../src/format/header.js';
import { kernelBitmapOverlap } from '../../src/format/kernel-traps.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, run } from '../helpers/tools.js';

/*
 * Issue 15 items 6 and 7: COW files the UML kernel corrupts (its 16-byte bitmap writes reach past
 * the bitmap into sector 0's data when the alignment is not a multiple of 8) or hangs on (64
 * sectors or fewer). create refuses or warns, inspect warns, check reports.
 */

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

function backingOf(dir: string, sectors: number): string {
  const file = path.join(dir, `base-${sectors}.img`);
  fs.writeFileSync(file, Buffer.alloc(sectors * 512, 0x33));
  return file;
}

/** A V3 COW with any alignment, written directly (what another tool, or an older ubdcow, made). */
function writeCow(cowPath: string, backing: string, alignment: number) {
  const stat = fs.statSync(backing);
  const fields = { backingFile: backing, mtime: Math.floor(stat.mtimeMs / 1000), size: stat.size, sectorSize: 512, alignment };
  const geometry = computeGeometry({ ...fields, version: 3, layout: 'v3', littleEndian: false, cowFormat: 0 });
  fs.writeFileSync(cowPath, serializeV3(fields));
  fs.truncateSync(cowPath, geometry.fileLength);
  return geometry;
}

describe('alignments whose data area the kernel\'s bitmap writes overlap', () => {
  const tmp = useTempDir();

  it('alignment 1 over 65 sectors: the kernel\'s write reaches 7 bytes into sector 0 (4137-4143)', () => {
    // 9-byte bitmap at 4128: two words written at 4128, ending at 4144; data starts at 4137.
    const geometry = computeGeometry({ version: 3, layout: 'v3', littleEndian: false, backingFile: '/x', mtime: 0, size: 65 * 512, sectorSize: 512, alignment: 1, cowFormat: 0 });
    expect(geometry).toMatchObject({ bitmapOffset: 4128, bitmapLength: 9, dataOffset: 4137 });
    expect(kernelBitmapOverlap(geometry)).toEqual({ start: 4137, end: 4144 });
  });

  it('create refuses alignment 1, naming the bytes at risk, and leaves no file', async () => {
    const backing = backingOf(tmp.path, 65);
    const cow = path.join(tmp.path, 'a1.cow');
    const error = await createCow(cow, backing, { alignment: 1 }).catch((err: unknown) => err);
    expect(error).toBeInstanceOf(UbdcowError);
    expect((error as UbdcowError).code).toBe('kernel-bitmap-overlap');
    expect((error as Error).message).toContain('bytes 4137-4143');
    expect((error as Error).message).toContain('--force');
    expect(fs.existsSync(cow)).toBe(false);
  });

  it('create --force makes it with a warning; inspect warns and check reports a problem', async () => {
    const backing = backingOf(tmp.path, 65);
    const cow = path.join(tmp.path, 'a1.cow');
    const created = await createCow(cow, backing, { alignment: 1, force: true });
    expect(created.warnings.join('\n')).toContain('bytes 4137-4143');
    expect((await inspectCow(cow)).warnings.join('\n')).toContain('bytes 4137-4143');
    const checked = await checkCow(cow);
    expect(checked.clean).toBe(false);
    expect(checked.problems).toEqual([expect.objectContaining({ code: 'kernel-bitmap-overlap', message: expect.stringContaining('bytes 4137-4143') })]);
  });

  it('check reports an existing alignment-1 file made elsewhere (CLI: exit 1, problem line)', () => {
    const backing = backingOf(tmp.path, 200); // 25-byte bitmap: reach 4128 + 32, data at 4153
    const cow = path.join(tmp.path, 'old.cow');
    writeCow(cow, backing, 1);
    const result = run(process.execPath, [cli, 'check', cow]);
    expect(result.status).toBe(1);
    expect(result.stdout).toContain('bytes 4153-4159');
    expect(result.stderr).toBe('');
  });

  it('alignment 8 is safe at every bitmap length: created without a word, check clean', async () => {
    for (const sectors of [65, 129, 136, 200, 1000]) {
      const backing = backingOf(tmp.path, sectors);
      const cow = path.join(tmp.path, `a8-${sectors}.cow`);
      const created = await createCow(cow, backing, { alignment: 8 });
      expect(created.warnings).toEqual([]);
      expect(kernelBitmapOverlap(created.geometry)).toBeUndefined();
      expect(created.geometry.dataOffset).toBe(4128 + Math.ceil(Math.ceil(sectors / 8) / 8) * 8);
      const checked = await checkCow(cow);
      expect(checked.problems).toEqual([]);
      expect(checked.clean).toBe(true);
    }
  });

  it('check reports an existing alignment-8 file as clean, and alignment 1 whenever the bitmap is not whole words', async () => {
    for (const [sectors, alignment, overlaps] of [
      [200, 8, false],
      [512, 1, false], // 64-byte bitmap: whole words, the data area starts right after them
      [520, 1, true],
    ] as const) {
      const backing = backingOf(tmp.path, sectors);
      const cow = path.join(tmp.path, `x-${sectors}-${alignment}.cow`);
      writeCow(cow, backing, alignment);
      const checked = await checkCow(cow);
      expect(checked.problems.some((problem) => problem.code === 'kernel-bitmap-overlap'), `${sectors} sectors, alignment ${alignment}`).toBe(overlaps);
    }
  });
});

describe('disks of 64 sectors or fewer hang the guest', () => {
  const tmp = useTempDir();

  it('create warns at 64 sectors, naming the limit; inspect shows it; check keeps it a warning', async () => {
    const backing = backingOf(tmp.path, 64);
    const cow = path.join(tmp.path, 'tiny.cow');
    const created = await createCow(cow, backing);
    expect(created.warnings).toEqual([expect.stringContaining('64 sectors (32 KiB) or fewer')]);
    expect((await inspectCow(cow)).warnings).toEqual([expect.stringContaining('64 sectors (32 KiB) or fewer')]);
    const checked = await checkCow(cow);
    expect(checked.clean).toBe(true);
    expect(checked.warnings).toEqual([expect.stringContaining('64 sectors (32 KiB) or fewer')]);
  });

  it('65 sectors: no warning anywhere', async () => {
    const backing = backingOf(tmp.path, 65);
    const cow = path.join(tmp.path, 'ok.cow');
    expect((await createCow(cow, backing)).warnings).toEqual([]);
    expect((await inspectCow(cow)).warnings).toEqual([]);
    expect((await checkCow(cow)).warnings).toEqual([]);
  });

  it('the CLI prints the warning on stderr for create and inspect (text and --json)', () => {
    const backing = backingOf(tmp.path, 64);
    const cow = path.join(tmp.path, 'tiny-cli.cow');
    const created = run(process.execPath, [cli, 'create', cow, backing]);
    expect(created.status).toBe(0);
    expect(created.stderr).toMatch(/^ubdcow create: warning: .*64 sectors \(32 KiB\) or fewer/m);
    const inspected = run(process.execPath, [cli, 'inspect', cow]);
    expect(inspected.status).toBe(0);
    expect(inspected.stderr).toMatch(/^ubdcow inspect: warning: .*64 sectors \(32 KiB\) or fewer/m);
    const json = JSON.parse(run(process.execPath, [cli, 'inspect', '--json', cow]).stdout);
    expect(json.warnings.join('\n')).toContain('64 sectors (32 KiB) or fewer');
  });
});
