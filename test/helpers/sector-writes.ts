import { randomBytes } from 'node:crypto';
import type { SectorWrite } from './cow-writes.js';

/** Where a write goes: `count` sectors from sector `at` (taken modulo the disk's sector count). */
export interface SectorPick {
  at: number;
  count: number;
}

/**
 * One write per pick, clipped at the end of a disk of `size` bytes (its last sector may be partial).
 * `fill` gives each write's bytes, [start, end) of the disk; random bytes by default.
 */
export function pickedWrites<P extends SectorPick>(
  size: number,
  picks: P[],
  options: { sectorSize?: number; fill?: (pick: P, start: number, end: number) => Uint8Array } = {},
): SectorWrite[] {
  const sectorSize = options.sectorSize ?? 512;
  const fill = options.fill ?? ((_pick: P, start: number, end: number) => randomBytes(end - start));
  const sectors = Math.ceil(size / sectorSize);
  return picks.map((pick) => {
    const sector = pick.at % sectors;
    const start = sector * sectorSize;
    return { sector, data: fill(pick, start, Math.min(size, (sector + pick.count) * sectorSize)) };
  });
}

/** The disk a guest sees: the backing with the writes laid over it, in order. */
export function mergedDisk(backing: Uint8Array, writes: SectorWrite[], sectorSize = 512): Buffer {
  const disk = Buffer.from(backing);
  for (const { sector, data } of writes) disk.set(data, sector * sectorSize);
  return disk;
}
