/**
 * Test fixtures for commit, check and rebase: COW files of every layout with chosen extents and
 * random contents (built with the project's serializers and geometry), the merged image they must
 * give, a lock held by another process, a file system that fails or dies after N writes, and
 * snapshots that prove a refusal changed nothing.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type CowGeometry, computeGeometry } from '../../src/format/geometry.js';
import {
  type CowHeader,
  type HeaderLayout,
  parseHeader,
  serializeLayout,
} from '../../src/format/header.js';
import { SectorBitmap } from '../../src/format/bitmap.js';
import { seededRandom } from './cow-writes.js';

export { seededRandom };

export function randomBytes(random: () => number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = Math.floor(random() * 256);
  return bytes;
}

export interface SectorRange {
  start: number;
  end: number;
}

export interface CowSpec {
  layout?: HeaderLayout;
  /** Virtual disk size in bytes (need not be a multiple of the sector size). */
  size: number;
  sectorSize?: number;
  alignment?: number;
  /** Sectors whose bits get set and whose data is written into the COW. */
  extents?: SectorRange[];
  seed?: number;
  /** Backing-file byte ranges left all zero (to produce holes in merged images). */
  zeroBacking?: Array<{ start: number; end: number }>;
  /** COW sectors (within extents) whose new data is all zeros. */
  zeroCowSectors?: number[];
  /** Backing mtime in seconds, stored in the header too. */
  mtime?: number;
  /** Names inside the folder. */
  cowName?: string;
  backingName?: string;
}

export interface BuiltCow {
  cowPath: string;
  backingPath: string;
  header: CowHeader;
  geometry: CowGeometry;
  backing: Uint8Array;
  /** The disk as UML sees it: COW data where a bit is set, backing data elsewhere. */
  expected: Uint8Array;
}

export const FIXTURE_MTIME = 1_600_000_000;

/**
 * Writes a backing file and a COW file over it in `dir`. Unallocated sectors of the COW's data
 * area hold garbage (0xEE), so a merge that reads them where the bit is clear is caught.
 */
export function buildCow(dir: string, spec: CowSpec): BuiltCow {
  const random = seededRandom(spec.seed ?? 1);
  const sectorSize = spec.sectorSize ?? 512;
  const mtime = spec.mtime ?? FIXTURE_MTIME;
  const backingPath = path.join(dir, spec.backingName ?? 'base.img');
  const cowPath = path.join(dir, spec.cowName ?? 'vm.cow');
  const backing = randomBytes(random, spec.size);
  for (const zero of spec.zeroBacking ?? []) backing.fill(0, zero.start, Math.min(zero.end, spec.size));
  fs.writeFileSync(backingPath, backing);
  fs.utimesSync(backingPath, mtime, mtime);

  const headerBytes = serializeLayout(spec.layout ?? 'v3', {
    backingFile: backingPath,
    mtime,
    size: spec.size,
    sectorSize,
    alignment: spec.alignment ?? 4096,
  });
  const { header } = parseHeader(headerBytes);
  const geometry = computeGeometry(header);
  const bitmap = SectorBitmap.empty(geometry.bitmapLength * 8);
  const expected = backing.slice();
  const fd = fs.openSync(cowPath, 'w');
  try {
    fs.writeSync(fd, headerBytes, 0, headerBytes.length, 0);
    fs.ftruncateSync(fd, geometry.fileLength);
    const garbage = new Uint8Array(sectorSize).fill(0xee);
    for (let sector = 0; sector < geometry.sectors; sector += 7) {
      const length = Math.min(sectorSize, spec.size - sector * sectorSize);
      fs.writeSync(fd, garbage, 0, length, geometry.dataOffset + sector * sectorSize);
    }
    const zeroSectors = new Set(spec.zeroCowSectors ?? []);
    for (const extent of spec.extents ?? []) {
      const end = Math.min(extent.end, geometry.coveredSectors);
      for (let sector = extent.start; sector < end; sector++) {
        const offset = sector * sectorSize;
        const length = Math.min(sectorSize, spec.size - offset);
        const data = zeroSectors.has(sector) ? new Uint8Array(length) : randomBytes(random, length);
        fs.writeSync(fd, data, 0, length, geometry.dataOffset + offset);
        expected.set(data, offset);
        bitmap.set(sector);
      }
    }
    fs.writeSync(fd, bitmap.bytes, 0, geometry.bitmapLength, geometry.bitmapOffset);
  } finally {
    fs.closeSync(fd);
  }
  return { cowPath, backingPath, header, geometry, backing, expected };
}

/** Bits set in a COW file's bitmap (read straight from the file). */
export function countSetBits(cowPath: string, geometry: CowGeometry): number {
  const bytes = readRange(cowPath, geometry.bitmapOffset, geometry.bitmapLength);
  let count = 0;
  for (const byte of bytes) for (let bit = 0; bit < 8; bit++) count += (byte >> bit) & 1;
  return count;
}

export function readRange(file: string, position: number, length: number): Uint8Array {
  const fd = fs.openSync(file, 'r');
  try {
    const bytes = new Uint8Array(length);
    const got = fs.readSync(fd, bytes, 0, length, position);
    return bytes.subarray(0, got);
  } finally {
    fs.closeSync(fd);
  }
}

export function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

export interface FileSnapshot {
  hash: string;
  mtimeMs: number;
  size: number;
}

/** Content hash, mtime and size of each file, and the folder's listing (to catch stray temp files). */
export function snapshot(dir: string, files: string[]): { files: Record<string, FileSnapshot | null>; listing: string[] } {
  const result: Record<string, FileSnapshot | null> = {};
  for (const file of files) {
    if (!fs.existsSync(file)) {
      result[file] = null;
      continue;
    }
    const stat = fs.statSync(file);
    result[file] = { hash: sha256(file), mtimeMs: stat.mtimeMs, size: stat.size };
  }
  return { files: result, listing: fs.readdirSync(dir).sort() };
}

/** Bytes a file occupies on disk. */
export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

export interface LockHolder {
  child: ChildProcess;
  release(): Promise<void>;
}

/**
 * Another process holding a POSIX write lock on the whole file, taken with fcntl(F_SETLK) the way
 * the UML kernel does (python's lockf), independent of the fcntl binding under test.
 */
export async function holdLockInChild(file: string): Promise<LockHolder> {
  const script = [
    'import fcntl, sys',
    "f = open(sys.argv[1], 'r+b')",
    'fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)',
    "print('locked', flush=True)",
    'sys.stdin.read()',
  ].join('\n');
  const child = spawn('python3', ['-c', script, file], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => (stderr += chunk));
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('locked')) resolve();
    });
    child.on('exit', (code) => reject(new Error(`lock holder exited with ${code}: ${stderr}`)));
    child.on('error', reject);
  });
  return {
    child,
    release: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.on('exit', () => resolve());
        child.stdin.end();
      }),
  };
}

/** Locks /proc/locks shows on a file, as "POSIX ADVISORY WRITE pid". */
export function procLocksFor(file: string): string[] {
  const inode = fs.statSync(file).ino;
  return fs
    .readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((line) => {
      const device = line.trim().split(/\s+/)[5];
      return device !== undefined && device.split(':')[2] === String(inode);
    });
}
