/**
 * What the OS building blocks buy, measured once on a fresh XFS reflink=1 loop mount (root only):
 * a 512 MiB random base, a "COW data" file with 8% of its 4 KiB blocks scattered, and three ways to
 * make the merged image: full copy then write the extents (what commit does now), clone the base
 * then clone the extents, clone the base then write the extents. Prints time and new space for each.
 *
 *   npx tsx bench/os-calls.ts [--size-mib 512] [--percent 8]
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { nodeFileSystem } from '../src/io/file/node-fs.js';
import { cloneFile, copyRange } from '../src/io/file/file-ops.js';

const args = process.argv.slice(2);
const option = (name: string, fallback: number) => {
  const at = args.indexOf(name);
  return at >= 0 ? Number(args[at + 1]) : fallback;
};
const MiB = 1 << 20;
const size = option('--size-mib', 512) * MiB;
const percent = option('--percent', 8);

function freeBytes(dir: string): number {
  spawnSync('sync', ['-f', dir]);
  const stats = fs.statfsSync(dir);
  return stats.bfree * stats.bsize;
}

/**
 * Free space once XFS has settled: an unmount frees deferred inode inactivation and the CoW
 * fork's speculative preallocations, so what remains is what the files really hold.
 */
function settledFree(image: string, dir: string): number {
  if (spawnSync('umount', [dir]).status !== 0 || spawnSync('mount', ['-o', 'loop', image, dir]).status !== 0) throw new Error('remount failed');
  return freeBytes(dir);
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) {
    console.log('os-calls bench: skipped (needs root for a loop mount)');
    return;
  }
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-oscalls-'));
  const mount = path.join(work, 'mnt');
  fs.mkdirSync(mount);
  const image = path.join(work, 'x.img');
  fs.closeSync(fs.openSync(image, 'w'));
  fs.truncateSync(image, size * 4 + 256 * MiB);
  spawnSync('mkfs.xfs', ['-q', '-m', 'reflink=1', image]);
  if (spawnSync('mount', ['-o', 'loop', image, mount]).status !== 0) throw new Error('mount failed');
  try {
    const base = path.join(mount, 'base.img');
    const cow = path.join(mount, 'cow.data');
    const fd = fs.openSync(base, 'w');
    for (let at = 0; at < size; at += 16 * MiB) fs.writeSync(fd, randomBytes(16 * MiB), 0, 16 * MiB, at);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const blocks = size / 4096;
    const chosen = [...Array(blocks).keys()].filter(() => Math.random() * 100 < percent);
    const cfd = fs.openSync(cow, 'w');
    fs.ftruncateSync(cfd, size);
    const block = randomBytes(4096);
    for (const b of chosen) fs.writeSync(cfd, block, 0, 4096, b * 4096);
    fs.fsyncSync(cfd);
    fs.closeSync(cfd);
    const cowBytes = chosen.length * 4096;
    console.log(`XFS reflink=1, base ${size / MiB} MiB, COW ${chosen.length} scattered 4 KiB blocks (${(cowBytes / MiB).toFixed(1)} MiB)`);

    for (const mode of ['copy+write', 'clone+clone', 'clone+write'] as const) {
      const out = path.join(mount, `out-${mode}`);
      const free0 = settledFree(image, mount);
      const started = performance.now();
      let cloneSeconds = 0;
      const [src, extents, dst] = [await nodeFileSystem.open(base, 'r'), await nodeFileSystem.open(cow, 'r'), await nodeFileSystem.open(out, 'wx')];
      try {
        if (mode === 'copy+write') {
          await dst.truncate(size);
          await copyRange(dst, src, { sourceOffset: 0, length: size, targetOffset: 0 }, { clone: false, targetIsZero: true });
        } else if (!(await cloneFile(dst, src)).cloned) throw new Error('clone refused');
        cloneSeconds = (performance.now() - started) / 1000;
        const buffer = new Uint8Array(4096);
        for (const b of chosen) {
          const range = { sourceOffset: b * 4096, length: 4096, targetOffset: b * 4096 };
          if (mode === 'clone+clone') await copyRange(dst, extents, range);
          else {
            extents.readSync!(buffer, 0, 4096, b * 4096);
            dst.writeSync!(buffer, 0, 4096, b * 4096);
          }
        }
        await dst.datasync();
      } finally {
        await Promise.all([src.close(), extents.close(), dst.close()]);
      }
      const seconds = (performance.now() - started) / 1000;
      const usedNow = free0 - freeBytes(mount);
      const used = free0 - settledFree(image, mount);
      console.log(
        `${mode.padEnd(12)} ${seconds.toFixed(3)} s (base ${cloneSeconds.toFixed(3)} s), new space ${(used / MiB).toFixed(1)} MiB = ${(used / cowBytes).toFixed(2)}x the COW's data (${(usedNow / MiB).toFixed(1)} MiB before XFS settled)`,
      );
      fs.rmSync(out);
    }
  } finally {
    spawnSync('umount', [mount]);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

await main();
