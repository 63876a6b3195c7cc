import { spawnSync } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { openCow } from '../../src/io/engine/engine.js';
import { missingTools, run } from '../helpers/tools.js';

/** A loop device over a small file, when this machine lets us make one (root, /dev/loop*). */
function attachLoopDevice(file: string): { device?: string; reason?: string } {
  const result = spawnSync('losetup', ['-f', '--show', file], { encoding: 'utf8' });
  if (result.error) return { reason: 'losetup not available' };
  if (result.status !== 0) return { reason: `losetup refused (${result.stderr.trim() || `exit ${result.status}`})` };
  return { device: result.stdout.trim() };
}

const missing = missingTools('uml_mkcow', 'losetup');
const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-blockdev-'));
const image = path.join(dir, 'disk.img');
await fsp.writeFile(image, Buffer.alloc(3 * 1024 * 1024 + 512, 0x3c));
const loop = missing.length === 0 ? attachLoopDevice(image) : { reason: `${missing.join(', ')} not installed` };
if (loop.reason) console.warn(`block device interop [skipped: ${loop.reason}]`);
const title = loop.reason ? `block device as backing [skipped: ${loop.reason}]` : 'block device as backing';

describe.skipIf(!loop.device)(title, () => {
  const device = loop.device!;
  afterAll(async () => {
    spawnSync('losetup', ['-d', device]);
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('create over a block device equals uml_mkcow byte for byte (size from the device, not stat)', async () => {
    const theirs = path.join(dir, 'theirs.cow');
    const ours = path.join(dir, 'ours.cow');
    const made = run('uml_mkcow', [theirs, device]);
    expect(made.status, made.stderr).toBe(0);
    const result = await createCow(ours, device);
    expect(result.header.size).toBe(3 * 1024 * 1024 + 512);
    expect((await fsp.readFile(ours)).equals(await fsp.readFile(theirs))).toBe(true);
  });

  it('inspect finds the device backing in order, and the engine reads through it', async () => {
    const cow = path.join(dir, 'engine.cow');
    await createCow(cow, device);
    const report = await inspectCow(cow);
    expect(report.backing.state).toBe('ok');
    expect(report.backing.actual?.size).toBe(3 * 1024 * 1024 + 512);
    const dev = await openCow(cow);
    await dev.write(1000, Buffer.from('on top of a block device'));
    expect(Buffer.from(await dev.read(990, 40)).toString('latin1')).toBe(`${'<'.repeat(10)}on top of a block device${'<'.repeat(6)}`);
    await dev.close();
    // The device itself was never written.
    const original = await fsp.readFile(image);
    expect(original.every((b) => b === 0x3c)).toBe(true);
  });
});

afterAll(async () => {
  if (!loop.device) await fsp.rm(dir, { recursive: true, force: true });
});
