/*
 * ubdcow convert (a private serve + qemu-img convert) and ubdcow import (qemu-img reads any
 * image; only the sectors that differ from the backing go into the new COW), checked with
 * qemu-img compare, qemu-img map and ubdcow's own map/diff.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { patternedBacking } from '../nbd/serve-harness.js';

const missing = missingTools('qemu-img', 'qemu-io');
const SIZE = 8 << 20;

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

const ubdcow = (args: string[], cwd?: string) => run(process.execPath, [cli, ...args], { cwd });

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow convert and import with qemu-img', missing), () => {
  const tmp = useTempDir();

  /** A COW over a patterned base with writes at aligned and unaligned places, and its merged raw disk. */
  function setup() {
    const dir = tmp.path;
    const base = path.join(dir, 'base.img');
    patternedBacking(base, SIZE);
    const cow = path.join(dir, 'vm.cow');
    expect(ubdcow(['create', cow, base]).status).toBe(0);
    const writes: [number, number, number][] = [
      [0x11, 0, 4096],
      [0x22, 100_001, 3000],
      [0x00, 1 << 20, 65536], // zeros the COW holds: must win over the non-zero base
      [0x33, SIZE - 512, 512],
    ];
    for (const [p, o, l] of writes) {
      const data = path.join(dir, 'data.bin');
      fs.writeFileSync(data, Buffer.alloc(l, p));
      expect(ubdcow(['write', cow, '--offset', String(o), '--file', data]).status).toBe(0);
    }
    const merged = path.join(dir, 'merged.raw');
    const cat = run('sh', ['-c', `"${process.execPath}" "${cli}" cat "${cow}" > "${merged}"`]);
    expect(cat.status, cat.stderr).toBe(0);
    return { dir, base, cow, merged };
  }

  for (const format of ['qcow2', 'raw', 'vmdk', 'vdi', 'vhdx']) {
    it(`convert -O ${format}: qemu-img compare says identical to the merged disk`, () => {
      const { dir, cow, merged } = setup();
      const out = path.join(dir, `out.${format}`);
      const r = ubdcow(['convert', cow, out, '-O', format]);
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(run('qemu-img', ['info', '--output=json', out]).stdout).format).toBe(format);
      const cmp = run('qemu-img', ['compare', '-F', 'raw', out, merged]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      expect(fs.readdirSync(dir).filter((f) => f.includes('partial'))).toEqual([]);
    });
  }

  it('convert -B: a qcow2 overlay over the base holding only what the COW holds', () => {
    const { dir, base, cow, merged } = setup();
    const out = path.join(dir, 'overlay.qcow2');
    const r = ubdcow(['convert', cow, out, '-O', 'qcow2', '-B', base, '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ format: 'qcow2', baseFormat: 'raw' });
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', out]).stdout);
    expect(info['full-backing-filename']).toBe(base);
    const cmp = run('qemu-img', ['compare', out, merged]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    // qemu-img really skipped what reads through to the base: the overlay's own clusters (64 KiB)
    // cover only the COW's extents.
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', out]).stdout) as { start: number; length: number; depth: number; data: boolean; zero: boolean }[];
    const own = map.filter((x) => x.depth === 0 && (x.data || x.zero));
    const ownBytes = own.reduce((s, x) => s + x.length, 0);
    expect(ownBytes).toBeGreaterThan(0);
    expect(ownBytes).toBeLessThanOrEqual(4 * 65536 + 65536);
    const cowMap = JSON.parse(ubdcow(['map', cow, '--json']).stdout) as { extents: { offset: number; length: number }[] };
    for (const e of cowMap.extents) {
      const covered = own.some((x) => x.start <= e.offset && e.offset + e.length <= x.start + x.length);
      expect(covered, `extent at ${e.offset} is not in the overlay's own clusters`).toBe(true);
    }
  });

  it('refuses to overwrite, -B without qcow2, a base of another size; one line each, nothing left behind', () => {
    const { dir, base, cow } = setup();
    const existing = path.join(dir, 'exists.qcow2');
    fs.writeFileSync(existing, 'mine');
    const small = path.join(dir, 'small.img');
    fs.writeFileSync(small, Buffer.alloc(4096));
    for (const args of [
      [cow, existing, '-O', 'qcow2'],
      [cow, path.join(dir, 'x.raw'), '-O', 'raw', '-B', base],
      [cow, path.join(dir, 'y.qcow2'), '-O', 'qcow2', '-B', small],
    ]) {
      const r = ubdcow(['convert', ...args]);
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    expect(fs.readFileSync(existing, 'utf8')).toBe('mine');
    expect(fs.existsSync(path.join(dir, 'y.qcow2'))).toBe(false);
  });

  it('a missing qemu-img is one clear line naming it', () => {
    const { dir, cow } = setup();
    const emptyPath = path.join(dir, 'no-tools');
    fs.mkdirSync(emptyPath);
    const r = run('env', [`PATH=${emptyPath}`, process.execPath, cli, 'convert', cow, path.join(dir, 'o.qcow2'), '-O', 'qcow2']);
    expect(r.status).toBe(1);
    expect(r.stderr.trim()).toMatch(/^ubdcow convert: qemu-img is not installed/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('import: a qcow2 written by qemu-img becomes a COW with only the differing sectors', () => {
    const { dir, base, merged } = setup();
    const src = path.join(dir, 'src.qcow2');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', src]).status).toBe(0);
    const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 8192 8192', '-c', 'write -P 0x55 5000001 1000', '-c', 'write -z 2097152 4096', src]);
    expect(io.status, io.stderr).toBe(0);
    const imported = path.join(dir, 'imported.cow');
    const r = ubdcow(['import', src, imported, base, '--json']);
    expect(r.status, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.sourceFormat).toBe('qcow2');
    // Whole 4 KiB pages: 8192 bytes = 16 sectors; 1000 bytes at 5000001 lie in one page (8 sectors); 4096 zeros = 8 sectors.
    expect(result.sectors).toBe(16 + 8 + 8);
    const mergedImport = path.join(dir, 'imported.raw');
    expect(run('sh', ['-c', `"${process.execPath}" "${cli}" cat "${imported}" > "${mergedImport}"`]).status).toBe(0);
    const same = run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', mergedImport, src]);
    expect(same.status, same.stdout + same.stderr).toBe(0);
    expect(ubdcow(['check', imported]).status).toBe(0);
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('.'))).toEqual([]);
    // Refuses to overwrite without -f.
    const again = ubdcow(['import', src, imported, base]);
    expect(again.status).toBe(1);
    expect(fs.existsSync(merged)).toBe(true);
  });
});
