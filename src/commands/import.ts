/**
 * `ubdcow import SRC COW BACKING`: the reverse of convert. SRC (any image qemu-img reads) is
 * turned into a sparse raw copy beside COW, compared with BACKING a sector at a time, and only
 * the sectors that differ are written into a new COW over BACKING, through the engine. The COW
 * appears under its name only once complete; the raw copy is removed on every path.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../errors.js';
import { openCow } from '../io/engine.js';
import { sectorsPerUnit } from '../io/allocation-unit.js';
import { createCow } from './create.js';
import { qemuImageInfo, runToolOk } from './qemu-img.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface ImportOptions {
  /** Replace an existing COW file. */
  force?: boolean;
  /** qemu-img's progress (-p) while reading SRC. */
  progress?: boolean;
  /** Bytes compared and stored at once (default 4096; see OpenCowOptions.allocationUnit). */
  allocationUnit?: number;
}

export interface ImportResult {
  source: string;
  sourceFormat: string;
  cow: string;
  backing: string;
  size: number;
  /** Sectors written into the COW (those where SRC differs from BACKING). */
  sectors: number;
  bytes: number;
}

const CHUNK = 4 << 20;

const importImageOptionKeys: OptionKeys<ImportOptions> = { force: true, progress: true, allocationUnit: true };

export async function importImage(source: string, cowPath: string, backing: string, options: ImportOptions = {}): Promise<ImportResult> {
  checkOptions('importImage', options, importImageOptionKeys);
  const info = await qemuImageInfo(source, 'import');
  const backingSize = await fs.promises.stat(backing).then(
    (s) => s.size,
    (err) => {
      throw fromSystemError(err, backing, 'read backing file');
    },
  );
  if (info.virtualSize !== backingSize) {
    throw new UbdcowError('size-mismatch', `${source}: its disk is ${info.virtualSize} bytes but ${backing} is ${backingSize}; a COW has its backing file's size`, { file: source });
  }
  if (!options.force && fs.existsSync(cowPath)) throw new UbdcowError('exists', `${cowPath}: already exists; use -f to replace it`, { file: cowPath });
  const folder = path.dirname(path.resolve(cowPath));
  const partialCow = path.join(folder, `.${path.basename(cowPath)}.ubdcow-import-${process.pid}`);
  const rawCopy = path.join(folder, `.${path.basename(cowPath)}.ubdcow-import-${process.pid}.raw`);
  try {
    const args = ['convert', '-O', 'raw'];
    if (options.progress) args.push('-p');
    args.push(source, rawCopy);
    await runToolOk('qemu-img', args, 'import', source, { inheritStdout: options.progress });
    const created = await createCow(partialCow, backing, { force: true });
    const sectorSize = created.header.sectorSize;
    const written = await copyDifferences(rawCopy, backing, partialCow, sectorSize, options.allocationUnit);
    try {
      fs.renameSync(partialCow, cowPath);
    } catch (err) {
      throw fromSystemError(err, cowPath, 'move the new COW into place');
    }
    return {
      source,
      sourceFormat: info.format,
      cow: cowPath,
      backing,
      size: backingSize,
      sectors: written.sectors,
      bytes: written.bytes,
    };
  } finally {
    fs.rmSync(rawCopy, { force: true });
    fs.rmSync(partialCow, { force: true });
  }
}

/**
 * Writes into the COW every run of allocation units (4 KiB pages by default) where `raw` differs
 * from `backing`: a page differing in any sector is stored whole, as UML 6.1 needs (docs/nbd.md).
 */
async function copyDifferences(
  raw: string,
  backing: string,
  cowPath: string,
  sectorSize: number,
  allocationUnit: number | undefined,
): Promise<{ sectors: number; bytes: number }> {
  const unit = sectorsPerUnit(cowPath, allocationUnit, sectorSize) * sectorSize;
  const [rawFile, backingFile] = await Promise.all([fs.promises.open(raw, 'r'), fs.promises.open(backing, 'r')]);
  const cow = await openCow(cowPath, { backing, allocationUnit: unit });
  let bytes = 0;
  try {
    const size = cow.size;
    // Chunks of whole units, so no unit is split between two comparisons.
    const chunk = Math.ceil(CHUNK / unit) * unit;
    const a = Buffer.alloc(chunk);
    const b = Buffer.alloc(chunk);
    for (let position = 0; position < size; position += chunk) {
      const length = Math.min(chunk, size - position);
      await Promise.all([readFully(rawFile, a, length, position, raw), readFully(backingFile, b, length, position, backing)]);
      if (a.subarray(0, length).equals(b.subarray(0, length))) continue;
      let runStart = -1;
      for (let at = 0; ; at += unit) {
        const finished = at >= length;
        const differs = !finished && !a.subarray(at, Math.min(at + unit, length)).equals(b.subarray(at, Math.min(at + unit, length)));
        if (differs && runStart < 0) runStart = at;
        if (!differs && runStart >= 0) {
          const runEnd = Math.min(at, length);
          // The engine may keep the buffer until the write resolves: give it its own copy.
          await cow.write(position + runStart, Buffer.from(a.subarray(runStart, runEnd)));
          bytes += runEnd - runStart;
          runStart = -1;
        }
        if (finished) break;
      }
    }
    await cow.flush();
  } finally {
    await cow.close().catch(() => undefined);
    await rawFile.close();
    await backingFile.close();
  }
  return { sectors: Math.ceil(bytes / sectorSize), bytes };
}

async function readFully(file: fs.promises.FileHandle, into: Buffer, length: number, position: number, name: string): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await file.read(into, done, length - done, position + done);
    if (bytesRead === 0) throw new UbdcowError('truncated', `${name}: ends at ${position + done}, expected ${position + length} bytes`, { file: name });
    done += bytesRead;
  }
}
