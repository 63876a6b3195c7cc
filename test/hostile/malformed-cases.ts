/**
 * Hostile inputs for every command: a small valid COW over a backing file, and the ways it can be
 * damaged or replaced (bad header fields, truncation at each region, things that are not files,
 * a backing file that is missing or changed). Each case says which file the error must name and
 * which words it must contain, and what each command is documented to do with it.
 */
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type BuiltCow, buildCow } from '../helpers/cow-fixtures.js';

/** 256 KiB disk, 512-byte sectors: bitmap 64 bytes at 8192, data area from 12288. */
export const DISK_SIZE = 256 * 1024;
export const BITMAP_OFFSET = 8192;
export const DATA_OFFSET = 12288;
export const SECTORS = DISK_SIZE / 512;
/** Allocated sectors, the last run ending at the end of the disk (so truncation loses data). */
export const EXTENTS = [
  { start: 0, end: 8 },
  { start: 100, end: 140 },
  { start: SECTORS - 16, end: SECTORS },
];
/** What `write` writes (at WRITE_OFFSET): a few bytes spanning a sector boundary. */
export const WRITE_OFFSET = 1000;
export const WRITE_DATA = Buffer.from('hostile input test: these bytes span a sector boundary');

export interface Fixture extends BuiltCow {
  dir: string;
  /** Where `commit COW OUT` writes. */
  out: string;
  /** The data file `write --file` reads. */
  dataFile: string;
}

export function buildFixture(dir: string, seed = 1): Fixture {
  fs.mkdirSync(dir, { recursive: true });
  const built = buildCow(dir, { size: DISK_SIZE, extents: EXTENTS, seed });
  if (built.geometry.bitmapOffset !== BITMAP_OFFSET || built.geometry.dataOffset !== DATA_OFFSET) {
    throw new Error(`fixture geometry changed: ${JSON.stringify(built.geometry)}`);
  }
  const dataFile = path.join(dir, 'data.bin');
  fs.writeFileSync(dataFile, WRITE_DATA);
  return { ...built, dir, out: path.join(dir, 'merged.img'), dataFile };
}

/** Overwrites bytes of a file in place. */
export function patch(file: string, position: number, bytes: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, position);
  } finally {
    fs.closeSync(fd);
  }
}

function u32be(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, false);
  return bytes;
}

function u64be(value: bigint): Uint8Array {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, value, false);
  return bytes;
}

/** Keeps the backing file's mtime when its length changes, so only the size differs. */
function resizeKeepingMtime(file: string, length: number): void {
  const { atime, mtime } = fs.statSync(file);
  fs.truncateSync(file, length);
  fs.utimesSync(file, atime, mtime);
}

/** Replaces a file by something else at the same path. */
function replaceBy(file: string, make: (file: string) => void): void {
  fs.rmSync(file);
  make(file);
}

export type CaseGroup = 'header' | 'data' | 'not-a-file' | 'permission' | 'backing' | 'backing-changed';

export interface MalformedCase {
  name: string;
  /** One line for the report. */
  description: string;
  group: CaseGroup;
  /** The file an error must name. */
  names: 'cow' | 'backing';
  /** The error line must match this (field, value, expectation, or the system's reason). */
  mentions: RegExp;
  damage(fixture: Fixture): void;
}

export const MALFORMED_CASES: MalformedCase[] = [
  {
    name: 'bad-magic',
    description: 'magic overwritten with "JUNK"',
    group: 'header',
    names: 'cow',
    mentions: /magic/i,
    damage: (f) => patch(f.cowPath, 0, Buffer.from('JUNK')),
  },
  {
    name: 'unknown-version',
    description: 'version 7',
    group: 'header',
    names: 'cow',
    mentions: /version is 7, expected 1, 2 or 3/,
    damage: (f) => patch(f.cowPath, 4, u32be(7)),
  },
  {
    name: 'truncated-header',
    description: 'file cut to 100 bytes (inside the header)',
    group: 'header',
    names: 'cow',
    mentions: /header is 100 bytes long, expected at least 4128/,
    damage: (f) => fs.truncateSync(f.cowPath, 100),
  },
  {
    name: 'truncated-header-6',
    description: 'file cut to 6 bytes (magic, half a version)',
    group: 'header',
    names: 'cow',
    mentions: /header is 6 bytes long, expected at least 8/,
    damage: (f) => fs.truncateSync(f.cowPath, 6),
  },
  {
    name: 'truncated-bitmap',
    description: 'file cut inside the bitmap',
    group: 'header',
    names: 'cow',
    mentions: /file length is 8200, expected at least 8256/,
    damage: (f) => fs.truncateSync(f.cowPath, BITMAP_OFFSET + 8),
  },
  {
    name: 'truncated-data',
    description: 'file cut inside the data area, allocated sectors past the end',
    group: 'data',
    names: 'cow',
    mentions: /trunca|ends (early|at)|length/i,
    damage: (f) => fs.truncateSync(f.cowPath, DATA_OFFSET + (SECTORS - 8) * 512),
  },
  {
    name: 'sector-size-0',
    description: 'sectorsize 0',
    group: 'header',
    names: 'cow',
    mentions: /sectorsize is 0, expected a power of two/,
    damage: (f) => patch(f.cowPath, 20, u32be(0)),
  },
  {
    name: 'sector-size-3',
    description: 'sectorsize 3',
    group: 'header',
    names: 'cow',
    mentions: /sectorsize is 3, expected a power of two/,
    damage: (f) => patch(f.cowPath, 20, u32be(3)),
  },
  {
    name: 'sector-size-huge',
    description: 'sectorsize 2^31',
    group: 'header',
    names: 'cow',
    mentions: /sectorsize is 2147483648, expected a power of two/,
    damage: (f) => patch(f.cowPath, 20, u32be(0x80000000)),
  },
  {
    name: 'alignment-0',
    description: 'alignment 0',
    group: 'header',
    names: 'cow',
    mentions: /alignment is 0, expected a non-zero/,
    damage: (f) => patch(f.cowPath, 24, u32be(0)),
  },
  {
    name: 'alignment-huge',
    description: 'alignment 2^31 (bitmap would start past the end of the file)',
    group: 'header',
    names: 'cow',
    mentions: /file length is \d+, expected at least/,
    damage: (f) => patch(f.cowPath, 24, u32be(0x80000000)),
  },
  {
    name: 'cow-format-1',
    description: 'cow_format 1',
    group: 'header',
    names: 'cow',
    mentions: /cow_format is 1, expected 0/,
    damage: (f) => patch(f.cowPath, 28, u32be(1)),
  },
  {
    name: 'size-near-2^64',
    description: 'size 2^64 - 512',
    group: 'header',
    names: 'cow',
    mentions: /size is 18446744073709551104, expected at most/,
    damage: (f) => patch(f.cowPath, 12, u64be(2n ** 64n - 512n)),
  },
  {
    name: 'size-2^53',
    description: 'size 2^53 - 1 (data area would end past 2^53)',
    group: 'header',
    names: 'cow',
    mentions: /size is 9007199254740991, expected a size whose data area ends below 2\^53/,
    damage: (f) => patch(f.cowPath, 12, u64be(2n ** 53n - 1n)),
  },
  {
    name: 'size-2^40',
    description: 'size 1 TiB over a 256 KiB file (bitmap past the end)',
    group: 'header',
    names: 'cow',
    mentions: /file length is \d+, expected at least 268443648 bytes/,
    damage: (f) => patch(f.cowPath, 12, u64be(2n ** 40n)),
  },
  {
    name: 'backing-unterminated',
    description: 'backing path field with no NUL terminator',
    group: 'header',
    names: 'cow',
    mentions: /backing_file is 4096 bytes with no NUL terminator/,
    damage: (f) => patch(f.cowPath, 32, Buffer.alloc(4096, 'a')),
  },
  {
    name: 'empty',
    description: 'empty file',
    group: 'header',
    names: 'cow',
    mentions: /empty/,
    damage: (f) => fs.truncateSync(f.cowPath, 0),
  },
  {
    name: 'directory',
    description: 'a directory where the COW should be',
    group: 'not-a-file',
    names: 'cow',
    mentions: /is a directory/,
    damage: (f) => replaceBy(f.cowPath, (file) => fs.mkdirSync(file)),
  },
  {
    name: 'fifo',
    description: 'a FIFO where the COW should be (opening it would block)',
    group: 'not-a-file',
    names: 'cow',
    mentions: /is a FIFO/,
    damage: (f) => replaceBy(f.cowPath, (file) => execFileSync('mkfifo', [file])),
  },
  {
    name: 'symlink-loop',
    description: 'a symlink that points at itself',
    group: 'not-a-file',
    names: 'cow',
    mentions: /ELOOP/,
    damage: (f) => replaceBy(f.cowPath, (file) => fs.symlinkSync(path.basename(file), file)),
  },
  {
    name: 'unreadable',
    description: 'COW with mode 000, command run as nobody',
    group: 'permission',
    names: 'cow',
    mentions: /permission denied/,
    damage: (f) => fs.chmodSync(f.cowPath, 0o000),
  },
  {
    name: 'backing-missing',
    description: 'backing file removed',
    group: 'backing',
    names: 'backing',
    mentions: /no such file/,
    damage: (f) => fs.rmSync(f.backingPath),
  },
  {
    name: 'backing-directory',
    description: 'a directory where the backing file should be',
    group: 'backing',
    names: 'backing',
    mentions: /directory/,
    damage: (f) => replaceBy(f.backingPath, (file) => fs.mkdirSync(file)),
  },
  {
    name: 'backing-fifo',
    description: 'a FIFO where the backing file should be (opening it would block)',
    group: 'backing',
    names: 'backing',
    mentions: /fifo/,
    damage: (f) => replaceBy(f.backingPath, (file) => execFileSync('mkfifo', [file])),
  },
  {
    name: 'backing-shorter',
    description: 'backing file one sector shorter (same mtime)',
    group: 'backing-changed',
    names: 'backing',
    mentions: /size|bytes/,
    damage: (f) => resizeKeepingMtime(f.backingPath, DISK_SIZE - 512),
  },
  {
    name: 'backing-longer',
    description: 'backing file one sector longer (same mtime)',
    group: 'backing-changed',
    names: 'backing',
    mentions: /size|bytes/,
    damage: (f) => resizeKeepingMtime(f.backingPath, DISK_SIZE + 512),
  },
  {
    name: 'backing-mtime',
    description: 'backing file touched (mtime changed, same size)',
    group: 'backing-changed',
    names: 'backing',
    mentions: /mtime/,
    damage: (f) => fs.utimesSync(f.backingPath, f.header.mtime + 100, f.header.mtime + 100),
  },
];

export interface FileState {
  kind: string;
  size?: number;
  mtimeMs?: number;
  mode?: number;
  hash?: string;
}

/** Kind, size, mtime, mode and content hash of every entry of a folder (FIFOs are never opened). */
export function folderState(dir: string): Record<string, FileState> {
  const state: Record<string, FileState> = {};
  for (const name of fs.readdirSync(dir).sort()) {
    const full = path.join(dir, name);
    const stat = fs.lstatSync(full);
    if (stat.isFile()) {
      const readable = (stat.mode & 0o444) !== 0;
      state[name] = {
        kind: 'file',
        size: stat.size,
        mtimeMs: stat.mtimeMs,
        mode: stat.mode,
        hash: readable ? createHash('sha256').update(fs.readFileSync(full)).digest('hex') : undefined,
      };
    } else {
      state[name] = { kind: stat.isDirectory() ? 'directory' : stat.isFIFO() ? 'fifo' : stat.isSymbolicLink() ? 'symlink' : 'other', mtimeMs: stat.mtimeMs, mode: stat.mode };
    }
  }
  return state;
}

/** What changed between two folder states, one line per file ('' when nothing did). */
export function describeChanges(before: Record<string, FileState>, after: Record<string, FileState>): string {
  const lines: string[] = [];
  for (const name of new Set([...Object.keys(before), ...Object.keys(after)])) {
    const a = before[name];
    const b = after[name];
    if (!a) lines.push(`${name}: appeared`);
    else if (!b) lines.push(`${name}: disappeared`);
    else if (JSON.stringify(a) !== JSON.stringify(b)) lines.push(`${name}: ${JSON.stringify(a)} -> ${JSON.stringify(b)}`);
  }
  return lines.join('\n');
}
