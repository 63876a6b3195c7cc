import { COW } from './engine-setup.js';
import type { MemoryFileSystem } from './memory-fs.js';

export interface CowLayout {
  bitmapOffset: number;
  bitmapLength: number;
  dataOffset: number;
  sectorSize: number;
  size: number;
  /** Sectors per allocation unit: when given, every bitmap state on disk must hold only whole units. */
  unitSectors?: number;
}

/**
 * Watches the COW file's I/O and records violations of the engine's rules:
 * - never two overlapping bitmap writes in flight;
 * - never a bit written to disk before its sector's data write completed;
 * - never a bitmap slice modified while its write is in flight;
 * - with `unitSectors`, never a bitmap on disk (after any completed write, so in every crash state)
 *   with a unit partly allocated.
 */
export function watchInvariants(fs: MemoryFileSystem, layout: CowLayout): string[] {
  const violations: string[] = [];
  const sectors = Math.ceil(layout.size / layout.sectorSize);
  const dataWritten = new Uint8Array(sectors);
  const bitmapEnd = layout.bitmapOffset + layout.bitmapLength;
  const inBitmap = (position: number) => position >= layout.bitmapOffset && position < bitmapEnd;
  const onDiskBit = (sector: number) => {
    const byte = new Uint8Array(1);
    fs.readAt(COW, byte, 0, 1, layout.bitmapOffset + (sector >> 3));
    return (byte[0] & (1 << (sector & 7))) !== 0;
  };
  /** The bitmap as it is once `bytes` land at `position`: each unit they touch wholly set or clear. */
  const checkWholeUnits = (position: number, bytes: Uint8Array, unitSectors: number) => {
    const byteOf = (sector: number) => {
      const at = layout.bitmapOffset + (sector >> 3) - position;
      return at >= 0 && at < bytes.length ? bytes[at] : (onDiskBit(sector) ? 0xff : 0) & (1 << (sector & 7));
    };
    const bit = (sector: number) => (byteOf(sector) & (1 << (sector & 7))) !== 0;
    const firstSector = (position - layout.bitmapOffset) * 8;
    const endSector = Math.min(sectors, firstSector + bytes.length * 8);
    for (let unit = firstSector - (firstSector % unitSectors); unit < endSector; unit += unitSectors) {
      const unitEnd = Math.min(unit + unitSectors, sectors);
      const set = bit(unit);
      for (let sector = unit + 1; sector < unitEnd; sector++) {
        if (bit(sector) !== set) {
          violations.push(`bitmap write at ${position} leaves unit [${unit}, ${unitEnd}) partly allocated`);
          return;
        }
      }
    }
  };
  fs.observer = {
    onWriteIssued(path, position, bytes, inFlight) {
      if (path !== COW || !inBitmap(position)) return;
      for (const other of inFlight) {
        if (other.path === COW && inBitmap(other.position) && other.position < position + bytes.length && position < other.position + other.length) {
          violations.push(`overlapping bitmap writes in flight: [${position}, +${bytes.length}) and [${other.position}, +${other.length})`);
        }
      }
      const firstSector = (position - layout.bitmapOffset) * 8;
      for (let i = 0; i < bytes.length * 8; i++) {
        const sector = firstSector + i;
        if (sector >= sectors) break;
        if ((bytes[i >> 3] & (1 << (i & 7))) !== 0 && !onDiskBit(sector) && !dataWritten[sector]) {
          violations.push(`bit for sector ${sector} written before its data`);
        }
      }
    },
    onWriteCompleted(path, position, atIssue, now) {
      if (path !== COW) return;
      if (inBitmap(position)) {
        if (atIssue.some((value, i) => value !== now[i])) violations.push(`bitmap bytes at ${position} modified while their write was in flight`);
        if (layout.unitSectors) checkWholeUnits(position, atIssue, layout.unitSectors);
        return;
      }
      if (position >= layout.dataOffset) {
        const first = Math.floor((position - layout.dataOffset) / layout.sectorSize);
        const end = Math.ceil((position - layout.dataOffset + atIssue.length) / layout.sectorSize);
        dataWritten.fill(1, first, end);
      }
    },
  };
  return violations;
}
