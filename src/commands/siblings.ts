import * as path from 'node:path';
import { MAX_HEADER_SIZE, parseHeader } from '../format/header.js';
import type { FileSystem } from '../io/file.js';

/**
 * COW files in `folders` (other than `cowPath`) whose header names `backingPath` as their backing
 * file. Committing one VM's changes into a base that other COWs read from would silently change
 * the disks those VMs see. Only regular files are opened (a FIFO would block), and only their
 * first bytes are read; files that are not COWs are skipped.
 */
export async function findSiblingCows(fs: FileSystem, cowPath: string, backingPath: string, folders: string[]): Promise<string[]> {
  const self = await fs.realpath(cowPath).catch(() => path.resolve(cowPath));
  const backing = await fs.realpath(backingPath).catch(() => path.resolve(backingPath));
  const found = new Set<string>();
  for (const folder of new Set(folders.map((f) => path.resolve(f)))) {
    const names = await fs.readdir(folder).catch(() => [] as string[]);
    for (const name of names) {
      const candidate = path.join(folder, name);
      if (found.has(candidate) || (await fs.realpath(candidate).catch(() => candidate)) === self) continue;
      if (await namesBacking(fs, candidate, backing)) found.add(candidate);
    }
  }
  return [...found].sort();
}

async function namesBacking(fs: FileSystem, file: string, backingRealPath: string): Promise<boolean> {
  try {
    const stat = await fs.stat(file);
    if (stat.kind !== 'file' || stat.size < 8) return false;
    const handle = await fs.open(file, 'r');
    let start: Uint8Array;
    try {
      start = new Uint8Array(MAX_HEADER_SIZE);
      start = start.subarray(0, await handle.read(start, 0, start.length, 0));
    } finally {
      await handle.close();
    }
    const { header } = parseHeader(start);
    const named = path.resolve(path.dirname(file), header.backingFile);
    const resolved = await fs.realpath(named).catch(() => named);
    return resolved === backingRealPath;
  } catch {
    return false;
  }
}
