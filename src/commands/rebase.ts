import { UbdcowError, backingMismatch, fromSystemError } from '../errors.js';
import {
  backingMismatches,
  imageSize,
  probeReadable,
  resolveBackingPath,
  rewriteHeader,
  statImageFile,
  withImage,
} from '../io/image/index.js';
import { interruptedCommitError, readCommitJournal } from '../io/journal/index.js';
import { type FileHandleLike, type FileSystem, nodeFileSystem } from '../io/file/index.js';
import { absoluteBackingPath } from './create.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface RebaseOptions {
  /** Accept a new backing whose mtime differs (and a failed --compare): the user vouches for it. */
  unsafe?: boolean;
  /**
   * Also compare the old and new backing files' contents, when both exist; equal contents accept
   * a new backing whose mtime differs (a plain `cp` of the base).
   */
  compare?: boolean;
  fs?: FileSystem;
}

export interface RebaseResult {
  file: string;
  /** The path the header named before. */
  oldBacking: string;
  /** The absolute path now stored in the header. */
  newBacking: string;
  /** False when --unsafe let an mtime mismatch through. */
  checked: boolean;
  /** Mismatches --unsafe (or an equal --compare) accepted. */
  overridden: string[];
  /** The mtime now in the header: the new backing's, so UML's mtime check passes. */
  mtime: number;
  /** Present when --compare was asked for. */
  comparison?: { compared: boolean; equal?: boolean; firstDifference?: number; reason?: string };
}

const rebaseCowOptionKeys: OptionKeys<RebaseOptions> = { unsafe: true, compare: true, fs: true };

/**
 * Points a COW file at a moved or copied backing file, after checking that its size and mtime are
 * what the header recorded (the kernel's "Switching backing file" check). A new backing with
 * another mtime (a copy) is accepted when --compare finds the contents equal or --unsafe vouches
 * for it, and its mtime is then stored, so UML opens the COW. A new backing of another size is
 * always refused: the size fixes the COW's layout, and UML refuses a size mismatch.
 */
export async function rebaseCow(cowPath: string, newBacking: string, options: RebaseOptions = {}): Promise<RebaseResult> {
  checkOptions('rebaseCow', options, rebaseCowOptionKeys);
  const fs = options.fs ?? nodeFileSystem;
  return withImage(cowPath, { fs, mode: 'r+', lock: 'write' }, async (image) => {
    const { header } = image;
    if (!options.unsafe && (await readCommitJournal(fs, cowPath))) throw interruptedCommitError(cowPath, ' first');
    const stat = await statImageFile(fs, newBacking, 'backing file');
    const size = await imageSize(stat, newBacking, 'backing file');
    const found = backingMismatches(newBacking, header, { size, mtime: stat.mtime });
    const sizeMismatch = found.find((m) => m.state === 'size-mismatch');
    if (sizeMismatch) {
      throw backingMismatch(newBacking, `${sizeMismatch.problem}; not the same backing file, and a COW cannot be re-pointed at a disk of another size (UML refuses it)`);
    }
    const mismatches = found.map((m) => m.problem);
    if (mismatches.length > 0 && !options.unsafe && !options.compare) {
      throw backingMismatch(newBacking, `${mismatches[0]}; not the same backing file (use --compare to check the contents, or --unsafe to rebase anyway)`);
    }
    await probeReadable(fs, newBacking, 'backing file');
    const stored = await absoluteBackingPath(newBacking, fs).catch((err) => {
      throw fromSystemError(err, newBacking, 'resolve backing file path');
    });
    let comparison: RebaseResult['comparison'];
    if (options.compare) {
      comparison = await compareBackings(fs, resolveBackingPath(header), newBacking, header.size);
      if (comparison.compared && !comparison.equal && !options.unsafe) {
        throw new UbdcowError(
          'backing-differs',
          `${newBacking}: content differs from ${header.backingFile} at byte ${comparison.firstDifference}; not a copy of the old backing file (use --unsafe to rebase anyway)`,
          { file: newBacking },
        );
      }
      if (!comparison.compared && mismatches.length > 0 && !options.unsafe) {
        throw backingMismatch(newBacking, `${mismatches[0]}, and the contents could not be compared (${comparison.reason}); use --unsafe to rebase anyway`);
      }
    }
    await rewriteHeader(image, { ...header, backingFile: stored, mtime: stat.mtime });
    return {
      file: cowPath,
      oldBacking: header.backingFile,
      newBacking: stored,
      checked: mismatches.length === 0,
      overridden: mismatches,
      mtime: stat.mtime,
      comparison,
    };
  });
}

const COMPARE_CHUNK_BYTES = 4 << 20;

async function compareBackings(
  fs: FileSystem,
  oldPath: string,
  newPath: string,
  size: number,
): Promise<NonNullable<RebaseResult['comparison']>> {
  let oldFile: FileHandleLike;
  try {
    oldFile = await fs.open(oldPath, 'r');
  } catch (err) {
    return { compared: false, reason: fromSystemError(err, oldPath, 'open the old backing file').message };
  }
  try {
    const newFile = await fs.open(newPath, 'r').catch((err) => {
      throw fromSystemError(err, newPath, 'read backing file');
    });
    try {
      const a = Buffer.alloc(COMPARE_CHUNK_BYTES);
      const b = Buffer.alloc(COMPARE_CHUNK_BYTES);
      for (let position = 0; position < size; position += COMPARE_CHUNK_BYTES) {
        const length = Math.min(COMPARE_CHUNK_BYTES, size - position);
        const [gotA, gotB] = await Promise.all([
          oldFile.read(a, 0, length, position),
          newFile.read(b, 0, length, position),
        ]).catch((err) => {
          throw fromSystemError(err, newPath, 'compare backing files');
        });
        const viewA = a.subarray(0, gotA);
        const viewB = b.subarray(0, gotB);
        if (gotA !== gotB || !viewA.equals(viewB)) {
          let at = 0;
          while (at < Math.min(gotA, gotB) && viewA[at] === viewB[at]) at++;
          return { compared: true, equal: false, firstDifference: position + at };
        }
      }
      return { compared: true, equal: true };
    } finally {
      await newFile.close().catch(() => undefined);
    }
  } finally {
    await oldFile.close().catch(() => undefined);
  }
}
