/**
 * kill -9 at random moments during `sparsify` and `rebase --rewrite` (issue 22): the real CLI on a
 * COW large enough to take a while, SIGKILLed after a random delay, several times. Afterwards
 * `ubdcow check` passes and `ubdcow cat` gives the disk as it was: sparsify (a) never changes the
 * guest's bytes at any point, and a rewritten COW is either the old file or the new one, which both
 * read as the same disk (the header names the old base or the new one, never a mix).
 */
import { spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openImage } from '../../src/io/image/image.js';
import { ubdcow, ubdcowToFile } from '../uml/harness.js';
import { seededRandom } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli } from '../helpers/tools.js';

const MiB = 1 << 20;
const MTIME = 1_600_000_000;
const ROUNDS = 5;

/** A COW over a random base: `runs` 1 MiB runs, every other one equal to the base. */
async function bigCow(dir: string, diskBytes: number, runs: number, seed: number): Promise<{ cow: string; base: string }> {
  const base = path.join(dir, 'base.img');
  const data = randomFillSync(Buffer.alloc(diskBytes));
  fs.writeFileSync(base, data);
  fs.utimesSync(base, MTIME, MTIME);
  const cow = path.join(dir, 'vm.cow');
  await createCow(cow, base);
  const image = await openImage(cow);
  const { dataOffset, bitmapOffset } = image.geometry;
  await image.handle.close();
  const fd = fs.openSync(cow, 'r+');
  const random = seededRandom(seed);
  const slots = diskBytes / MiB;
  for (let i = 0; i < runs; i++) {
    const slot = Math.floor(random() * slots);
    const chunk = Buffer.from(data.subarray(slot * MiB, (slot + 1) * MiB));
    if (i % 2 === 0) for (let p = 0; p < MiB; p += 8192) chunk[p + 17] ^= 0x5a;
    fs.writeSync(fd, chunk, 0, chunk.length, dataOffset + slot * MiB);
    fs.writeSync(fd, Buffer.alloc(MiB / 512 / 8, 0xff), 0, MiB / 4096, bitmapOffset + (slot * MiB) / 4096);
  }
  fs.closeSync(fd);
  return { cow, base };
}

async function diskDigest(cow: string, dir: string): Promise<string> {
  const out = path.join(dir, 'cat.out');
  const result = await ubdcowToFile(['cat', cow], out);
  expect(result.status, result.stderr).toBe(0);
  const digest = createHash('sha256').update(fs.readFileSync(out)).digest('hex');
  fs.rmSync(out);
  return digest;
}

/** Runs the CLI and SIGKILLs it after `delayMs` (unless it ended first); resolves whether it was killed. */
function runAndKill(args: string[], delayMs: number): Promise<boolean> {
  const child = spawn(process.execPath, [ensureBuiltCli(), ...args], { stdio: 'ignore' });
  const timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
  return new Promise((resolve) => {
    child.on('close', (_code, signal) => {
      clearTimeout(timer);
      resolve(signal === 'SIGKILL');
    });
  });
}

describe('kill -9 during sparsify and rebase --rewrite', () => {
  const tmp = useTempDir();

  it(`sparsify --no-fs killed at ${ROUNDS} random moments: check passes, the disk reads as before`, async () => {
    const { cow } = await bigCow(tmp.path, 256 * MiB, 160, 1);
    const pristine = path.join(tmp.path, 'pristine.cow');
    fs.copyFileSync(cow, pristine);
    const before = await diskDigest(cow, tmp.path);
    const random = seededRandom(Date.now() & 0xffff);
    let killed = 0;
    for (let round = 0; round < ROUNDS; round++) {
      fs.copyFileSync(pristine, cow);
      if (await runAndKill(['sparsify', '--no-fs', cow], 250 + Math.floor(random() * 900))) killed++;
      const check = await ubdcow(['check', cow]);
      expect(check.status, check.stdout + check.stderr).toBe(0);
      expect(await diskDigest(cow, tmp.path)).toBe(before);
    }
    // A finished run afterwards still leaves the same disk.
    const done = await ubdcow(['sparsify', '--no-fs', cow]);
    expect(done.status, done.stderr).toBe(0);
    expect(await diskDigest(cow, tmp.path)).toBe(before);
    console.log(`sparsify: ${killed} of ${ROUNDS} runs killed mid-way`);
  }, 240_000);

  it(`rebase --rewrite killed at ${ROUNDS} random moments: the COW is the old one or the new one, same disk`, async () => {
    const { cow, base } = await bigCow(tmp.path, 256 * MiB, 60, 2);
    const newBase = path.join(tmp.path, 'new.img');
    const newBytes = fs.readFileSync(base);
    for (let at = 0; at < newBytes.length; at += 20 * 64 * 1024) randomFillSync(newBytes, at, 64 * 1024);
    fs.writeFileSync(newBase, newBytes);
    const pristine = path.join(tmp.path, 'pristine.cow');
    fs.copyFileSync(cow, pristine);
    const before = await diskDigest(cow, tmp.path);
    const random = seededRandom((Date.now() >> 3) & 0xffff);
    const seen = new Set<string>();
    let killed = 0;
    for (let round = 0; round < ROUNDS; round++) {
      fs.copyFileSync(pristine, cow);
      if (await runAndKill(['rebase', '--rewrite', cow, newBase], 250 + Math.floor(random() * 4000))) killed++;
      const check = await ubdcow(['check', cow]);
      expect(check.status, check.stdout + check.stderr).toBe(0);
      const header = JSON.parse((await ubdcow(['inspect', '--json', cow])).stdout) as { backingFile: string };
      expect([fs.realpathSync(base), fs.realpathSync(newBase)]).toContain(header.backingFile);
      seen.add(header.backingFile);
      expect(await diskDigest(cow, tmp.path)).toBe(before);
    }
    // A re-run after a kill finishes the job (and sweeps the killed run's temporary file).
    const done = await ubdcow(['rebase', '--rewrite', cow, newBase]);
    expect(done.status, done.stderr).toBe(0);
    expect(await diskDigest(cow, tmp.path)).toBe(before);
    expect(fs.readdirSync(tmp.path).filter((name) => name.endsWith('.tmp'))).toEqual([]);
    console.log(`rebase --rewrite: ${killed} of ${ROUNDS} runs killed mid-way; headers seen: ${[...seen].join(', ')}`);
  }, 240_000);
});
