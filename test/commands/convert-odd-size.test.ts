/*
 * Issue 18 item 14: disks whose size is not a multiple of 512 (a COW over such a backing keeps the
 * exact size). qemu-img 7.2 counts whole sectors, so what it writes of such a disk is rounded up to
 * 512 with zeros. `convert -O raw` used to keep that padding, `convert -B` refused the disk's own
 * backing file as "another size", and `import` refused convert's own qcow2 output. Now raw output
 * is the disk byte for byte, -B takes the backing file (the overlay's first SIZE bytes are the
 * disk), and import takes a source of the size rounded up when its tail is zeros: round trips are
 * exact, checked with qemu-img and `ubdcow cat`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { UbdcowError } from '../../src/errors.js';
import { convertImage } from '../../src/commands/convert.js';
import { importImage } from '../../src/commands/import.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';

const missing = missingTools('qemu-img');
const SIZE = (8 << 20) + 1234;
const ROUNDED = Math.ceil(SIZE / 512) * 512;

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

const ubdcow = (args: string[], cwd: string) => run(process.execPath, [cli, ...args], { cwd });

function ok(result: { status: number | null; stdout: string; stderr: string }): void {
  expect(result.status, result.stdout + result.stderr).toBe(0);
}

/** `ubdcow cat COW` as bytes. */
function catBytes(dir: string, cow: string): Buffer {
  const r = spawnSync(process.execPath, [cli, 'cat', cow], { cwd: dir, maxBuffer: 256 << 20 });
  expect(r.status, String(r.stderr)).toBe(0);
  return r.stdout;
}

/** What qemu-img reads of `image`, as raw bytes. */
function qemuRaw(dir: string, image: string): Buffer {
  const out = path.join(dir, `${image}.qemu.raw`);
  ok(run('qemu-img', ['convert', '-O', 'raw', image, out], { cwd: dir }));
  const bytes = fs.readFileSync(out);
  fs.rmSync(out);
  return bytes;
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('convert and import of a disk of 8 MiB + 1234 bytes', missing), () => {
  const tmp = useTempDir();

  /** odd.img (non-zero up to its last byte), vm.cow over it with writes in the first and the last, partial, sector; the disk's bytes. */
  function setup(): { dir: string; disk: Buffer } {
    const dir = tmp.path;
    const base = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4096) base.fill((i >> 12) % 251 | 1, i, Math.min(SIZE, i + 4096));
    fs.writeFileSync(path.join(dir, 'odd.img'), base);
    ok(ubdcow(['create', 'vm.cow', 'odd.img'], dir));
    fs.writeFileSync(path.join(dir, 'a.bin'), Buffer.alloc(3000, 0xa1));
    fs.writeFileSync(path.join(dir, 'z.bin'), Buffer.alloc(100, 0xee));
    ok(ubdcow(['write', 'vm.cow', '--offset', '100', '--file', 'a.bin'], dir));
    ok(ubdcow(['write', 'vm.cow', '--offset', String(SIZE - 100), '--file', 'z.bin'], dir));
    const disk = catBytes(dir, 'vm.cow');
    expect(disk.length).toBe(SIZE);
    expect(disk.subarray(SIZE - 100).every((b) => b === 0xee)).toBe(true);
    return { dir, disk };
  }

  it('convert -O raw is the disk byte for byte (no padding to 512)', () => {
    const { dir, disk } = setup();
    ok(ubdcow(['convert', 'vm.cow', 'out.raw', '-O', 'raw'], dir));
    const out = fs.readFileSync(path.join(dir, 'out.raw'));
    expect(out.length).toBe(SIZE);
    expect(out.equals(disk)).toBe(true);
  });

  it('convert -O qcow2, then import over the backing file: the COW reads as the disk byte for byte', () => {
    const { dir, disk } = setup();
    ok(ubdcow(['convert', 'vm.cow', 'full.qcow2', '-O', 'qcow2'], dir));
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', 'full.qcow2'], { cwd: dir }).stdout);
    expect(info['virtual-size']).toBe(ROUNDED);
    const r = ubdcow(['import', 'full.qcow2', 'back.cow', 'odd.img', '--json'], dir);
    ok(r);
    expect(JSON.parse(r.stdout).size).toBe(SIZE);
    const back = catBytes(dir, 'back.cow');
    expect(back.length).toBe(SIZE);
    expect(back.equals(disk)).toBe(true);
    ok(ubdcow(['check', 'back.cow'], dir));
  });

  it('convert -B odd.img: an overlay whose first SIZE bytes are the disk (the rest zeros); import of it is exact', () => {
    const { dir, disk } = setup();
    const r = ubdcow(['convert', 'vm.cow', 'overlay.qcow2', '-O', 'qcow2', '-B', 'odd.img'], dir);
    ok(r);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', 'overlay.qcow2'], { cwd: dir }).stdout);
    expect(info['backing-filename']).toMatch(/odd\.img$/);
    const seen = qemuRaw(dir, 'overlay.qcow2');
    expect(seen.length).toBe(ROUNDED);
    expect(seen.subarray(0, SIZE).equals(disk)).toBe(true);
    expect(seen.subarray(SIZE).every((b) => b === 0)).toBe(true);
    ok(ubdcow(['import', 'overlay.qcow2', 'back.cow', 'odd.img'], dir));
    expect(catBytes(dir, 'back.cow').equals(disk)).toBe(true);
  });

  it('import of the disk as an exact-size raw file (qemu rounds it up too) is exact', () => {
    const { dir, disk } = setup();
    fs.writeFileSync(path.join(dir, 'disk.raw'), disk);
    ok(ubdcow(['import', 'disk.raw', 'back.cow', 'odd.img'], dir));
    expect(catBytes(dir, 'back.cow').equals(disk)).toBe(true);
  });

  it('refuses a base or a source that only looks the same size: one line naming the sizes, nothing written', () => {
    const { dir, disk } = setup();
    // A raw base one byte longer: qemu calls it the same size, its last byte would show through.
    fs.writeFileSync(path.join(dir, 'longer.img'), Buffer.concat([fs.readFileSync(path.join(dir, 'odd.img')), Buffer.from([7])]));
    const base = ubdcow(['convert', 'vm.cow', 'o.qcow2', '-O', 'qcow2', '-B', 'longer.img'], dir);
    expect(base.status).toBe(1);
    expect(base.stderr).toBe(`ubdcow convert: longer.img: is ${SIZE + 1} bytes, but vm.cow is ${SIZE}; an overlay needs a base of the disk's size (such as the backing file vm.cow was made over)\n`);
    // A source of the rounded size whose tail holds data: importing it over odd.img would lose that.
    fs.writeFileSync(path.join(dir, 'tail.raw'), Buffer.concat([disk, Buffer.alloc(ROUNDED - SIZE - 1), Buffer.from([9])]));
    const source = ubdcow(['import', 'tail.raw', 't.cow', 'odd.img'], dir);
    expect(source.status).toBe(1);
    expect(source.stderr).toBe(
      `ubdcow import: tail.raw: its disk is ${ROUNDED} bytes, and the ${ROUNDED - SIZE} bytes past ${SIZE} (the backing file's size) are not all zero; import over a backing file of ${ROUNDED} bytes\n`,
    );
    expect(fs.readdirSync(dir).filter((name) => name.startsWith('.') || name === 'o.qcow2' || name === 't.cow')).toEqual([]);
  });

  it('a base or source of the wrong size is backing-mismatch, the one code for a backing file that does not fit', async () => {
    const { dir, disk } = setup();
    fs.writeFileSync(path.join(dir, 'longer.img'), Buffer.concat([fs.readFileSync(path.join(dir, 'odd.img')), Buffer.from([7])]));
    fs.writeFileSync(path.join(dir, 'tail.raw'), Buffer.concat([disk, Buffer.alloc(ROUNDED - SIZE - 1), Buffer.from([9])]));
    const refusals = [
      () => convertImage(path.join(dir, 'vm.cow'), path.join(dir, 'o.qcow2'), { format: 'qcow2', base: path.join(dir, 'longer.img') }),
      () => importImage(path.join(dir, 'tail.raw'), path.join(dir, 't.cow'), path.join(dir, 'odd.img')),
    ];
    for (const refusal of refusals) {
      const err = await refusal().catch((e: unknown) => e);
      expect(err, String(err)).toBeInstanceOf(UbdcowError);
      expect((err as UbdcowError).code).toBe('backing-mismatch');
    }
  });
});
