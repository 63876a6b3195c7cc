/**
 * Scenario 3: a COW written through ubdcow's engine (`openCow`) is a disk the UML kernel reads.
 * The host builds an ext2 image with `mke2fs -d`, copies it through the engine into a COW over an
 * all-zero backing (unaligned, concurrent writes), and a guest mounts the COW and checksums the
 * files. The guest then writes a file of its own, and the engine reads the kernel's COW back.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openCow } from '../../src/index.js';
import {
  UmlLab,
  debugfsCat,
  e2fsckReadOnly,
  expectGuestOk,
  filesWritten,
  type GuestResult,
  type SectorRun,
  kernelBitmapRuns,
  markersNamed,
  md5,
  md5OfFile,
  missingUmlTools,
  runProgram,
  sparseFile,
  ubdcow,
  ubdcowJson,
  ubdcowToFile,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';

const missing = missingUmlTools('uml_moo');
const diskBytes = 16 << 20;
const blockBytes = 4096;

/** Seed files: sizes around block and sector edges. */
const seedSizes: Record<string, number> = {
  'empty.txt': 0,
  'one.txt': 1,
  'sector.bin': 512,
  'block.bin': 4096,
  'block-plus-one.bin': 4097,
  'dir/odd.bin': 77_777,
  'dir/sub/large.bin': 1_500_000,
};

/* Reads first, while the whole file system is in the COW; then one write of the guest's own. */
const guestBody = `
mount -t ext2 /dev/ubdb /mnt
find /mnt -type f | sort | while read f; do sumfile /mnt "\${f#/mnt/}"; done
put /mnt from-guest.bin 8192 3
umount /mnt
`;

/**
 * Copies the non-zero 4 KiB blocks of `image` into the device: runs of them, cut into writes of
 * uneven lengths (1 byte to 40 KB) that mostly start and end inside sectors, eight in flight.
 * Returns the runs and the number of writes.
 */
async function copyThroughEngine(
  image: Buffer,
  device: { write(offset: number, data: Uint8Array): Promise<void> },
): Promise<{ runs: { offset: number; length: number }[]; writes: number }> {
  const runs: { offset: number; length: number }[] = [];
  for (let offset = 0; offset < image.length; offset += blockBytes) {
    if (!image.subarray(offset, offset + blockBytes).some((byte) => byte !== 0)) continue;
    const last = runs.at(-1);
    if (last && last.offset + last.length === offset) last.length += blockBytes;
    else runs.push({ offset, length: blockBytes });
  }
  const pieces: { offset: number; length: number }[] = [];
  for (const run of runs) {
    for (let offset = run.offset, end = run.offset + run.length; offset < end; ) {
      const length = Math.min(end - offset, 1 + ((pieces.length * 7919) % 40_000));
      pieces.push({ offset, length });
      offset += length;
    }
  }
  let next = 0;
  const worker = async () => {
    while (next < pieces.length) {
      const piece = pieces[next++]!;
      await device.write(piece.offset, image.subarray(piece.offset, piece.offset + piece.length));
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  return { runs, writes: pieces.length };
}

describe.skipIf(missing.length > 0)(umlSuiteTitle('a COW written by the engine boots in UML', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  let cow: string;
  let fsImage: string;
  const seedMd5 = new Map<string, string>();
  let guest: GuestResult;
  let writtenRuns: { offset: number; length: number }[] = [];
  let writes = 0;
  const beforeBoot = { catMd5: '', bitmap: [] as SectorRun[] };

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('engine');
    const seed = path.join(dir, 'seed');
    for (const [file, bytes] of Object.entries(seedSizes)) {
      const data = randomBytes(bytes);
      fs.mkdirSync(path.dirname(path.join(seed, file)), { recursive: true });
      fs.writeFileSync(path.join(seed, file), data);
      seedMd5.set(file, md5(data));
    }
    fsImage = path.join(dir, 'fs.img');
    const mkfs = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', String(blockBytes), '-d', seed, fsImage, `${diskBytes >> 10}k`]);
    expect(mkfs.status, mkfs.stderr).toBe(0);
    expect(fs.statSync(fsImage).size).toBe(diskBytes);

    base = sparseFile(path.join(dir, 'zero-base.img'), diskBytes);
    cow = path.join(dir, 'engine.cow');
    expect((await ubdcow(['create', cow, base])).status).toBe(0);
    const device = await openCow(cow);
    try {
      ({ runs: writtenRuns, writes } = await copyThroughEngine(fs.readFileSync(fsImage), device));
      await device.flush();
    } finally {
      await device.close();
    }
    const catted = path.join(dir, 'before-boot.img');
    expect((await ubdcowToFile(['cat', cow], catted)).status).toBe(0);
    beforeBoot.catMd5 = md5OfFile(catted);
    beforeBoot.bitmap = kernelBitmapRuns(cow).runs;
    guest = expectGuestOk(await lab.run(guestBody, { disks: { b: `${cow},${base}` } }));
  }, umlTestTimeout);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('before the guest ran, the COW read as fs.img and its bitmap covered exactly the written blocks', () => {
    expect(beforeBoot.catMd5).toBe(md5OfFile(fsImage));
    expect(beforeBoot.bitmap).toEqual(writtenRuns.map((run) => ({ start: run.offset / 512, end: (run.offset + run.length) / 512 })));
    expect(writes).toBeGreaterThan(50);
  });

  it('the guest mounted the engine-written COW and read every file with the right checksum', () => {
    const reads = new Map(markersNamed(guest, 'read').map(([file, sum, bytes]) => [file!, { md5: sum!, bytes: Number(bytes) }]));
    expect([...reads.keys()].sort()).toEqual(Object.keys(seedSizes).sort());
    for (const [file, bytes] of Object.entries(seedSizes)) {
      expect(reads.get(file), file).toEqual({ md5: seedMd5.get(file), bytes });
    }
  });

  it('after the guest wrote to it, commit, cat, uml_moo and the engine all read the same disk', async () => {
    const out = path.join(dir, 'out.img');
    const commit = await ubdcow(['commit', cow, out]);
    expect(commit.status, commit.stderr).toBe(0);
    const moo = path.join(dir, 'moo.img');
    expect((await runProgram('uml_moo', [cow, moo])).status).toBe(0);
    const catted = path.join(dir, 'cat.img');
    expect((await ubdcowToFile(['cat', cow], catted)).status).toBe(0);

    const device = await openCow(cow, { readOnly: true });
    let engineView: Uint8Array;
    try {
      engineView = await device.read(0, device.size);
    } finally {
      await device.close();
    }
    const expected = md5OfFile(moo);
    expect(md5OfFile(out)).toBe(expected);
    expect(md5OfFile(catted)).toBe(expected);
    expect(md5(engineView)).toBe(expected);

    const [file, info] = [...filesWritten(guest)][0]!;
    expect(md5(await debugfsCat(out, file))).toBe(info.md5);
    for (const [seedFile, sum] of seedMd5) expect(md5(await debugfsCat(out, seedFile)), seedFile).toBe(sum);
    const fsck = await e2fsckReadOnly(out);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
  });

  it('check finds the engine- and kernel-written COW clean', async () => {
    const { value } = await ubdcowJson(['check', cow]);
    expect(value).toMatchObject({ clean: true, problems: [], inUse: false });
  });
});
