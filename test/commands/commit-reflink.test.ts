/**
 * Commit to a new file on a file system that shares extents (XFS reflink=1, a fresh loop mount):
 * the output is a clone of the backing with the COW's extents cloned over it. It must equal
 * uml_moo's output byte for byte and take about the COW's data in new space, measured after the
 * file system settles (unmount and mount again: XFS keeps CoW reservations until then).
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { commitCow } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { writeCowSectors, writeRandomFile } from '../helpers/cow-writes.js';
import { seededRandom } from '../helpers/cow-fixtures.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { firstDifference, missingTools, titleWithSkipReason } from '../helpers/tools.js';

const MiB = 1 << 20;
const missing = [
  ...(process.getuid?.() === 0 ? [] : ['root']),
  ...missingTools('mkfs.xfs', 'mount', 'umount', 'uml_moo'),
  ...(fs.existsSync('/dev/loop-control') ? [] : ['a loop device']),
];

function usedBytes(dir: string): number {
  const stats = fs.statfsSync(dir);
  return (stats.blocks - stats.bfree) * stats.bsize;
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('commit to a new file on a real XFS reflink=1 loop mount', missing), () => {
  let work: string;
  let image: string;
  let mount: string;
  let mounted = false;
  const remount = () => {
    expect(spawnSync('umount', [mount]).status).toBe(0);
    mounted = false;
    expect(spawnSync('mount', ['-o', 'loop', image, mount]).status).toBe(0);
    mounted = true;
  };

  beforeAll(() => {
    work = makeTempDir('ubdcow-commit-reflink-');
    image = path.join(work, 'xfs.img');
    mount = path.join(work, 'mnt');
    fs.mkdirSync(mount);
    fs.closeSync(fs.openSync(image, 'w'));
    fs.truncateSync(image, 768 * MiB);
    const mkfs = spawnSync('mkfs.xfs', ['-q', '-m', 'reflink=1', image], { encoding: 'utf8' });
    if (mkfs.status !== 0) throw new Error(`mkfs.xfs failed: ${mkfs.stderr}`);
    const result = spawnSync('mount', ['-o', 'loop', image, mount], { encoding: 'utf8' });
    if (result.status !== 0) throw new Error(`mount -o loop failed: ${result.stderr}`);
    mounted = true;
  });

  afterAll(() => {
    if (mounted && spawnSync('umount', [mount]).status !== 0) spawnSync('umount', ['-l', mount]);
    if (work) removeTempDir(work);
  });

  it('clones the backing and the COW extents: equal to uml_moo, new space at most 1.5x the COW data', async () => {
    const size = 128 * MiB;
    const base = path.join(mount, 'base.img');
    writeRandomFile(base, size);
    const cow = path.join(mount, 'disk.cow');
    await createCow(cow, base);
    const random = seededRandom(5);
    const blocks = new Set<number>();
    while (blocks.size < Math.round((size / 4096) * 0.08)) blocks.add(Math.floor(random() * (size / 4096)));
    // Scattered 4 KiB blocks, plus a long run and an odd-sized (unaligned-length) one.
    const writes = [...blocks].map((block) => ({ sector: block * 8, data: randomFillSync(new Uint8Array(4096)) }));
    writes.push({ sector: 1000 * 8 + 3, data: randomFillSync(new Uint8Array(5 * 512)) });
    const bySector = new Map(writes.flatMap((w) => Array.from({ length: w.data.length / 512 }, (_, i) => [w.sector + i, w.data.subarray(i * 512, i * 512 + 512)] as const)));
    await writeCowSectors(cow, [...bySector].sort((a, b) => a[0] - b[0]).map(([sector, data]) => ({ sector, data })));
    const cowData = bySector.size * 512;

    remount();
    const before = usedBytes(mount);
    const ours = path.join(mount, 'ours.img');
    await commitCow(cow, { output: ours });
    remount();
    const newSpace = usedBytes(mount) - before;
    expect(newSpace, `new space ${newSpace} for ${cowData} bytes of COW data`).toBeLessThanOrEqual(1.5 * cowData);

    const theirs = path.join(mount, 'moo.img');
    const moo = spawnSync('uml_moo', [cow, theirs], { encoding: 'utf8' });
    expect(moo.status, moo.stderr).toBe(0);
    expect(await firstDifference(ours, theirs)).toBeUndefined();
    // Deleting the COW leaves the merged image intact (its blocks are its own then).
    fs.rmSync(cow);
    expect(await firstDifference(ours, theirs)).toBeUndefined();
  });
});
