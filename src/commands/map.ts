import type { FileSystem } from '../io/file/index.js';
import { allocatedByteExtents, openVirtualDisk } from '../io/engine/index.js';
import { notACow } from '../errors.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** An allocated extent: virtual disk bytes [offset, offset + length) live at `cowOffset` in the COW file. */
export interface MappedExtent {
  offset: number;
  length: number;
  cowOffset: number;
}

export interface MapResult {
  file: string;
  /** Virtual disk size in bytes. */
  size: number;
  /** Sum of the extents' lengths. */
  allocatedBytes: number;
  extents: MappedExtent[];
}

export interface MapOptions {
  fs?: FileSystem;
}

const mapCowOptionKeys: OptionKeys<MapOptions> = { fs: true };

/**
 * Where a COW's allocated data lives (what `qemu-img map --output=json` tells for its formats):
 * everything not listed reads from the backing file. Streamed from the bitmap; the backing file
 * is not opened.
 */
export async function mapCow(cowPath: string, options: MapOptions = {}): Promise<MapResult> {
  checkOptions('mapCow', options, mapCowOptionKeys);
  const disk = await openVirtualDisk(cowPath, { fs: options.fs, openBacking: false });
  try {
    if (disk.kind !== 'cow') {
      throw notACow(cowPath, '; a raw image has no map');
    }
    const { dataOffset } = disk.cow.geometry;
    const extents: MappedExtent[] = [];
    let allocatedBytes = 0;
    for await (const { start, end } of allocatedByteExtents(disk)) {
      extents.push({ offset: start, length: end - start, cowOffset: dataOffset + start });
      allocatedBytes += end - start;
    }
    return { file: cowPath, size: disk.size, allocatedBytes, extents };
  } finally {
    await disk.close();
  }
}
