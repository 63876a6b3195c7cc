/**
 * `ubdcow convert IMAGE OUT -O FMT [-B BASE]`: qemu-img convert reading the disk from a private,
 * read-only `serve` on a temporary Unix socket. With -B, qemu-img asks the export for its
 * allocation (base:allocation) and writes only what the COW holds into a qcow2 overlay over BASE:
 * ranges reported as holes without the zero flag are left to the backing file.
 * OUT appears only when qemu-img succeeded (written beside it, then renamed).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { removeOnSignal } from '../io/signal-cleanup.js';
import { UbdcowError, fromSystemError } from '../errors.js';
import { qemuImageInfo, runToolOk } from './qemu-img.js';
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

const convertImageOptionKeys: OptionKeys<ConvertOptions> = { format: true, base: true, backing: true, progress: true, force: true };

export async function convertImage(image: string, output: string, options: ConvertOptions): Promise<ConvertResult> {
  checkOptions('convertImage', options, convertImageOptionKeys);
  if (!(CONVERT_FORMATS as readonly string[]).includes(options.format)) {
    throw new UbdcowError('usage', `-O ${options.format}: expected one of ${CONVERT_FORMATS.join(', ')}`);
  }
  if (options.base !== undefined && options.format !== 'qcow2') {
    throw new UbdcowError('usage', `-B ${options.base}: an overlay needs -O qcow2 (got -O ${options.format})`);
  }
  if (!options.force && fs.existsSync(output)) {
    throw new UbdcowError('exists', `${output}: already exists; use -f to replace it`, { file: output });
  }
  let baseFormat: string | undefined;
  let baseAbsolute: string | undefined;
  if (options.base !== undefined) {
    baseAbsolute = path.resolve(options.base);
    const info = await qemuImageInfo(baseAbsolute, 'convert');
    baseFormat = info.format;
  } else {
    // Fails early, with the install hint, when qemu-img is missing.
    await runToolOk('qemu-img', ['--version'], 'convert', 'qemu-img');
  }
  const folder = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-convert-'));
  const socket = path.join(folder, 'nbd.sock');
  const partial = path.join(path.dirname(path.resolve(output)), `.${path.basename(output)}.ubdcow-partial-${process.pid}`);
  // Ctrl-C or SIGTERM mid-convert leaves neither the half-written image nor the socket's folder.
  const keepFolder = removeOnSignal(folder);
  const keepPartial = removeOnSignal(partial);
  const served = await serveImage(image, { socket, readOnly: true, backing: options.backing }).catch((err) => {
    fs.rmSync(folder, { recursive: true, force: true });
    keepFolder();
    keepPartial();
    throw err;
  });
  try {
    if (baseAbsolute !== undefined) {
      const info = await qemuImageInfo(baseAbsolute, 'convert');
      if (info.virtualSize !== served.size) {
        throw new UbdcowError('size-mismatch', `${options.base}: is ${info.virtualSize} bytes, but ${image} is ${served.size}; an overlay needs a base of the same size`, { file: options.base });
      }
    }
    const args = ['convert', '-f', 'raw', '-O', options.format];
    if (options.progress) args.push('-p');
    if (baseAbsolute !== undefined) args.push('-B', baseAbsolute, '-F', baseFormat ?? 'raw');
    args.push(`nbd+unix:///?socket=${socket}`, partial);
    await runToolOk('qemu-img', args, 'convert', image, { inheritStdout: options.progress });
    try {
      fs.renameSync(partial, output);
    } catch (err) {
      throw fromSystemError(err, output, 'move the converted image into place');
    }
  } finally {
    await served.close().catch(() => undefined);
    fs.rmSync(partial, { force: true });
    fs.rmSync(folder, { recursive: true, force: true });
    keepPartial();
    keepFolder();
  }
  return { input: image, output, format: options.format, base: options.base, baseFormat, size: served.size, warnings: served.warnings };
}
