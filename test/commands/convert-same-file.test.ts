/*
 * Issue 18 item 1 (data loss): `convert IMAGE OUT -B base.img -f` with OUT = the backing file, and
 * `import SRC COW BACKING -f` with COW = BACKING, used to replace the backing file and exit 0.
 * Now OUT may not be IMAGE, the backing file IMAGE's header names, the -b override or BASE, and
 * COW may not be SRC or BACKING: by identity (dev, ino), so by the same name, a symlink or a hard
 * link alike, with -f or without. Each refusal is one line naming the fix, exit 1, and the file
 * keeps its bytes and mtime; nothing is left behind.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { patternedBacking } from '../nbd/serve-harness.js';

const missing = missingTools('qemu-img');
const SIZE = 4 << 20;

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

const ubdcow = (args: string[], cwd: string) => run(process.execPath, [cli, ...args], { cwd });

interface Snapshot {
  hash: string;
  mtimeMs: number;
  size: number;
}

function snapshot(file: string): Snapshot {
  const stat = fs.statSync(file);
  return { hash: crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex'), mtimeMs: stat.mtimeMs, size: stat.size };
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('convert and import never write over what they read', missing), () => {
  const tmp = useTempDir();

  /** base.img, vm.cow over it (one write), other.img (a second base), src.qcow2, and links to each. */
  function setup(): string {
    const dir = tmp.path;
    patternedBacking(path.join(dir, 'base.img'), SIZE);
    fs.copyFileSync(path.join(dir, 'base.img'), path.join(dir, 'other.img'));
    expect(ubdcow(['create', 'vm.cow', 'base.img'], dir).status).toBe(0);
    fs.writeFileSync(path.join(dir, 'data.bin'), Buffer.alloc(4096, 0x5a));
    expect(ubdcow(['write', 'vm.cow', '--offset', '8192', '--file', 'data.bin'], dir).status).toBe(0);
    expect(run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', 'other.img', 'src.qcow2'], { cwd: dir }).status).toBe(0);
    for (const name of ['base.img', 'vm.cow', 'other.img', 'src.qcow2']) {
      fs.symlinkSync(name, path.join(dir, `sym-${name}`));
      fs.linkSync(path.join(dir, name), path.join(dir, `hard-${name}`));
    }
    return dir;
  }

  /** Runs `args` (with and without -f), expects the one-line refusal, and that `protectedName` is untouched. */
  function expectRefused(dir: string, args: string[], protectedName: string): void {
    const target = path.join(dir, protectedName);
    const before = snapshot(target);
    const names = fs.readdirSync(dir).sort();
    for (const force of [['-f'], []]) {
      const r = ubdcow([...args, ...force], dir);
      expect(r.status, `${args.join(' ')} ${force.join('')}: ${r.stdout}${r.stderr}`).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^ubdcow (convert|import): .*: is .*; writing there would destroy it, even with -f: name another output file$/);
      expect(snapshot(target), `${protectedName} changed by ${args.join(' ')} ${force.join('')}`).toEqual(before);
      expect(fs.readdirSync(dir).sort()).toEqual(names);
    }
  }

  for (const how of ['', 'sym-', 'hard-']) {
    const what = how === '' ? 'by its own name' : how === 'sym-' ? 'through a symlink' : 'through a hard link';
    it(`convert: OUT is the backing file ${what} (with -B of it, -O raw, -O qcow2): refused`, () => {
      const dir = setup();
      expectRefused(dir, ['convert', 'vm.cow', `${how}base.img`, '-O', 'qcow2', '-B', 'base.img'], 'base.img');
      expectRefused(dir, ['convert', 'vm.cow', `${how}base.img`, '-O', 'raw'], 'base.img');
      expectRefused(dir, ['convert', 'vm.cow', `${how}base.img`, '-O', 'qcow2'], 'base.img');
    });

    it(`convert: OUT is IMAGE, BASE or the -b backing ${what}: refused`, () => {
      const dir = setup();
      expectRefused(dir, ['convert', 'vm.cow', `${how}vm.cow`, '-O', 'qcow2'], 'vm.cow');
      expectRefused(dir, ['convert', 'vm.cow', `${how}other.img`, '-O', 'qcow2', '-B', 'other.img'], 'other.img');
      expectRefused(dir, ['convert', 'vm.cow', `${how}other.img`, '-O', 'raw', '-b', 'other.img'], 'other.img');
      // A raw IMAGE (no header): OUT may still not be IMAGE.
      expectRefused(dir, ['convert', 'other.img', `${how}other.img`, '-O', 'qcow2'], 'other.img');
    });

    it(`import: COW is BACKING or SRC ${what}: refused`, () => {
      const dir = setup();
      expectRefused(dir, ['import', 'src.qcow2', `${how}base.img`, 'base.img'], 'base.img');
      expectRefused(dir, ['import', 'src.qcow2', `${how}src.qcow2`, 'base.img'], 'src.qcow2');
    });
  }

  it('a new OUT beside them is still written, and -f still replaces an unrelated file', () => {
    const dir = setup();
    const before = snapshot(path.join(dir, 'base.img'));
    fs.writeFileSync(path.join(dir, 'old.qcow2'), 'mine');
    expect(ubdcow(['convert', 'vm.cow', 'old.qcow2', '-O', 'qcow2', '-B', 'base.img', '-f'], dir).status).toBe(0);
    expect(ubdcow(['import', 'old.qcow2', 'new.cow', 'base.img'], dir).status).toBe(0);
    expect(snapshot(path.join(dir, 'base.img'))).toEqual(before);
    for (const cow of ['new.cow', 'vm.cow']) {
      expect(run('sh', ['-c', `"${process.execPath}" "${cli}" cat ${cow} > ${cow}.raw`], { cwd: dir }).status).toBe(0);
    }
    expect(fs.readFileSync(path.join(dir, 'new.cow.raw')).equals(fs.readFileSync(path.join(dir, 'vm.cow.raw')))).toBe(true);
  });
});
