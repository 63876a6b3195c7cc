/*
 * `--allocation-unit` and its default: COWs that `ubdcow write` and `ubdcow import` make hold
 * whole 4 KiB pages (UML 6.1 misreads a page mixing backing and COW sectors), checked from the
 * outside: `ubdcow map`'s extents, and the bytes at the COW file offsets map names.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

const ubdcow = (args: string[], input?: string) => run(process.execPath, [cli, ...args], { input });

interface Extent {
  offset: number;
  length: number;
  cowOffset: number;
}

function extentsOf(cow: string): Extent[] {
  const r = ubdcow(['map', cow, '--json']);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout).extents;
}

/** A 256 KiB base of bytes no page repeats, and a COW over it. */
function setup(dir: string): { base: string; cow: string; baseBytes: Buffer } {
  const base = path.join(dir, 'base.img');
  const baseBytes = Buffer.alloc(256 << 10);
  for (let i = 0; i < baseBytes.length; i += 4) baseBytes.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(base, baseBytes);
  const cow = path.join(dir, 'vm.cow');
  expect(ubdcow(['create', cow, base]).status).toBe(0);
  return { base, cow, baseBytes };
}

/** The COW file's own bytes of each extent (what UML reads from the COW's data area). */
function cowBytes(cow: string, extent: Extent): Buffer {
  const fd = fs.openSync(cow, 'r');
  try {
    const bytes = Buffer.alloc(extent.length);
    fs.readSync(fd, bytes, 0, extent.length, extent.cowOffset);
    return bytes;
  } finally {
    fs.closeSync(fd);
  }
}

describe('ubdcow write: whole 4 KiB pages unless --allocation-unit says otherwise', () => {
  const tmp = useTempDir();

  it('a 512-byte write into a page: map shows the whole page, whose other sectors in the COW are the backing\'s bytes', () => {
    const { cow, baseBytes } = setup(tmp.path);
    const data = 'x'.repeat(512);
    const w = ubdcow(['write', cow, '--offset', String(8192 + 1024)], data);
    expect(w.status, w.stderr).toBe(0);
    const extents = extentsOf(cow);
    expect(extents.map(({ offset, length }) => ({ offset, length }))).toEqual([{ offset: 8192, length: 4096 }]);
    for (const e of extents) expect(e.cowOffset % 512).toBe(0);
    const expected = Buffer.from(baseBytes.subarray(8192, 12288));
    expected.write(data, 1024, 'latin1');
    expect(cowBytes(cow, extents[0]).equals(expected)).toBe(true);
  });

  it('an unaligned write spanning pages: every extent is 4096-aligned whole pages, and the disk reads right', () => {
    const { cow, baseBytes } = setup(tmp.path);
    const data = 'y'.repeat(9000);
    expect(ubdcow(['write', cow, '--offset', '70001'], data).status).toBe(0);
    const extents = extentsOf(cow);
    expect(extents.map(({ offset, length }) => ({ offset, length }))).toEqual([{ offset: 69632, length: 12288 }]);
    const expected = Buffer.from(baseBytes.subarray(69632, 69632 + 12288));
    expected.write(data, 70001 - 69632, 'latin1');
    expect(cowBytes(cow, extents[0]).equals(expected)).toBe(true);
  });

  it('--allocation-unit 512 keeps sector granularity; 8K allocates 8 KiB units', () => {
    const { cow } = setup(tmp.path);
    expect(ubdcow(['write', cow, '--offset', '9216', '--allocation-unit', '512'], 'z'.repeat(512)).status).toBe(0);
    expect(extentsOf(cow).map(({ offset, length }) => ({ offset, length }))).toEqual([{ offset: 9216, length: 512 }]);
    expect(ubdcow(['write', cow, '--offset', '40000', '--allocation-unit', '8K'], 'z').status).toBe(0);
    expect(extentsOf(cow).map(({ offset, length }) => ({ offset, length }))).toEqual([
      { offset: 9216, length: 512 },
      { offset: 32768, length: 8192 },
    ]);
  });

  it('a bad --allocation-unit is one line naming the flag, and the COW is left alone', () => {
    const { cow } = setup(tmp.path);
    const before = fs.readFileSync(cow);
    for (const bad of ['1000', '256', 'lots']) {
      const r = ubdcow(['write', cow, '--offset', '0', '--allocation-unit', bad], 'data');
      expect(r.status).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^ubdcow write: --allocation-unit is "[^"]+", expected/);
    }
    expect(fs.readFileSync(cow).equals(before)).toBe(true);
  });
});

const missing = missingTools('qemu-img', 'qemu-io');

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow import stores whole 4 KiB pages', missing), () => {
  const tmp = useTempDir();

  it('a page differing in one sector is stored whole; --allocation-unit 512 stores only that sector', () => {
    const { base, baseBytes } = setup(tmp.path);
    const src = path.join(tmp.path, 'src.qcow2');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', src]).status).toBe(0);
    const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 5120 512', '-c', 'write -P 0x55 100000 5000', src]);
    expect(io.status, io.stderr).toBe(0);
    const pages = path.join(tmp.path, 'pages.cow');
    const r = ubdcow(['import', src, pages, base, '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ sectors: 8 + 16, bytes: 4096 + 8192 });
    const extents = extentsOf(pages);
    expect(extents.map(({ offset, length }) => ({ offset, length }))).toEqual([
      { offset: 4096, length: 4096 },
      { offset: 98304, length: 8192 },
    ]);
    const page = Buffer.from(baseBytes.subarray(4096, 8192));
    page.fill(0x44, 1024, 1536);
    expect(cowBytes(pages, extents[0]).equals(page)).toBe(true);
    const sectors = path.join(tmp.path, 'sectors.cow');
    const s = ubdcow(['import', src, sectors, base, '--json', '--allocation-unit', '512']);
    expect(s.status, s.stderr).toBe(0);
    expect(extentsOf(sectors).map(({ offset, length }) => ({ offset, length }))).toEqual([
      { offset: 5120, length: 512 },
      { offset: 99840, length: 5632 },
    ]);
    for (const cow of [pages, sectors]) {
      const merged = path.join(tmp.path, 'merged.raw');
      expect(run('sh', ['-c', `"${process.execPath}" "${cli}" cat "${cow}" > "${merged}"`]).status).toBe(0);
      const same = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', merged, src]);
      expect(same.status, same.stdout + same.stderr).toBe(0);
    }
  });
});
