/**
 * `ubdcow cat` (the virtual disk) and `ubdcow read` (the engine) are one read stack: over a
 * backing file whose size or mtime changed they give the same bytes, the same exit status and
 * the same messages (issue 19 item 1: cat used to warn and print while read refused).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { writeCowSectors } from '../helpers/cow-writes.js';
import { holdLockInChild } from '../helpers/cow-fixtures.js';
import { ensureBuiltCli } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

const SECTOR = 512;
const SIZE = 64 * SECTOR;

describe('ubdcow cat and ubdcow read agree over a changed backing file', () => {
  const tmp = useTempDir();
  const cli = ensureBuiltCli();

  /** A COW over a 64-sector backing with sectors 60-63 (the tail) written. */
  async function fixture(name: string) {
    const dir = path.join(tmp.path, name);
    fs.mkdirSync(dir);
    const backingFile = path.join(dir, 'base.img');
    const backing = randomBytes(SIZE);
    fs.writeFileSync(backingFile, backing);
    const cowFile = path.join(dir, 'vm.cow');
    await createCow(cowFile, backingFile);
    const tail = randomBytes(4 * SECTOR);
    await writeCowSectors(cowFile, [{ sector: 60, data: tail }]);
    const merged = Buffer.concat([backing.subarray(0, 60 * SECTOR), tail]);
    return { backingFile, cowFile, merged };
  }

  function resize(file: string, length: number): void {
    const { atime, mtime } = fs.statSync(file);
    fs.truncateSync(file, length);
    fs.utimesSync(file, atime, mtime);
  }

  function both(cowFile: string, extra: string[] = []) {
    const runOf = (command: 'cat' | 'read') => {
      const result = spawnSync('node', [cli, command, cowFile, ...extra], { maxBuffer: 1 << 26 });
      const stderr = String(result.stderr).replaceAll(`ubdcow ${command}: `, 'ubdcow X: ');
      return { status: result.status, stdout: Buffer.from(result.stdout), stderr };
    };
    return { cat: runOf('cat'), read: runOf('read') };
  }

  it('a longer backing file: both warn and print the disk', async () => {
    const { backingFile, cowFile, merged } = await fixture('longer');
    resize(backingFile, SIZE + SECTOR);
    const { cat, read } = both(cowFile);
    expect(read.status, read.stderr).toBe(0);
    expect(cat.status, cat.stderr).toBe(0);
    expect(read.stdout.equals(merged)).toBe(true);
    expect(cat.stdout.equals(merged)).toBe(true);
    expect(read.stderr).toMatch(/^ubdcow X: warning: .*vm\.cow: .*base\.img: backing size is 33280 bytes, header says 32768 \(the kernel would refuse it\)\n$/);
    expect(cat.stderr).toBe(read.stderr);
  });

  it('a shorter backing file: both read what it and the COW supply, and both fail as truncated where it ends', async () => {
    const { backingFile, cowFile, merged } = await fixture('shorter');
    // Sectors 58-59 are the backing's and gone; 60-63 live in the COW.
    resize(backingFile, 58 * SECTOR);
    const whole = both(cowFile);
    expect(whole.read.status).toBe(1);
    expect(whole.cat.status).toBe(1);
    expect(whole.read.stderr).toMatch(/warning: .*backing size is 29696 bytes, header says 32768[^\n]*\nubdcow X: .*base\.img: file length is 29696, expected at least 30720 bytes \(the backing file of .*vm\.cow\)\n$/);
    expect(whole.cat.stderr).toBe(whole.read.stderr);
    expect(whole.cat.stdout.equals(whole.read.stdout)).toBe(true);
    // Ranges the files can supply read the same through both.
    for (const range of [['--length', String(58 * SECTOR)], ['--offset', String(60 * SECTOR)]]) {
      const { cat, read } = both(cowFile, range);
      expect(read.status, read.stderr).toBe(0);
      expect(cat.status, cat.stderr).toBe(0);
      expect(cat.stdout.equals(read.stdout)).toBe(true);
      const offset = range[0] === '--offset' ? Number(range[1]) : 0;
      expect(read.stdout.equals(merged.subarray(offset, offset + read.stdout.length))).toBe(true);
      expect(read.stdout.length).toBe(range[0] === '--offset' ? 4 * SECTOR : 58 * SECTOR);
      expect(cat.stderr).toBe(read.stderr);
    }
  });

  it('a touched backing file: both warn naming the fix and print the disk', async () => {
    const { backingFile, cowFile, merged } = await fixture('touched');
    fs.utimesSync(backingFile, 2_000_000, 2_000_000);
    const { cat, read } = both(cowFile);
    expect(read.status, read.stderr).toBe(0);
    expect(cat.status, cat.stderr).toBe(0);
    expect(read.stdout.equals(merged)).toBe(true);
    expect(cat.stdout.equals(merged)).toBe(true);
    expect(read.stderr).toMatch(/^ubdcow X: warning: .*backing mtime is 2000000 .*the kernel would refuse it; .*"ubdcow rebase .*vm\.cow .*--compare" records its mtime.*\n$/);
    expect(cat.stderr).toBe(read.stderr);
  });

  it('a COW another process holds (as a running UML does): both refuse it with one line, while map, which reads only the bitmap, answers', async () => {
    const { cowFile } = await fixture('held');
    const holder = await holdLockInChild(cowFile);
    try {
      const { cat, read } = both(cowFile);
      for (const result of [cat, read]) {
        expect(result.status).toBe(1);
        expect(result.stdout.length).toBe(0);
        expect(result.stderr).toMatch(/^ubdcow X: .*vm\.cow: in use by another process: held by python3 \(pid \d+\); .*see \/proc\/locks\n$/);
      }
      expect(cat.stderr).toBe(read.stderr);
      const map = spawnSync('node', [cli, 'map', cowFile, '--json'], { encoding: 'utf8' });
      expect(map.status, map.stderr).toBe(0);
      expect(JSON.parse(map.stdout).extents).toEqual([{ offset: 60 * SECTOR, length: 4 * SECTOR, cowOffset: expect.any(Number) }]);
    } finally {
      await holder.release();
    }
  });
});
