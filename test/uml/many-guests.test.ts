/**
 * Scenario 6: many guests on one base. Three COWs over one backing file, each guest writes its own
 * files (and rewrites one shared file differently); each merge holds exactly its guest's files, and
 * `ubdcow diff COW1 COW2 --json` lists exactly the regions where two guests' disks differ,
 * checked against a naive sector-by-sector comparison of the merged images.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  UmlLab,
  debugfsCat,
  differingSectorRuns,
  e2fsckReadOnly,
  expectGuestOk,
  filesWritten,
  md5,
  missingUmlTools,
  runProgram,
  ubdcow,
  ubdcowJson,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';

const missing = missingUmlTools();
const guests = [1, 2, 3];

/* 4 KiB blocks keep the guests' reads of the shared base page-aligned (see docs/uml.md). */
const guestBody = `
mount -t ext2 /dev/ubdb /mnt
put /mnt guest$GUEST/own.bin 4096 $((GUEST * 3))
put /mnt guest$GUEST/small.txt 1 $((GUEST * 100 + 7))
put /mnt shared.bin 4096 2
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('three guests on one base: diff between their COWs', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  const cows = new Map<number, string>();
  const merged = new Map<number, string>();
  const files = new Map<number, Map<string, { md5: string; bytes: number }>>();
  let baseMd5: string;

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('many');
    const seed = path.join(dir, 'seed');
    fs.mkdirSync(seed);
    fs.writeFileSync(path.join(seed, 'shared.bin'), Buffer.alloc(12_000, 's'));
    fs.writeFileSync(path.join(seed, 'readme.txt'), 'one base, three guests\n');
    base = path.join(dir, 'base.img');
    const mkfs = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', '4096', '-d', seed, base, '16M']);
    expect(mkfs.status, mkfs.stderr).toBe(0);
    baseMd5 = md5(fs.readFileSync(base));

    for (const guest of guests) {
      const cow = path.join(dir, `guest${guest}.cow`);
      expect((await ubdcow(['create', cow, base])).status).toBe(0);
      cows.set(guest, cow);
      const result = expectGuestOk(await lab.run(guestBody, { disks: { b: `${cow},${base}` }, env: { GUEST: String(guest) } }));
      files.set(guest, filesWritten(result));
    }
    for (const guest of guests) {
      const out = path.join(dir, `merged${guest}.img`);
      const commit = await ubdcow(['commit', cows.get(guest)!, out]);
      expect(commit.status, commit.stderr).toBe(0);
      merged.set(guest, out);
    }
  }, umlTestTimeout);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('the shared base is untouched and each merged disk holds its own guest\'s files only', async () => {
    expect(md5(fs.readFileSync(base))).toBe(baseMd5);
    for (const guest of guests) {
      const image = merged.get(guest)!;
      for (const [file, expected] of files.get(guest)!) expect(md5(await debugfsCat(image, file)), `guest ${guest} ${file}`).toBe(expected.md5);
      expect((await debugfsCat(image, 'readme.txt')).toString()).toBe('one base, three guests\n');
      const root = await runProgram('debugfs', ['-R', 'ls /', image]);
      for (const other of guests.filter((g) => g !== guest)) expect(root.stdout).not.toContain(`guest${other}`);
      const fsck = await e2fsckReadOnly(image);
      expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    }
  });

  /** `diff --sectors --json` ranges without their sector fields. */
  const byteRanges = (ranges: { offset: number; length: number }[]) => ranges.map(({ offset, length }) => ({ offset, length }));

  it.each([
    [1, 2],
    [1, 3],
    [2, 3],
  ])('diff guest%i.cow guest%i.cow lists exactly the sectors where the merged disks differ', async (a, b) => {
    const { status, value } = await ubdcowJson(['diff', '--sectors', cows.get(a)!, cows.get(b)!], [0, 1]);
    const naive = differingSectorRuns(merged.get(a)!, merged.get(b)!).map((run) => ({ offset: run.start * 512, length: (run.end - run.start) * 512 }));
    expect(naive.length).toBeGreaterThan(0);
    expect(status).toBe(1);
    expect(value.mode).toBe('same-backing');
    expect(byteRanges(value.ranges)).toEqual(naive);
    expect(value.differingBytes).toBe(naive.reduce((sum, range) => sum + range.length, 0));

    // A COW against the other guest's merged raw image must give the same answer the slow way.
    const mixed = await ubdcowJson(['diff', '--sectors', cows.get(a)!, merged.get(b)!], [0, 1]);
    expect(byteRanges(mixed.value.ranges)).toEqual(naive);
  });

  it('a COW compared with itself, and with its own merge, is identical', async () => {
    const self = await ubdcowJson(['diff', cows.get(1)!, cows.get(1)!], [0, 1]);
    expect(self.status).toBe(0);
    expect(self.value.identical).toBe(true);
    const own = await ubdcowJson(['diff', cows.get(2)!, merged.get(2)!], [0, 1]);
    expect(own.status).toBe(0);
    expect(own.value.ranges).toEqual([]);
  });
});
