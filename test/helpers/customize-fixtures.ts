/* Shared set-up for the customize tests: base images made by mke2fs, COWs over them, flattening a COW for e2fsprogs. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openVirtualDisk } from '../../src/io/engine/virtual-disk.js';
import { runProgram } from '../uml/harness.js';

export interface FsConfig {
  name: string;
  type: 'ext2' | 'ext3' | 'ext4';
  blockSize: number;
  features?: string;
}

export const fsConfigs: FsConfig[] = [
  { name: 'ext2, 1 KiB blocks', type: 'ext2', blockSize: 1024 },
  { name: 'ext3, 4 KiB blocks', type: 'ext3', blockSize: 4096 },
  { name: 'ext4 metadata_csum 64bit, 4 KiB blocks', type: 'ext4', blockSize: 4096, features: 'metadata_csum,64bit' },
  { name: 'ext4 metadata_csum 64bit, 1 KiB blocks', type: 'ext4', blockSize: 1024, features: 'metadata_csum,64bit' },
];

/** A guest-like tree: /etc with passwd and a large directory (htree), a home, files to change. */
export function buildGuestTree(dir: string): void {
  const file = (rel: string, text: string | Uint8Array, mode = 0o644) => {
    fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
    fs.writeFileSync(path.join(dir, rel), text);
    fs.chmodSync(path.join(dir, rel), mode);
  };
  file('etc/passwd', 'root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n');
  file('etc/hostname', 'base\n');
  file('etc/motd', 'no newline at the end');
  file('etc/old.conf', 'old\n');
  file('etc/gone.txt', 'to be deleted\n');
  for (let i = 0; i < 400; i++) file(`etc/many/entry-with-a-long-name-${i}`, `${i}\n`);
  file('opt/tree/a/b/c.txt', 'deep\n');
  file('opt/tree/top.txt', 'top\n');
  file('var/log/big.log', Buffer.alloc(200_000, 0x61));
  fs.mkdirSync(path.join(dir, 'root'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'home/alice'), { recursive: true });
}

export async function mkfs(tree: string, image: string, config: FsConfig, size = '64M'): Promise<void> {
  const args = ['-q', '-F', '-t', config.type, '-b', String(config.blockSize), '-d', tree, '-E', 'root_owner=0:0'];
  if (config.features) args.push('-O', config.features);
  const result = await runProgram('mke2fs', [...args, image, size]);
  expect(result.status, result.stderr).toBe(0);
  // alice's home belongs to alice, as in a real guest.
  const owner = await runProgram('debugfs', ['-w', '-R', 'sif /home/alice uid 1000', image]);
  expect(owner.status).toBe(0);
  await runProgram('debugfs', ['-w', '-R', 'sif /home/alice gid 1000', image]);
}

/** A base image and a COW over it in `dir`. */
export async function baseAndCow(dir: string, config: FsConfig, size?: string): Promise<{ base: string; cow: string }> {
  const tree = path.join(dir, 'tree');
  buildGuestTree(tree);
  const base = path.join(dir, 'base.img');
  const cow = path.join(dir, 'vm.cow');
  await mkfs(tree, base, config, size);
  await createCow(cow, base);
  return { base, cow };
}

/** The disk a COW (or raw image) stands for, as a raw file e2fsprogs can read. */
export async function flatten(image: string, out: string): Promise<string> {
  const disk = await openVirtualDisk(image);
  const fd = fs.openSync(out, 'w');
  try {
    const chunk = 4 << 20;
    for (let at = 0; at < disk.size; at += chunk) {
      const bytes = await disk.read(at, Math.min(chunk, disk.size - at));
      fs.writeSync(fd, bytes, 0, bytes.length, at);
    }
    fs.ftruncateSync(fd, disk.size);
  } finally {
    fs.closeSync(fd);
    await disk.close();
  }
  return out;
}

export async function fsckClean(image: string): Promise<void> {
  const result = await runProgram('e2fsck', ['-fn', image]);
  expect(result.status, `e2fsck -fn ${image}:\n${result.stdout}${result.stderr}`).toBe(0);
}

/** `debugfs stat` of a guest path, as text. */
export async function debugfsStat(image: string, guestPath: string): Promise<string> {
  const result = await runProgram('debugfs', ['-R', `stat ${guestPath}`, image]);
  return result.stdout + result.stderr;
}
