import { spawnSync } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { removeStaleTemporaries } from '../../src/io/file/atomic.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';

/** The pid of a process that has already exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(child.stdout);
}

describe('temporary files of killed runs', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-atomic-'));
  });
  afterEach(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('are removed when their process is gone; live ones and other files are left alone', async () => {
    const out = path.join(dir, 'merged.img');
    const stale = path.join(dir, `.merged.img.ubdcow-${deadPid()}-abc123.tmp`);
    const live = path.join(dir, `.merged.img.ubdcow-${process.ppid}-def456.tmp`);
    const mine = path.join(dir, `.merged.img.ubdcow-${process.pid}-ghi789.tmp`);
    const otherTarget = path.join(dir, `.other.img.ubdcow-${deadPid()}-jkl012.tmp`);
    const unrelated = path.join(dir, 'notes.tmp');
    for (const file of [stale, live, mine, otherTarget, unrelated]) await fsp.writeFile(file, 'x');
    expect(await removeStaleTemporaries(nodeFileSystem, out)).toEqual([stale]);
    const left = (await fsp.readdir(dir)).sort();
    expect(left).toEqual([live, mine, otherTarget, unrelated].map((f) => path.basename(f)).sort());
  });

  it('create clears a stale temporary of the same COW name before it starts', async () => {
    const base = path.join(dir, 'base.img');
    await fsp.writeFile(base, Buffer.alloc(4096));
    const stale = path.join(dir, `.vm.cow.ubdcow-${deadPid()}-zz9.tmp`);
    await fsp.writeFile(stale, 'half-written');
    await createCow(path.join(dir, 'vm.cow'), base);
    expect((await fsp.readdir(dir)).sort()).toEqual(['base.img', 'vm.cow']);
  });
});
