/**
 * Issue 22 with a real guest: a UML writes two files on an ext2 COW and deletes one (its blocks are
 * free but their junk stays in the COW). `sparsify` drops that junk; a guest then boots on the
 * sparsified COW and reads the kept file's md5. `rebase --rewrite` moves the COW onto a base that
 * differs in free blocks and under the kept file; a guest booting with `ubdb=COW` alone (the
 * kernel takes the backing from the header, checking its size and mtime) reads the same md5, and
 * uml_moo's merge is the disk it was before, byte for byte.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UmlLab, e2fsckReadOnly, expectGuestOk, filesWritten, markersNamed, missingUmlTools, runProgram, ubdcowJson, umlSuiteTitle, umlTestTimeout } from './harness.js';

const missing = missingUmlTools('uml_moo', 'dumpe2fs');

const writeBody = `
mount -t ext2 /dev/ubdb /mnt
put /mnt kept.bin 4096 64
put /mnt gone.bin 4096 512
sync
rm /mnt/gone.bin
umount /mnt
`;

const readBody = `
mount -t ext2 -o ro /dev/ubdb /mnt
sumfile /mnt kept.bin
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('sparsify and rebase --rewrite: a UML guest reads its files afterwards', missing), () => {
  let lab: UmlLab;

  beforeAll(() => {
    lab = UmlLab.create();
  });
  afterAll(() => lab?.dispose());

  it(
    'guest-written COW: sparsify drops the deleted file, rebase --rewrite moves it; the guest reads kept.bin the same',
    async () => {
      const dir = lab.scratch('fleet');
      const base = path.join(dir, 'base.img');
      const made = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', '4096', base, '32M']);
      expect(made.status, made.stderr).toBe(0);
      fs.utimesSync(base, 1_600_000_000, 1_600_000_000);
      const cow = path.join(dir, 'vm.cow');
      const wrote = expectGuestOk(await lab.run(writeBody, { disks: { b: `${cow},${base}` } }));
      const kept = filesWritten(wrote).get('kept.bin')!;

      const sparsified = await ubdcowJson(['sparsify', cow]);
      expect(sparsified.value.fileSystem).toMatchObject({ kind: 'ext2' });
      // gone.bin's 2 MiB were in the COW and are in free blocks now.
      expect(sparsified.value.dropped.freeBytes).toBeGreaterThanOrEqual(512 * 4096);
      expect(sparsified.value.onDisk.after).toBeLessThanOrEqual(sparsified.value.onDisk.before - 2 * 1024 * 1024);
      const merged = path.join(dir, 'merged.img');
      execFileSync('uml_moo', [cow, merged], { stdio: 'ignore' });
      expect((await e2fsckReadOnly(merged)).status).toBe(0);
      const read1 = expectGuestOk(await lab.run(readBody, { disks: { b: `${cow},${base}` } }));
      expect(markersNamed(read1, 'read')).toEqual([['kept.bin', kept.md5, String(kept.bytes)]]);

      // A new base: the old one with junk in free blocks and over the blocks of kept.bin.
      const newBase = path.join(dir, 'base-v2.img');
      const bytes = fs.readFileSync(base);
      // Free in the guest's file system as it is now (not in the old base: the guest's files land
      // where ext2's allocator puts them, which depends on the writer's pid), so the COW holds none
      // of these blocks and rebase --rewrite must copy them in from the old base.
      const dumped = execFileSync('dumpe2fs', [merged], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
      const ranges = [...dumped.matchAll(/^\s*Free blocks: (.+)$/gm)].flatMap((line) => [...line[1]!.matchAll(/(\d+)-(\d+)/g)].map((m) => [Number(m[1]), Number(m[2])] as const));
      const free = ranges.find(([first, last]) => last - first + 1 >= 8)!;
      randomFillSync(bytes, free[0] * 4096, 8 * 4096);
      const keptBlocks = execFileSync('debugfs', ['-R', 'blocks /kept.bin', merged], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim().split(/\s+/).map(Number);
      randomFillSync(bytes, keptBlocks[0]! * 4096, 4096);
      fs.writeFileSync(newBase, bytes);
      const rebased = await ubdcowJson(['rebase', '--rewrite', cow, newBase]);
      expect(rebased.value.cows[0].copiedBytes).toBeGreaterThanOrEqual(8 * 4096);
      const mergedAfter = path.join(dir, 'merged-after.img');
      execFileSync('uml_moo', [cow, mergedAfter], { stdio: 'ignore' });
      expect(fs.readFileSync(mergedAfter).equals(fs.readFileSync(merged))).toBe(true);
      fs.rmSync(base); // the guest can only read the new base
      const read2 = expectGuestOk(await lab.run(readBody, { disks: { b: cow } }));
      expect(markersNamed(read2, 'read')).toEqual([['kept.bin', kept.md5, String(kept.bytes)]]);
    },
    umlTestTimeout,
  );
});
