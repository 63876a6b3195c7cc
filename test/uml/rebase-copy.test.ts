/**
 * `rebase` onto a plain copy of the base (`cp`, so a new mtime) must leave a COW the kernel opens:
 * the new backing's mtime is stored, with --unsafe (the user vouches) or --compare (contents
 * proved equal). Before, the header kept the old mtime and UML refused the COW ("mtime mismatch").
 * The guest is given `ubdb=COW` alone, so the kernel reads the backing path from the header.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UmlLab, expectGuestOk, filesWritten, markersNamed, missingUmlTools, runProgram, ubdcow, umlSuiteTitle, umlTestTimeout } from './harness.js';

const missing = missingUmlTools();

const writeBody = `
mount -t ext2 /dev/ubdb /mnt
put /mnt kept.bin 4096 4
umount /mnt
`;

const readBody = `
mount -t ext2 -o ro /dev/ubdb /mnt
sumfile /mnt kept.bin
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('ubdcow rebase onto a copied base leaves a COW UML opens', missing), () => {
  let lab: UmlLab;

  beforeAll(() => {
    lab = UmlLab.create();
  });
  afterAll(() => lab?.dispose());

  async function guestWroteFile(dir: string): Promise<{ cow: string; base: string; md5: string }> {
    const base = path.join(dir, 'base.img');
    const made = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', '4096', base, '16M']);
    expect(made.status, made.stderr).toBe(0);
    fs.utimesSync(base, 1_600_000_000, 1_600_000_000);
    const cow = path.join(dir, 'vm.cow');
    expect((await ubdcow(['create', cow, base])).status).toBe(0);
    const wrote = expectGuestOk(await lab.run(writeBody, { disks: { b: `${cow},${base}` } }));
    return { cow, base, md5: filesWritten(wrote).get('kept.bin')!.md5 };
  }

  for (const how of ['-u', '--compare'] as const) {
    it(
      `rebase ${how} onto cp of the base: the guest opens the COW and reads what it wrote`,
      async () => {
        const dir = lab.scratch(`rebase${how}`);
        const { cow, base, md5 } = await guestWroteFile(dir);
        const copy = path.join(dir, 'copy.img');
        fs.copyFileSync(base, copy); // a new mtime, as a plain cp gives
        const rebased = await ubdcow(['rebase', how, cow, copy]);
        expect(rebased.status, rebased.stderr).toBe(0);
        expect(rebased.stdout).toMatch(/stored its mtime \d+, so UML accepts it/);
        fs.rmSync(base); // the guest can only have read the copy
        const read = expectGuestOk(await lab.run(readBody, { disks: { b: cow } }));
        expect(markersNamed(read, 'read')).toEqual([['kept.bin', md5, '16384']]);
      },
      umlTestTimeout,
    );
  }
});
