import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { commitCow, commitJournalPath, readCommitJournal } from '../../src/commands/commit/index.js';
import { parseHeader } from '../../src/format/header.js';
import type { HeaderLayout } from '../../src/format/header.js';
import { openImage } from '../../src/io/image/image.js';
import { checkBacking } from '../../src/io/image/backing.js';
import { type FileSystem } from '../../src/io/file/file.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { UbdcowError } from '../../src/errors.js';
import {
  type BuiltCow,
  FIXTURE_MTIME,
  allocatedBytes,
  buildCow,
  countSetBits,
  holdLockInChild,
  readRange,
  snapshot,
} from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { FaultyFileSystem } from '../hostile/faulty-fs.js';
import { wrapHandle } from '../helpers/wrap-handle.js';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';

const layouts: HeaderLayout[] = ['v1', 'v2', 'v3', 'v3-broken'];

function readFile(file: string): Uint8Array {
  return new Uint8Array(fs.readFileSync(file));
}

async function expectUbdcowError(promise: Promise<unknown>, code: string, message?: RegExp): Promise<UbdcowError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UbdcowError);
  expect((err as UbdcowError).code).toBe(code);
  if (message) expect((err as UbdcowError).message).toMatch(message);
  expect((err as UbdcowError).message).not.toContain('\n');
  return err as UbdcowError;
}

/** Byte-for-byte equality, reporting the first difference (a diff of megabytes would drown the report). */
function expectSameBytes(actual: Uint8Array, expected: Uint8Array, label = ''): void {
  expect(actual.length, `${label} length`).toBe(expected.length);
  let at = 0;
  while (at < actual.length && actual[at] === expected[at]) at++;
  expect(at === actual.length ? 'equal' : `first difference at byte ${at}: ${actual[at]} vs ${expected[at]}`, label).toBe('equal');
}

/** The COW after an in-place commit: no bits, data area a hole, header re-stamped with the new mtime. */
async function expectEmptiedOver(built: BuiltCow): Promise<void> {
  expect(countSetBits(built.cowPath, built.geometry)).toBe(0);
  const image = await openImage(built.cowPath);
  try {
    expect(image.header.layout).toBe(built.header.layout);
    expect(image.header.backingFile).toBe(built.header.backingFile);
    expect(image.header.size).toBe(built.header.size);
    expect(image.fileSize).toBe(built.geometry.fileLength);
    expect((await checkBacking(image.header)).state).toBe('ok');
  } finally {
    await image.handle.close();
  }
  const data = readRange(built.cowPath, built.geometry.dataOffset, built.header.size);
  expect(data.every((byte) => byte === 0)).toBe(true);
  expect(fs.existsSync(commitJournalPath(built.cowPath))).toBe(false);
}

describe('commitCow to a new file', () => {
  const tmp = useTempDir();

  it.each(layouts)('%s: every sector from the COW where its bit is set, else from the backing', async (layout) => {
    // 1,000,000 bytes: not a whole number of sectors, and V1/V2 leave the last sectors without a bit.
    const built = buildCow(tmp.path, {
      layout,
      size: 1_000_000,
      extents: [
        { start: 0, end: 3 },
        { start: 100, end: 260 },
        { start: 1000, end: 1001 },
        { start: 1940, end: 1954 },
      ],
      zeroCowSectors: [101, 102],
      seed: 7,
    });
    const output = path.join(tmp.path, 'merged.img');
    const result = await commitCow(built.cowPath, { output, chunkBytes: 64 << 10 });
    expectSameBytes(readFile(output), built.expected);
    expect(result.mode).toBe('new-file');
    expect(result.size).toBe(1_000_000);
    const covered = built.geometry.coveredSectors;
    const expectedSectors = 3 + 160 + 1 + (Math.min(1954, covered) - 1940);
    expect(result.extents).toBe(4);
    expect(result.allocatedBytes).toBe(expectedSectors * 512 - (covered === 1954 ? 512 - (1_000_000 % 512) : 0));
  });

  it('random extents over random images give the merged disk, exact length, zeros as holes', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...layouts),
        fc.integer({ min: 1, max: 600_000 }),
        fc.array(fc.tuple(fc.nat(1200), fc.integer({ min: 1, max: 300 })), { maxLength: 8 }),
        fc.integer({ min: 1, max: 2 ** 31 }),
        fc.constantFrom(4096, 12288, 1 << 20),
        async (layout, size, ranges, seed, chunkBytes) => {
          const dir = fs.mkdtempSync(path.join(tmp.path, 'case-'));
          const built = buildCow(dir, {
            layout,
            size,
            seed,
            extents: ranges.map(([start, length]) => ({ start, end: start + length })),
            zeroBacking: [{ start: Math.floor(size / 3), end: Math.floor((2 * size) / 3) }],
          });
          const output = path.join(dir, 'out.img');
          await commitCow(built.cowPath, { output, chunkBytes });
          expect(fs.statSync(output).size).toBe(size);
          expectSameBytes(readFile(output), built.expected);
          fs.rmSync(dir, { recursive: true });
        },
      ),
      { numRuns: 40 },
    );
  });

  it('leaves all-zero regions as holes and writes only the rest', async () => {
    const size = 16 << 20;
    const built = buildCow(tmp.path, {
      size,
      zeroBacking: [{ start: 0, end: size }],
      extents: [
        { start: 2048, end: 2056 },
        { start: 30000, end: 30016 },
      ],
      zeroCowSectors: [2048],
    });
    const output = path.join(tmp.path, 'merged.img');
    const result = await commitCow(built.cowPath, { output });
    expectSameBytes(readFile(output), built.expected);
    expect(fs.statSync(output).size).toBe(size);
    // Sector 2048 is zeros, so the first extent's 4 KiB block is written for sectors 2049-2055 only.
    expect(result.writtenBytes).toBe(4096 + 8192);
    expect(allocatedBytes(output)).toBeLessThan(64 << 10);
  });

  it('an image that is all zeros is one hole of the right length', async () => {
    const built = buildCow(tmp.path, { size: 3 << 20, zeroBacking: [{ start: 0, end: 3 << 20 }] });
    const output = path.join(tmp.path, 'merged.img');
    const result = await commitCow(built.cowPath, { output });
    expect(result.writtenBytes).toBe(0);
    expect(fs.statSync(output).size).toBe(3 << 20);
    expect(allocatedBytes(output)).toBe(0);
  });

  it('reports progress up to the virtual size', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 5, end: 50 }] });
    const calls: Array<[number, number]> = [];
    await commitCow(built.cowPath, {
      output: path.join(tmp.path, 'out.img'),
      chunkBytes: 128 << 10,
      onProgress: (done, total) => calls.push([done, total]),
    });
    expect(calls.length).toBeGreaterThanOrEqual(9);
    expect(calls.at(-1)).toEqual([1 << 20, 1 << 20]);
    for (let i = 1; i < calls.length; i++) expect(calls[i][0]).toBeGreaterThanOrEqual(calls[i - 1][0]);
  });

  it('-b reads another backing file instead of the header\'s', async () => {
    const built = buildCow(tmp.path, { size: 256 << 10, extents: [{ start: 3, end: 9 }] });
    const moved = path.join(tmp.path, 'moved.img');
    fs.renameSync(built.backingPath, moved);
    const output = path.join(tmp.path, 'out.img');
    await expectUbdcowError(commitCow(built.cowPath, { output }), 'backing-missing', /base\.img/);
    const result = await commitCow(built.cowPath, { output, backing: moved });
    expect(result.backing).toBe(moved);
    expectSameBytes(readFile(output), built.expected);
  });

  it('OUT that is the COW by another name (hard link, symlink) is refused even with -f, and the COW is unchanged', async () => {
    const built = buildCow(tmp.path, { size: 512 << 10, extents: [{ start: 1, end: 40 }] });
    const hardLink = path.join(tmp.path, 'hard-link.img');
    const symlink = path.join(tmp.path, 'sym-link.img');
    fs.linkSync(built.cowPath, hardLink);
    fs.symlinkSync(built.cowPath, symlink);
    const before = fs.readFileSync(built.cowPath);
    for (const output of [hardLink, symlink]) {
      await expectUbdcowError(commitCow(built.cowPath, { output, force: true }), 'output-is-cow', /is the COW file itself/);
    }
    expect(fs.readFileSync(built.cowPath).equals(before)).toBe(true);
    expect(fs.statSync(hardLink).nlink).toBe(2);
  });

  it('refusals change nothing: existing OUT, backing changed, backing resized, locked, OUT is the COW', async () => {
    const built = buildCow(tmp.path, { size: 512 << 10, extents: [{ start: 1, end: 40 }] });
    const output = path.join(tmp.path, 'out.img');
    fs.writeFileSync(output, 'precious');
    const files = [built.cowPath, built.backingPath, output];
    const before = snapshot(tmp.path, files);

    await expectUbdcowError(commitCow(built.cowPath, { output }), 'exists', /out\.img: already exists/);
    expect(snapshot(tmp.path, files)).toEqual(before);

    await expectUbdcowError(commitCow(built.cowPath, { output: built.cowPath, force: true }), 'output-is-cow');
    await expectUbdcowError(commitCow(built.cowPath, { output: path.join(tmp.path, 'new.img'), keep: true }), 'usage', /--keep only applies to an in-place commit/);
    expect(snapshot(tmp.path, files)).toEqual(before);

    const fresh = path.join(tmp.path, 'fresh.img');
    fs.utimesSync(built.backingPath, FIXTURE_MTIME + 5, FIXTURE_MTIME + 5);
    const touched = snapshot(tmp.path, files);
    await expectUbdcowError(commitCow(built.cowPath, { output: fresh }), 'backing-mismatch', /mtime is 1600000005.*header says 1600000000/);
    expect(snapshot(tmp.path, files)).toEqual(touched);
    fs.utimesSync(built.backingPath, FIXTURE_MTIME, FIXTURE_MTIME);

    fs.truncateSync(built.backingPath, 256 << 10);
    fs.utimesSync(built.backingPath, FIXTURE_MTIME, FIXTURE_MTIME);
    const shrunk = snapshot(tmp.path, files);
    await expectUbdcowError(commitCow(built.cowPath, { output: fresh }), 'backing-mismatch', /backing size is 262144 bytes, header says 524288/);
    expect(snapshot(tmp.path, files)).toEqual(shrunk);
  });

  it('--force merges over a changed backing file (a shorter one reads as zeros past its end)', async () => {
    const built = buildCow(tmp.path, { size: 512 << 10, extents: [{ start: 1, end: 40 }] });
    fs.truncateSync(built.backingPath, 256 << 10);
    const output = path.join(tmp.path, 'out.img');
    const result = await commitCow(built.cowPath, { output, force: true });
    expect(result.overridden).toHaveLength(1);
    const expected = built.expected.slice();
    expected.fill(0, 256 << 10);
    expectSameBytes(readFile(output), expected);

    fs.writeFileSync(output, 'old');
    await commitCow(built.cowPath, { output, force: true });
    expectSameBytes(readFile(output), expected);
  });

  it('refuses a COW file another process has locked (as a running UML does), changing nothing', async () => {
    const built = buildCow(tmp.path, { size: 256 << 10, extents: [{ start: 0, end: 10 }] });
    const output = path.join(tmp.path, 'out.img');
    const files = [built.cowPath, built.backingPath, output];
    const before = snapshot(tmp.path, files);
    const holder = await holdLockInChild(built.cowPath);
    try {
      await expectUbdcowError(commitCow(built.cowPath, { output }), 'locked', /vm\.cow: in use by another process/);
      await expectUbdcowError(commitCow(built.cowPath), 'locked', /see \/proc\/locks/);
      expect(snapshot(tmp.path, files)).toEqual(before);
    } finally {
      await holder.release();
    }
    await commitCow(built.cowPath, { output });
    expectSameBytes(readFile(output), built.expected);
  });

  it('refuses to read allocated sectors past the end of a truncated COW file', async () => {
    const built = buildCow(tmp.path, { size: 256 << 10, extents: [{ start: 400, end: 420 }] });
    fs.truncateSync(built.cowPath, built.geometry.dataOffset + 100 * 512);
    const files = [built.cowPath, built.backingPath];
    const before = snapshot(tmp.path, files);
    await expectUbdcowError(commitCow(built.cowPath, { output: path.join(tmp.path, 'out.img') }), 'truncated', /file length is .*allocated sectors lie past the end/);
    await expectUbdcowError(commitCow(built.cowPath), 'truncated');
    expect(snapshot(tmp.path, files)).toEqual(before);
  });

  it.each(['blocking', 'async'] as const)('a COW that shrinks during an in-place commit (%s reads) is reported as truncated, never merged as zeros', async (calls) => {
    const built = buildCow(tmp.path, { size: 256 << 10, extents: [{ start: 40, end: 60 }, { start: 400, end: 420 }] });
    const backingBefore = readFile(built.backingPath);
    const { dataOffset } = built.geometry;
    // Reads of the data area find the end of the file, as if it had been cut after the up-front check.
    const shrinking: FileSystem = {
      ...nodeFileSystem,
      async open(file, mode) {
        const handle = await nodeFileSystem.open(file, mode);
        const isCow = path.resolve(file) === path.resolve(built.cowPath);
        if (calls === 'blocking') {
          return isCow ? { ...wrapHandle(handle, {}), readSync: (b, o, l, p) => (p >= dataOffset ? 0 : handle.readSync!(b, o, l, p)), writeSync: handle.writeSync!.bind(handle) } : handle;
        }
        return wrapHandle(handle, isCow ? { read: async (b, o, l, p) => (p >= dataOffset ? 0 : handle.read(b, o, l, p)) } : {});
      },
    };
    await expectUbdcowError(commitCow(built.cowPath, { fs: shrinking }), 'truncated', /file length/);
    expectSameBytes(readFile(built.backingPath), backingBefore);
    expect(countSetBits(built.cowPath, built.geometry)).toBe(40);
  });
});

describe('commitCow in place', () => {
  const tmp = useTempDir();

  it.each(layouts)('%s: merges into the backing file, then empties the COW over it', async (layout) => {
    const built = buildCow(tmp.path, {
      layout,
      size: 1_000_000,
      extents: [
        { start: 0, end: 8 },
        { start: 500, end: 900 },
        { start: 1950, end: 1954 },
      ],
      zeroCowSectors: [600],
      seed: 11,
    });
    const result = await commitCow(built.cowPath, { chunkBytes: 8192 });
    expectSameBytes(readFile(built.backingPath), built.expected);
    expect(result).toMatchObject({ mode: 'in-place', emptied: true, resumed: false, extents: 3, output: built.backingPath });
    await expectEmptiedOver(built);
    // The emptied COW over the merged base still shows the same disk.
    const again = path.join(tmp.path, 'again.img');
    await commitCow(built.cowPath, { output: again });
    expectSameBytes(readFile(again), built.expected);
  });

  it('touches only allocated sectors of the backing file', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 10, end: 12 }] });
    const fsCount = new FaultyFileSystem(nodeFileSystem);
    await commitCow(built.cowPath, { fs: fsCount });
    const backingWrites = fsCount.writeLog.filter((entry) => entry.startsWith('write base.img'));
    expect(backingWrites).toEqual([`write base.img @${10 * 512}+1024`]);
  });

  it('--keep leaves the COW byte for byte as it was (uml_moo -d)', async () => {
    const built = buildCow(tmp.path, { size: 300_000, extents: [{ start: 20, end: 90 }] });
    const cowBefore = snapshot(tmp.path, [built.cowPath]).files[built.cowPath];
    const result = await commitCow(built.cowPath, { keep: true });
    expect(result.emptied).toBe(false);
    expect(result.warnings.join()).toMatch(/kept as it was/);
    expectSameBytes(readFile(built.backingPath), built.expected);
    expect(snapshot(tmp.path, [built.cowPath]).files[built.cowPath]).toEqual(cowBefore);
    expect(fs.existsSync(commitJournalPath(built.cowPath))).toBe(false);
  });

  it('refuses a changed backing file, changing nothing, unless forced', async () => {
    const built = buildCow(tmp.path, { size: 200_000, extents: [{ start: 20, end: 90 }] });
    fs.utimesSync(built.backingPath, FIXTURE_MTIME - 100, FIXTURE_MTIME - 100);
    const files = [built.cowPath, built.backingPath];
    const before = snapshot(tmp.path, files);
    await expectUbdcowError(commitCow(built.cowPath), 'backing-mismatch', /use --force/);
    expect(snapshot(tmp.path, files)).toEqual(before);
    const result = await commitCow(built.cowPath, { force: true });
    expect(result.overridden[0]).toMatch(/mtime/);
    expectSameBytes(readFile(built.backingPath), built.expected);
    await expectEmptiedOver(built);
  });

  it('forced over a backing of another size: says the emptied COW will not open in UML, and how to make one that does', async () => {
    const built = buildCow(tmp.path, { size: 200_000, extents: [{ start: 20, end: 90 }] });
    fs.appendFileSync(built.backingPath, Buffer.alloc(512));
    fs.utimesSync(built.backingPath, FIXTURE_MTIME, FIXTURE_MTIME);
    await expectUbdcowError(commitCow(built.cowPath), 'backing-mismatch', /use --force/);
    const result = await commitCow(built.cowPath, { force: true });
    expect(result.overridden[0]).toMatch(/size/);
    expect(result.warnings.join('\n')).toMatch(/header records 200000 bytes and the backing has 200512 \(forced\), so UML will refuse it; make a new one: ubdcow create -f /);
  });

  it('refuses a stale journal that does not describe this COW', async () => {
    const built = buildCow(tmp.path, { size: 200_000, extents: [{ start: 1, end: 2 }] });
    fs.utimesSync(built.backingPath, FIXTURE_MTIME + 1, FIXTURE_MTIME + 1);
    fs.writeFileSync(
      commitJournalPath(built.cowPath),
      JSON.stringify({ format: 'ubdcow-commit-journal', version: 1, backing: built.backingPath, size: 200_000, mtime: 42, started: '' }),
    );
    await expectUbdcowError(commitCow(built.cowPath), 'backing-mismatch');
  });

  it('an interrupted commit, re-run, gives the right disk whatever write it stopped at', async () => {
    const spec = {
      size: 700_000,
      extents: [
        { start: 0, end: 40 },
        { start: 300, end: 700 },
        { start: 1200, end: 1367 },
      ],
      seed: 5,
    };
    const probeDir = fs.mkdtempSync(path.join(tmp.path, 'probe-'));
    const probe = buildCow(probeDir, spec);
    const counter = new FaultyFileSystem(nodeFileSystem);
    await commitCow(probe.cowPath, { fs: counter, chunkBytes: 16384 });
    expect(counter.writeLog.some((entry) => entry.startsWith('truncate vm.cow'))).toBe(true);
    // The copy into the backing file takes the blocking calls on real files: those are faulted too.
    expect(counter.blockingSteps).toBeGreaterThan(0);
    const total = counter.writes;
    expect(total).toBeGreaterThan(15);

    for (let failAt = 1; failAt <= total; failAt++) {
      const dir = fs.mkdtempSync(path.join(tmp.path, `fail-${failAt}-`));
      const built = buildCow(dir, spec);
      const failing = new FaultyFileSystem(nodeFileSystem, { kind: 'write', at: failAt, code: 'EIO' });
      const err = await commitCow(built.cowPath, { fs: failing, chunkBytes: 16384 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err, `operation ${failAt} (${failing.writeLog.at(-1)})`).toBeDefined();
      expect(failing.injected, `operation ${failAt}`).toBeDefined();
      expect(String((err as Error).message)).toMatch(/EIO|input\/output error/);
      const rerun = await commitCow(built.cowPath, { chunkBytes: 16384 });
      expectSameBytes(readFile(built.backingPath), built.expected, `after failing ${failing.writeLog.at(-1)}`);
      await expectEmptiedOver(built);
      // Once the backing file has been written, only the journal lets the re-run through.
      if (rerun.resumed) expect(failing.writeLog.some((entry) => entry.startsWith('write base.img'))).toBe(true);
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('a commit killed outright (SIGKILL, no cleanup) at any stage finishes when run again', async () => {
    const spec = { size: 400_000, extents: [{ start: 10, end: 500 }, { start: 600, end: 700 }], seed: 9 };
    const probe = buildCow(fs.mkdtempSync(path.join(tmp.path, 'probe-')), spec);
    const counter = new FaultyFileSystem(nodeFileSystem);
    await commitCow(probe.cowPath, { fs: counter, chunkBytes: 16384 });
    // 1-based operation numbers of the stages a crash can interrupt.
    const stage = (prefix: string, nth = 0) =>
      counter.writeLog.map((entry, index) => (entry.startsWith(prefix) ? index + 1 : -1)).filter((index) => index > 0)[nth];
    const firstBackingWrite = stage('write base.img');
    const bitmapClear = stage('write vm.cow');
    const headerWrite = stage('write vm.cow @0+');
    const killPoints = [firstBackingWrite, stage('write base.img', 3), stage('sync base.img'), bitmapClear, headerWrite, stage('truncate vm.cow'), stage('unlink vm.cow.ubdcow-commit')];
    expect(killPoints.every((point) => point > 0)).toBe(true);
    for (const killAt of killPoints) {
      const dir = fs.mkdtempSync(path.join(tmp.path, `kill-${killAt}-`));
      const built = buildCow(dir, spec);
      const script = path.join(dir, 'child.mts');
      fs.writeFileSync(
        script,
        [
          `import { commitCow } from ${JSON.stringify(path.join(repoRoot, 'src/commands/commit/index.ts'))};`,
          `import { FaultyFileSystem } from ${JSON.stringify(path.join(repoRoot, 'test/hostile/faulty-fs.ts'))};`,
          `import { nodeFileSystem } from ${JSON.stringify(path.join(repoRoot, 'src/io/file/node-fs.ts'))};`,
          `await commitCow(${JSON.stringify(built.cowPath)}, { fs: new FaultyFileSystem(nodeFileSystem, { kind: 'write', at: ${killAt}, code: 'EIO', kill: true }), chunkBytes: 16384 });`,
        ].join('\n'),
      );
      const child = spawnSync(process.execPath, ['--import', 'tsx', script], { cwd: repoRoot, encoding: 'utf8' });
      expect(child.signal, child.stderr).toBe('SIGKILL');
      expect(fs.existsSync(commitJournalPath(built.cowPath))).toBe(true);
      const journal = await readCommitJournal(nodeFileSystem, built.cowPath);
      expect(journal).toMatchObject({ backing: built.backingPath, size: spec.size, mtime: FIXTURE_MTIME });
      const rerun = await commitCow(built.cowPath);
      expectSameBytes(readFile(built.backingPath), built.expected, `killed at ${counter.log[killAt - 1]}`);
      await expectEmptiedOver(built);
      expect(rerun.resumed).toBe(killAt > firstBackingWrite && killAt <= headerWrite);
      fs.rmSync(dir, { recursive: true });
    }
  });

  it('the emptied header keeps its layout and records the merged backing file\'s mtime', async () => {
    for (const layout of layouts) {
      const dir = fs.mkdtempSync(path.join(tmp.path, `${layout}-`));
      const built = buildCow(dir, { layout, size: 100_000, extents: [{ start: 3, end: 5 }] });
      await commitCow(built.cowPath);
      const header = parseHeader(readRange(built.cowPath, 0, 8192)).header;
      expect(header.layout).toBe(layout);
      expect(header.mtime).toBe(Math.floor(fs.statSync(built.backingPath).mtimeMs / 1000));
      expect(header.mtime).not.toBe(FIXTURE_MTIME);
    }
  });
});

describe('ubdcow commit (CLI)', () => {
  const tmp = useTempDir();
  const bin = path.join(repoRoot, 'bin', 'ubdcow');
  beforeAll(() => ensureBuiltCli());

  function cli(args: string[]) {
    return spawnSync(process.execPath, [bin, ...args], { cwd: tmp.path, encoding: 'utf8' });
  }

  it('writes a new image, prints JSON, refuses to overwrite, and explains itself in --help', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 7, end: 77 }] });
    const ok = cli(['commit', 'vm.cow', 'out.img', '--json']);
    expect(ok.status, ok.stderr).toBe(0);
    const json = JSON.parse(ok.stdout);
    expect(json).toMatchObject({ mode: 'new-file', output: 'out.img', extents: 1, allocatedBytes: 70 * 512 });
    expectSameBytes(readFile(path.join(tmp.path, 'out.img')), built.expected);
    expect(ok.stderr).toBe('');

    const again = cli(['commit', 'vm.cow', 'out.img']);
    expect(again.status).toBe(1);
    expect(again.stderr).toBe('ubdcow commit: out.img: already exists (use --force to overwrite)\n');

    const forced = cli(['commit', '-p', '--force', 'vm.cow', 'out.img']);
    expect(forced.status, forced.stderr).toBe(0);
    expect(forced.stderr).toMatch(/commit \[#+\] 100%/);

    const help = cli(['commit', '--help']);
    expect(help.stdout).toMatch(/--keep/);
    expect(help.stdout).toMatch(/Examples:/);
  });

  it('in place by default; -d keeps the COW', async () => {
    const built = buildCow(tmp.path, { size: 1 << 20, extents: [{ start: 7, end: 77 }] });
    const kept = cli(['commit', '-d', 'vm.cow']);
    expect(kept.status, kept.stderr).toBe(0);
    expect(kept.stdout).toMatch(/vm\.cow left unchanged/);
    expect(countSetBits(built.cowPath, built.geometry)).toBe(70);
    expectSameBytes(readFile(built.backingPath), built.expected);
  });
});
