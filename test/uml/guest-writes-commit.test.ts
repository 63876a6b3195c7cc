/**
 * Scenario 1: `ubdcow create` makes the COW, a real UML guest formats the COW device and writes
 * files (checksumming them as it writes), `ubdcow commit COW OUT` merges; every file read back on
 * the host matches, e2fsck is clean, and inspect/map/diff agree with the bitmap the kernel wrote.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  UmlLab,
  debugfsCat,
  e2fsckReadOnly,
  expectGuestOk,
  filesWritten,
  kernelBitmapRuns,
  md5,
  md5OfFile,
  missingUmlTools,
  runProgram,
  sparseFile,
  ubdcow,
  ubdcowJson,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';

const missing = missingUmlTools('uml_moo');
const diskBytes = 48 << 20;

/* 1 KiB blocks make the kernel set runs of bits that start and end inside bitmap bytes. The guest
 * never reads back file data it wrote: the checks happen on the host. */
const guestBody = `
mke2fs -b 1024 -L guestfs /dev/ubdb >/dev/null
mount -t ext2 /dev/ubdb /mnt
put /mnt one-byte 1 1
put /mnt sector.bin 512 1
put /mnt odd.bin 1000 3
put /mnt page.bin 4096 1
put /mnt docs/mib.bin 1048576 1
put /mnt docs/nested/deep/big.bin 65536 40
put /mnt docs/nested/empty 1 0
i=0
while [ $i -lt 24 ]; do put /mnt many/f$i 700 $((i % 5 + 1)); i=$((i + 1)); done
rm /mnt/many/f7
mark removed many/f7
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('guest writes a ubdcow-created COW; ubdcow commit COW OUT', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  let cow: string;
  let out: string;
  let files: Map<string, { md5: string; bytes: number }>;
  let cowBeforeCommit: { md5: string };
  let baseBeforeCommit: fs.Stats;

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('guest-writes');
    base = sparseFile(path.join(dir, 'base.img'), diskBytes);
    cow = path.join(dir, 'disk.cow');
    const created = await ubdcow(['create', cow, base]);
    expect(created.status, created.stderr).toBe(0);
    const result = expectGuestOk(await lab.run(guestBody, { disks: { b: `${cow},${base}` } }));
    files = filesWritten(result);
    files.delete('many/f7');
    out = path.join(dir, 'out.img');
    cowBeforeCommit = { md5: md5OfFile(cow) };
    baseBeforeCommit = fs.statSync(base);
    const commit = await ubdcow(['commit', cow, out]);
    expect(commit.status, commit.stderr).toBe(0);
  }, umlTestTimeout);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('every file the guest wrote reads back from OUT with the checksum the guest computed', async () => {
    expect(files.size).toBe(30);
    for (const [file, expected] of files) {
      const contents = await debugfsCat(out, file);
      expect(contents.length, file).toBe(expected.bytes);
      expect(md5(contents), file).toBe(expected.md5);
    }
  });

  it('the removed file is gone and e2fsck -fn finds OUT clean', async () => {
    const listing = await runProgram('debugfs', ['-R', 'ls -l /many', out]);
    expect(listing.stdout).toContain('f6');
    expect(listing.stdout).not.toMatch(/\bf7\b/);
    const fsck = await e2fsckReadOnly(out);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
  });

  it('OUT is what uml_moo makes of the same COW, byte for byte', async () => {
    const moo = path.join(dir, 'moo.img');
    const result = await runProgram('uml_moo', [cow, moo]);
    expect(result.status, result.stderr).toBe(0);
    expect(fs.statSync(out).size).toBe(diskBytes);
    expect(md5OfFile(out)).toBe(md5OfFile(moo));
  });

  it('commit OUT left the COW and the backing file alone', () => {
    expect(md5OfFile(cow)).toBe(cowBeforeCommit.md5);
    expect(fs.statSync(base).mtimeMs).toBe(baseBeforeCommit.mtimeMs);
    expect(fs.readFileSync(base).every((byte) => byte === 0)).toBe(true);
  });

  it('inspect, map and diff --allocated agree with the bitmap the kernel wrote', async () => {
    const bitmap = kernelBitmapRuns(cow);
    const bitmapSectors = bitmap.runs.reduce((sum, run) => sum + run.end - run.start, 0);
    const bitmapRanges = bitmap.runs.map((run) => ({ offset: run.start * 512, length: (run.end - run.start) * 512 }));
    expect(bitmap.runs.some((run) => run.start % 8 !== 0 || run.end % 8 !== 0), 'sub-byte runs').toBe(true);

    const { value: inspect } = await ubdcowJson(['inspect', cow]);
    const { value: map } = await ubdcowJson(['map', cow]);
    const { status, value: allocated } = await ubdcowJson(['diff', cow, '--allocated'], [0, 1]);

    expect(inspect.allocated.sectors).toBe(bitmapSectors);
    expect(inspect.allocated.bytes).toBe(bitmapSectors * 512);
    expect(inspect.extents).toBe(bitmap.runs.length);
    expect(map.allocatedBytes).toBe(inspect.allocated.bytes);
    expect(map.extents.map((e: { offset: number; length: number }) => ({ offset: e.offset, length: e.length }))).toEqual(bitmapRanges);
    for (const extent of map.extents) expect(extent.cowOffset).toBe(inspect.dataOffset + extent.offset);
    expect(status).toBe(1);
    expect(allocated.ranges).toEqual(bitmapRanges);
    expect(allocated.differingBytes).toBe(map.allocatedBytes);
  });

  it('diff COW against its backing finds exactly where OUT differs from the (all-zero) backing', async () => {
    // Whole sectors (--sectors): the truth below is computed a sector at a time.
    const { status, value } = await ubdcowJson(['diff', '--sectors', cow], [0, 1]);
    expect(status).toBe(1);
    const naive = await ubdcowJson(['diff', '--sectors', out, base], [0, 1]);
    expect(value.ranges).toEqual(naive.value.ranges);
    // And independently of ubdcow: OUT's non-zero sectors are exactly those ranges.
    const image = fs.readFileSync(out);
    const nonZero: { offset: number; length: number }[] = [];
    for (let offset = 0; offset < image.length; offset += 512) {
      if (!image.subarray(offset, offset + 512).some((byte) => byte !== 0)) continue;
      const last = nonZero.at(-1);
      if (last && last.offset + last.length === offset) last.length += 512;
      else nonZero.push({ offset, length: 512 });
    }
    expect(value.ranges.map(({ offset, length }: { offset: number; length: number }) => ({ offset, length }))).toEqual(nonZero);
  });
});
