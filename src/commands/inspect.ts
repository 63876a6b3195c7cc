import type { CowGeometry } from '../format/geometry.js';
import type { CowHeader, HeaderLayout } from '../format/header.js';
import type { FileSystem } from '../io/file/index.js';
import { describeBitmapOverlap, describeHangingDisk } from '../format/kernel-traps.js';
import { allocatedExtents } from '../io/bitmap/index.js';
import { type BackingReport, checkBacking, isoTime, openImage } from '../io/image/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface InspectOptions {
  /** Check this backing file instead of the one the header names. */
  backing?: string;
  fs?: FileSystem;
}

/** What `ubdcow inspect --json` prints; field names are part of the public interface. */
export interface InspectReport {
  file: string;
  version: 1 | 2 | 3;
  layout: HeaderLayout;
  byteOrder: 'big-endian' | 'little-endian';
  backingFile: string;
  mtime: number;
  mtimeIso: string;
  size: number;
  sectorSize: number;
  alignment: number;
  cowFormat: number;
  headerSize: number;
  bitmapOffset: number;
  bitmapLength: number;
  dataOffset: number;
  sectors: number;
  /** Sectors with a bit in the bitmap (fewer than `sectors` only in V1/V2 files). */
  coveredSectors: number;
  allocated: { sectors: number; bytes: number; percent: number };
  extents: number;
  /** Apparent length of the COW file, and the length its header implies. */
  fileSize: number;
  expectedFileSize: number;
  /** Bytes the COW file occupies on disk (it is sparse). */
  diskUsage: number;
  /** The file ends before the data area does: reads there would be wrong, not zeros. */
  truncated: boolean;
  backing: BackingReport;
  warnings: string[];
}

/** The header and geometry as `inspect --json` names them (also what `create --json` prints). */
export function layoutFields(header: CowHeader, geometry: CowGeometry) {
  return {
    version: header.version,
    layout: header.layout,
    byteOrder: header.littleEndian ? ('little-endian' as const) : ('big-endian' as const),
    backingFile: header.backingFile,
    mtime: header.mtime,
    mtimeIso: isoTime(header.mtime),
    size: header.size,
    sectorSize: header.sectorSize,
    alignment: header.alignment,
    cowFormat: header.cowFormat,
    headerSize: geometry.headerSize,
    bitmapOffset: geometry.bitmapOffset,
    bitmapLength: geometry.bitmapLength,
    dataOffset: geometry.dataOffset,
    sectors: geometry.sectors,
    coveredSectors: geometry.coveredSectors,
  };
}

const inspectCowOptionKeys: OptionKeys<InspectOptions> = { backing: true, fs: true };

export async function inspectCow(cowPath: string, options: InspectOptions = {}): Promise<InspectReport> {
  checkOptions('inspectCow', options, inspectCowOptionKeys);
  const image = await openImage(cowPath, { fs: options.fs });
  try {
    const { header, geometry } = image;
    let allocatedSectors = 0;
    let extents = 0;
    let lastSectorAllocated = false;
    for await (const extent of allocatedExtents(image)) {
      allocatedSectors += extent.end - extent.start;
      extents++;
      lastSectorAllocated = extent.end === geometry.sectors;
    }
    const backing = await checkBacking(header, options.backing, options.fs);
    // A partial last sector holds only the bytes the disk has.
    const lastSectorShortfall = lastSectorAllocated ? geometry.sectors * header.sectorSize - header.size : 0;
    const allocatedBytes = allocatedSectors * header.sectorSize - lastSectorShortfall;
    const warnings = [...image.warnings];
    // Issue 15 items 6 and 7: what the UML kernel would do wrong with this file.
    for (const trap of [describeBitmapOverlap(geometry, header.alignment), describeHangingDisk(geometry)]) if (trap) warnings.push(trap);
    if (image.dataAreaTruncated) {
      warnings.push(`file is ${image.fileSize} bytes, its data area needs ${geometry.fileLength}: truncated`);
    }
    return {
      file: cowPath,
      ...layoutFields(header, geometry),
      allocated: {
        sectors: allocatedSectors,
        bytes: allocatedBytes,
        percent: header.size === 0 ? 0 : Math.round((allocatedBytes / header.size) * 10000) / 100,
      },
      extents,
      fileSize: image.fileSize,
      expectedFileSize: geometry.fileLength,
      diskUsage: image.allocatedBytes,
      truncated: image.dataAreaTruncated,
      backing,
      warnings,
    };
  } finally {
    await image.handle.close();
  }
}
