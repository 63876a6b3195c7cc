import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createCow } from '../../src/commands/create.js';
import { catImage } from '../../src/commands/cat.js';
import { type SectorWrite, writeCowSectors } from '../helpers/cow-writes.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { type SectorPick, mergedDisk, pickedWrites } from '../helpers/sector-writes.js';

const SECTOR = 512;

async function collect(chunks: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of chunks) parts.push(Buffer.from(chunk));
  return Buffer.concat(parts);
}

function randomWrites(size: number, picks: Array<SectorPick & { zero?: boolean }>): SectorWrite[] {
  return pickedWrites(size, picks, { fill: (pick, start, end) => (pick.zero ? Buffer.alloc(end - start) : randomBytes(end - start)) });
}

const md5 = (bytes: Uint8Array) => createHash('md5').update(bytes).digest('hex');

describe('catImage', () => {
  const tmp = useTempDir('file');
  let caseNumber = 0;

  it('yields exactly the merged image, for any offset and length', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 200 * SECTOR + 511 }),
        fc.array(fc.record({ at: fc.nat(), count: fc.integer({ min: 1, max: 30 }) }), { maxLength: 10 }),
        fc.nat(),
        fc.option(fc.nat(), { nil: undefined }),
        fc.constantFrom(509, 1531, 4096, 1 << 20),
        async (size, picks, offsetSeed, lengthSeed, chunkBytes) => {
          const dir = path.join(tmp.path, `case-${caseNumber++}`);
          fs.mkdirSync(dir);
          try {
            const backingFile = path.join(dir, 'base.img');
            const backing = randomBytes(size);
            fs.writeFileSync(backingFile, backing);
            const cowFile = path.join(dir, 'disk.cow');
            await createCow(cowFile, backingFile);
            const writes = randomWrites(size, picks);
            await writeCowSectors(cowFile, writes);
            const expected = mergedDisk(backing, writes);
            expect((await collect(catImage(cowFile, { chunkBytes: Math.max(chunkBytes, 512) }))).equals(expected)).toBe(true);
            const offset = offsetSeed % (size + 1);
            const length = lengthSeed === undefined ? undefined : lengthSeed % (size - offset + 1);
            const got = await collect(catImage(cowFile, { offset, length, chunkBytes }));
            expect(got.equals(expected.subarray(offset, length === undefined ? size : offset + length))).toBe(true);
          } finally {
            fs.rmSync(dir, { recursive: true, force: true });
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it('reads a raw file as it is, and refuses ranges outside the disk before yielding anything', async () => {
    const raw = path.join(tmp.path, 'raw.img');
    const bytes = randomBytes(3000);
    fs.writeFileSync(raw, bytes);
    expect((await collect(catImage(raw, { offset: 1000 }))).equals(bytes.subarray(1000))).toBe(true);
    await expect(collect(catImage(raw, { offset: 3001 }))).rejects.toThrow(/raw\.img: read of 0 bytes at offset 3001: is outside the disk \(0 to 3000 bytes\)/);
    await expect(collect(catImage(raw, { offset: 1000, length: 2001 }))).rejects.toThrow(
      /raw\.img: read of 2001 bytes at offset 1000: is outside the disk \(0 to 3000 bytes\): at most 2000 bytes fit there/,
    );
  });

  it('reports a backing mtime mismatch through onWarning and still reads', async () => {
    const backingFile = path.join(tmp.path, 'touched.img');
    const backing = randomBytes(8 * SECTOR);
    fs.writeFileSync(backingFile, backing);
    const cowFile = path.join(tmp.path, 'touched.cow');
    await createCow(cowFile, backingFile);
    fs.utimesSync(backingFile, 2_000_000, 2_000_000);
    const warnings: string[] = [];
    const got = await collect(catImage(cowFile, { onWarning: (warning) => warnings.push(warning) }));
    expect(got.equals(backing)).toBe(true);
    expect(warnings).toEqual([expect.stringMatching(/touched\.img: backing mtime is 2000000 \(.*\), header says \d+ \(.*\) \(the kernel would refuse it\)/)]);
  });
});

const mooMissing = missingTools('uml_moo', 'uml_mkcow');

describe.skipIf(mooMissing.length > 0)(titleWithSkipReason('catImage against uml_moo', mooMissing), () => {
  const tmp = useTempDir();

  it('gives the bytes uml_moo merges, for a COW made by uml_mkcow', async () => {
    const size = 3 * 1024 * 1024 + 7 * SECTOR; // not a multiple of 4 KiB
    const backingFile = path.join(tmp.path, 'base.img');
    const backing = randomBytes(size);
    backing.fill(0, SECTOR * 100, SECTOR * 300); // zero runs become holes in uml_moo's output
    fs.writeFileSync(backingFile, backing);
    const cowFile = path.join(tmp.path, 'vm.cow');
    const made = spawnSync('uml_mkcow', [cowFile, backingFile], { encoding: 'utf8' });
    expect(made.status, made.stderr).toBe(0);
    const writes = randomWrites(size, [
      { at: 0, count: 3 },
      { at: 150, count: 20, zero: true },
      { at: 1000, count: 400 },
      { at: 4000, count: 1 },
      { at: Math.ceil(size / SECTOR) - 2, count: 2 },
    ]);
    await writeCowSectors(cowFile, writes);
    const merge = path.join(tmp.path, 'merged.img');
    const moo = spawnSync('uml_moo', [cowFile, merge], { encoding: 'utf8' });
    expect(moo.status, moo.stderr).toBe(0);
    const fromMoo = fs.readFileSync(merge);
    const fromCat = await collect(catImage(cowFile));
    expect(fromCat.length).toBe(fromMoo.length);
    expect(md5(fromCat)).toBe(md5(fromMoo));
    expect(fromCat.equals(mergedDisk(backing, writes))).toBe(true);
  });
});

describe('ubdcow cat (CLI)', () => {
  const tmp = useTempDir();
  const cli = ensureBuiltCli();

  async function fixture(size: number) {
    const backingFile = path.join(tmp.path, 'base.img');
    const backing = randomBytes(size);
    fs.writeFileSync(backingFile, backing);
    const cowFile = path.join(tmp.path, 'vm.cow');
    await createCow(cowFile, backingFile);
    const writes = randomWrites(size, [
      { at: 1, count: 9 },
      { at: 5000, count: 3000 },
    ]);
    await writeCowSectors(cowFile, writes);
    return { cowFile, backingFile, disk: mergedDisk(backing, writes) };
  }

  it('streams the whole disk to a pipe (md5sum and cmp agree)', async () => {
    const { cowFile, disk } = await fixture(8 * 1024 * 1024 + 3 * SECTOR);
    const expectedFile = path.join(tmp.path, 'expected.img');
    fs.writeFileSync(expectedFile, disk);
    const summed = spawnSync('sh', ['-c', `node "${cli}" cat "${cowFile}" | md5sum`], { encoding: 'utf8' });
    expect(summed.stderr).toBe('');
    expect(summed.stdout.split(' ')[0]).toBe(md5(disk));
    const compared = spawnSync('sh', ['-c', `node "${cli}" cat "${cowFile}" | cmp - "${expectedFile}"`], { encoding: 'utf8' });
    expect(compared.status, compared.stdout + compared.stderr).toBe(0);
  });

  it('honours --offset and --length with units', async () => {
    const { cowFile, disk } = await fixture(4 * 1024 * 1024);
    const result = spawnSync('node', [cli, 'cat', cowFile, '--offset', '1M', '--length', '0x1800'], { maxBuffer: 1 << 26 });
    expect(result.status).toBe(0);
    expect(Buffer.from(result.stdout).equals(disk.subarray(1 << 20, (1 << 20) + 0x1800))).toBe(true);
  });

  it('reads a moved backing file given with -b (the same disk), and refuses the missing one without it', async () => {
    const { cowFile, backingFile, disk } = await fixture(4 * 1024 * 1024);
    const moved = path.join(tmp.path, 'moved-base.img');
    fs.renameSync(backingFile, moved);
    const result = spawnSync('node', [cli, 'cat', cowFile, '-b', moved], { maxBuffer: 1 << 26 });
    expect(result.status, String(result.stderr)).toBe(0);
    expect(Buffer.from(result.stdout).equals(disk)).toBe(true);
    const missing = run('node', [cli, 'cat', cowFile]);
    expect(missing.status).toBe(1);
    expect(missing.stdout).toBe('');
    expect(missing.stderr).toMatch(/^ubdcow cat: .*base\.img.*\n$/);
  });

  it('stops quietly when the reader closes the pipe early', async () => {
    const { cowFile, disk } = await fixture(32 * 1024 * 1024);
    const result = spawnSync('sh', ['-c', `node "${cli}" cat "${cowFile}" | head -c 1000 | md5sum`], {
      encoding: 'utf8',
    });
    expect(result.stderr).toBe('');
    expect(result.stdout.split(' ')[0]).toBe(md5(disk.subarray(0, 1000)));
    const status = spawnSync('bash', ['-c', `node "${cli}" cat "${cowFile}" | head -c 10 >/dev/null; echo "\${PIPESTATUS[0]}"`], {
      encoding: 'utf8',
    });
    expect(status.stderr).toBe('');
    expect(status.stdout.trim()).toBe('0');
  });

  it('fails with one line for a bad option value or range, writing nothing', async () => {
    const { cowFile } = await fixture(64 * 1024);
    const bad = run('node', [cli, 'cat', cowFile, '--offset', 'lots']);
    expect(bad.status).toBe(1);
    expect(bad.stdout).toBe('');
    expect(bad.stderr).toBe('ubdcow cat: --offset is "lots", expected a byte count such as 4096, 0x1000, 64K or 1MiB\n');
    const outside = run('node', [cli, 'cat', cowFile, '--offset', '60K', '--length', '8K']);
    expect(outside.status).toBe(1);
    expect(outside.stdout).toBe('');
    expect(outside.stderr).toBe(`ubdcow cat: ${cowFile}: read of 8192 bytes at offset 61440: is outside the disk (0 to 65536 bytes): at most 4096 bytes fit there\n`);
  });
});
