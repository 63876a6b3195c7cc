/**
 * Scenario 2: `ubdcow commit COW` merges into the backing file in place and empties the COW; a
 * second guest boots on the emptied COW over the new base (the kernel accepts the re-pointed
 * header), sees the first generation's files, writes a second generation, and a second commit
 * keeps both. Each merge is compared with what `uml_moo -d` makes of copies of the same files.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  UmlLab,
  allocatedFileRanges,
  debugfsCat,
  e2fsckReadOnly,
  expectGuestOk,
  filesWritten,
  type GuestResult,
  kernelBitmapRuns,
  markersNamed,
  md5,
  md5OfFile,
  missingUmlTools,
  runProgram,
  ubdcow,
  ubdcowJson,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';

const missing = missingUmlTools('uml_moo', 'filefrag');

/* 4 KiB blocks: every file system block is a whole page, so the guest's reads never mix COW and
 * backing sectors inside one page (the case this kernel can get wrong, see docs/uml.md). In
 * generation 2 the guest reads generation 1's files before it writes anything, i.e. straight from
 * the new backing file. */
const guestBody = `
mount -t ext2 /dev/ubdb /mnt
if [ "$GENERATION" = 1 ]; then
  put /mnt gen1/a.bin 4096 3
  put /mnt gen1/b.bin 1000 77
  put /mnt gen1/c.txt 1 5
else
  for f in seed.txt gen1/a.bin gen1/b.bin gen1/c.txt; do sumfile /mnt $f; done
  ls /mnt/gen1 | while read name; do mark listed gen1/$name; done
  put /mnt gen2/a.bin 65536 5
  put /mnt gen2/b.bin 3333 3
  rm /mnt/gen1/c.txt
fi
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('ubdcow commit COW in place, then a second guest on the emptied COW', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  let cow: string;
  let seedMd5: string;
  const written = new Map<string, { md5: string; bytes: number }>();
  let second: GuestResult;

  /**
   * Runs `uml_moo -d` on copies of COW and backing: the reference for an in-place merge. The COW
   * copy is removed afterwards: it still names base.img, and ubdcow refuses to merge in place into
   * a backing file that another COW next to it depends on.
   */
  async function mooInPlaceReference(name: string): Promise<string> {
    const referenceDir = lab.scratch(`reference-${name}`);
    const baseCopy = path.join(referenceDir, 'base.img');
    const cowCopy = path.join(referenceDir, 'disk.cow');
    fs.copyFileSync(base, baseCopy);
    const { atime, mtime } = fs.statSync(base);
    fs.utimesSync(baseCopy, atime, mtime); // uml_moo checks the backing mtime against the header
    fs.copyFileSync(cow, cowCopy);
    const result = await runProgram('uml_moo', ['-d', '-b', baseCopy, cowCopy]);
    expect(result.status, result.stderr).toBe(0);
    fs.rmSync(cowCopy);
    return baseCopy;
  }

  async function commitInPlace(referenceName: string): Promise<void> {
    const reference = await mooInPlaceReference(referenceName);
    const { value } = await ubdcowJson(['commit', cow]);
    expect(value).toMatchObject({ mode: 'in-place', emptied: true, output: base });
    expect(md5OfFile(base), 'ubdcow commit and uml_moo -d agree').toBe(md5OfFile(reference));
  }

  async function bootGeneration(generation: number): Promise<GuestResult> {
    const result = expectGuestOk(await lab.run(guestBody, { disks: { b: `${cow},${base}` }, env: { GENERATION: String(generation) } }));
    for (const [file, info] of filesWritten(result)) written.set(file, info);
    return result;
  }

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('in-place');
    const seed = path.join(dir, 'seed');
    fs.mkdirSync(seed);
    const seedText = 'generation 0, made on the host\n'.repeat(300);
    fs.writeFileSync(path.join(seed, 'seed.txt'), seedText);
    seedMd5 = md5(Buffer.from(seedText));
    base = path.join(dir, 'base.img');
    const mkfs = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', '4096', '-d', seed, base, '32M']);
    expect(mkfs.status, mkfs.stderr).toBe(0);
    cow = path.join(dir, 'disk.cow');
    expect((await ubdcow(['create', cow, base])).status).toBe(0);

    await bootGeneration(1);
    await commitInPlace('first');
    second = await bootGeneration(2);
    await commitInPlace('second');
  }, umlTestTimeout);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('the second guest booted on the emptied COW and read generation 1 from the merged backing', () => {
    const reads = new Map(markersNamed(second, 'read').map(([file, sum, bytes]) => [file!, { md5: sum!, bytes: Number(bytes) }]));
    expect(reads.get('seed.txt')).toEqual({ md5: seedMd5, bytes: 9300 });
    for (const file of ['gen1/a.bin', 'gen1/b.bin', 'gen1/c.txt']) expect(reads.get(file), file).toEqual(written.get(file));
    expect(markersNamed(second, 'listed').map(([file]) => file).sort()).toEqual(['gen1/a.bin', 'gen1/b.bin', 'gen1/c.txt']);
  });

  it('after the second commit the backing file holds both generations and the host seed', async () => {
    written.delete('gen1/c.txt');
    expect([...written.keys()].sort()).toEqual(['gen1/a.bin', 'gen1/b.bin', 'gen2/a.bin', 'gen2/b.bin']);
    for (const [file, expected] of written) {
      const contents = await debugfsCat(base, file);
      expect(contents.length, file).toBe(expected.bytes);
      expect(md5(contents), file).toBe(expected.md5);
    }
    expect(md5(await debugfsCat(base, 'seed.txt'))).toBe(seedMd5);
    const removed = await runProgram('debugfs', ['-R', 'ls /gen1', base]);
    expect(removed.stdout).not.toContain('c.txt');
    const fsck = await e2fsckReadOnly(base);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
  });

  it('the COW is empty again, matches its backing, and check finds nothing wrong', async () => {
    expect(kernelBitmapRuns(cow).runs).toEqual([]);
    const { value: inspect } = await ubdcowJson(['inspect', cow]);
    expect(inspect.allocated.sectors).toBe(0);
    expect(inspect.backing.state).toBe('ok');
    expect(inspect.mtime).toBe(Math.floor(fs.statSync(base).mtimeMs / 1000));
    const dataBlocks = (await allocatedFileRanges(cow)).filter((range) => range.offset + range.length > inspect.dataOffset);
    expect(dataBlocks, 'the data area was given back to the file system').toEqual([]);
    const { value: check } = await ubdcowJson(['check', cow]);
    expect(check).toMatchObject({ clean: true, problems: [] });
    const { status, value: diff } = await ubdcowJson(['diff', cow], [0, 1]);
    expect(status).toBe(0);
    expect(diff.identical).toBe(true);
    expect(fs.existsSync(`${cow}.ubdcow-commit`), 'journal removed').toBe(false);
  });
});
