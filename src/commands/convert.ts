/**
 * `ubdcow convert IMAGE OUT -O FMT [-B BASE]`: qemu-img convert reading the disk from a private,
 * read-only `serve` on a temporary Unix socket. Without -B the export describes the disk as one
 * image (data, or zeros where the backing file is a hole: qemu-img skips those); with -B, qemu-img asks the
 * export for its allocation (base:allocation) and writes only what the COW holds into a qcow2
 * overlay over BASE: ranges reported as holes without the zero flag are left to the backing file.
 * OUT appears only when qemu-img succeeded (written beside it through writeNewFile: synced, then
 * linked, or renamed with -f), and never over IMAGE, its backing file or BASE (by identity).
 */
import * as os from 'node:os';
import * as path from 'node:path';
import {
  type FileSystem,
  nodeFileSystem,
  type ProtectedFile,
  refuseExisting,
  refuseOutputOverInput,
  removeOnSignal,
  writeNewFile,
} from '../io/file/index.js';
import { openImageFile, probeHeader, resolveBackingPath } from '../io/image/index.js';
import { UbdcowError, backingMismatch } from '../errors.js';
import { qemuImageInfo, qemuSizeFits, runToolOk } from './qemu-img.js';
import { serveImage } from './serve.js';
import { type OptionKeys, checkOptions } from '../options.js';

export const CONVERT_FORMATS = ['raw', 'qcow2', 'vmdk', 'vdi', 'vhdx'] as const;
export type ConvertFormat = (typeof CONVERT_FORMATS)[number];

export interface ConvertOptions {
  format: ConvertFormat;
  /** Make OUT a qcow2 overlay over this base holding only what the COW holds. */
  base?: string;
  /** Backing file of IMAGE instead of the one in its header. */
  backing?: string;
  /** qemu-img's progress (-p) on stdout. */
  progress?: boolean;
  force?: boolean;
}

export interface ConvertResult {
  input: string;
  output: string;
  format: ConvertFormat;
  base?: string;
  baseFormat?: string;
  size: number;
  /** From reading IMAGE (e.g. its backing file's mtime moved: read anyway, as every reader does). */
  warnings: string[];
}

/** qemu-img's default qcow2 cluster size: the unit a `-B` overlay allocates. */
const QCOW2_CLUSTER_BYTES = 64 * 1024;

const convertImageOptionKeys: OptionKeys<ConvertOptions> = { format: true, base: true, backing: true, progress: true, force: true };

export async function convertImage(image: string, output: string, options: ConvertOptions): Promise<ConvertResult> {
  checkOptions('convertImage', options, convertImageOptionKeys);
  if (!(CONVERT_FORMATS as readonly string[]).includes(options.format)) {
    throw new UbdcowError('usage', `-O ${options.format}: expected one of ${CONVERT_FORMATS.join(', ')}`);
  }
  if (options.base !== undefined && options.format !== 'qcow2') {
    throw new UbdcowError('usage', `-B ${options.base}: an overlay needs -O qcow2 (got -O ${options.format})`);
  }
  const fs = nodeFileSystem;
  // Before anything is written: OUT may not be a file this conversion reads or IMAGE depends on.
  await refuseOutputOverInput(fs, output, await filesConvertReads(fs, image, options));
  if (!options.force) await refuseExisting(fs, output);
  let baseFormat: string | undefined;
  let baseAbsolute: string | undefined;
  if (options.base !== undefined) {
    baseAbsolute = path.resolve(options.base);
    baseFormat = (await qemuImageInfo(baseAbsolute, 'convert')).format;
  } else {
    // Fails early, with the install hint, when qemu-img is missing.
    await runToolOk('qemu-img', ['--version'], 'convert', 'qemu-img');
  }
  const folder = await fs.makeTempFolder(path.join(os.tmpdir(), 'ubdcow-convert-'));
  const socket = path.join(folder, 'nbd.sock');
  // Ctrl-C or SIGTERM mid-convert leaves no socket folder (writeNewFile takes care of OUT's temporary).
  const keepFolder = removeOnSignal(folder);
  try {
    // Without -B the output is the whole disk, so the export describes it as one image ('merged':
    // data, or zeros where the backing is a hole). The COW's own allocation ('cow') matters only to
    // -B, and a COW of scattered pages reports tens of thousands of extents, each then a separate
    // read and write in qemu-img: 22 s instead of 1 s for a 512 MiB disk with a 4 KiB page every
    // 48 KiB; and an empty COW over a sparse 4 GiB base took 13.7 s instead of 0.2 s.
    const allocation = baseAbsolute === undefined ? 'merged' : 'cow';
    // With -B, qcow2's 64 KiB clusters are the unit qemu-img allocates: whole clusters are cheaper
    // to write than a 4 KiB page and then the rest of its cluster (see ServeOptions.allocationGrain).
    const served = await serveImage(image, { socket, readOnly: true, backing: options.backing, allocation, allocationGrain: allocation === 'cow' ? QCOW2_CLUSTER_BYTES : undefined });
    try {
      if (baseAbsolute !== undefined) await checkBaseSize(fs, options.base ?? baseAbsolute, baseAbsolute, image, served.size);
      const args = ['convert', '-f', 'raw', '-O', options.format];
      if (options.progress) args.push('-p');
      if (baseAbsolute !== undefined) args.push('-B', baseAbsolute, '-F', baseFormat ?? 'raw');
      await writeNewFile(fs, output, options.force ?? false, async (file, temporary) => {
        // qemu-img rewrites the empty temporary in place (same inode), so `file` syncs what it wrote.
        await runToolOk('qemu-img', [...args, `nbd+unix:///?socket=${socket}`, path.resolve(temporary)], 'convert', image, { inheritStdout: options.progress });
        // qemu counts whole 512-byte sectors: its raw image of a disk of another size ends in zeros
        // past the disk. A raw image is the disk, byte for byte.
        if (options.format === 'raw') await file.truncate(served.size);
      });
    } finally {
      await served.close().catch(() => undefined);
    }
    return { input: image, output, format: options.format, base: options.base, baseFormat, size: served.size, warnings: served.warnings };
  } finally {
    await fs.removeTree(folder);
    keepFolder();
  }
}

/** IMAGE, the backing file its header names (and the -b override), and BASE: what OUT may not be. */
async function filesConvertReads(fs: FileSystem, image: string, options: ConvertOptions): Promise<ProtectedFile[]> {
  const files: ProtectedFile[] = [{ file: image, role: 'the image being converted' }];
  const { handle } = await openImageFile(fs, image, 'image');
  try {
    const probe = await probeHeader(handle, image, 'read image');
    if ('parsed' in probe) files.push({ file: resolveBackingPath(probe.parsed.header), role: `the backing file ${image} names` });
  } finally {
    await handle.close().catch(() => undefined);
  }
  if (options.backing !== undefined) files.push({ file: options.backing, role: `the backing file given for ${image} (-b)` });
  if (options.base !== undefined) files.push({ file: options.base, role: 'the base of the overlay (-B)' });
  return files;
}

/**
 * The overlay's base must be the disk's size. A raw base that is a regular file is measured in
 * bytes; other formats by the virtual size qemu-img reports, which for a disk whose size is not
 * a multiple of 512 is that size rounded up (then the overlay's first SIZE bytes are the disk).
 */
async function checkBaseSize(fs: FileSystem, named: string, base: string, image: string, size: number): Promise<void> {
  const info = await qemuImageInfo(base, 'convert');
  const stat = info.format === 'raw' ? await fs.stat(base).catch(() => undefined) : undefined;
  const fits = stat?.kind === 'file' ? stat.size === size : qemuSizeFits(info.virtualSize, size);
  if (!fits) {
    const baseSize = stat?.kind === 'file' ? stat.size : info.virtualSize;
    throw backingMismatch(named, `${named}: is ${baseSize} bytes, but ${image} is ${size}; an overlay needs a base of the disk's size (such as the backing file ${image} was made over)`);
  }
}
