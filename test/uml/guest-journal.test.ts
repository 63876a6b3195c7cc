/**
 * A real kernel's journal: a UML guest changes files on an ext4 disk (a COW over a base made with
 * `mke2fs -d`), forces a journal commit with fsync, and is powered off without unmount or sync.
 * The disk then needs recovery; ubdcow replays the journal in memory, and its `ls`, `get` and
 * `diff --files` must match the merged image after `e2fsck -fy` replayed the journal on a copy.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { UmlLab, debugfsCat, markersNamed, md5, md5OfFile, missingUmlTools, runProgram, ubdcow, umlSuiteTitle, umlTestTimeout } from './harness.js';
import { debugfsListing, lsJsonListing } from '../helpers/debugfs-listing.js';

const missing = missingUmlTools('dumpe2fs');

/* Changes, one fsync to commit the running transaction (all of them), then power off at once. */
const killedGuest = `
mount -t ext4 /dev/ubdb /mnt
put /mnt new/journaled.bin 4096 5
mkdir /mnt/newdir
echo rewritten > /mnt/data/append.txt
rm /mnt/data/delete.txt
mv /mnt/data/old-name.txt /mnt/data/new-name.txt
chmod 600 /mnt/data/mode.txt
sync /mnt/new/journaled.bin /mnt/data/append.txt
mark synced
poweroff -n -f
`;

/* The same, then hundreds of small transactions on a 1 MiB journal: the log wraps and checkpoints,
 * and removing directories logs revoke records for their freed blocks. */
const churningGuest = killedGuest.replace(
  'sync /mnt/new/journaled.bin',
  `i=0
while [ $i -lt 300 ]; do
  mkdir /mnt/churn$i
  echo $i > /mnt/churn$i/f
  sync /mnt/churn$i/f
  if [ $i -gt 0 ]; then rm -r /mnt/churn$((i - 1)); fi
  i=$((i + 1))
done
sync /mnt/new/journaled.bin`,
);

const cases = [
  { name: 'one transaction batch, 4 KiB blocks', body: killedGuest, mkfs: ['-b', '4096'], last: '/newdir' },
  { name: '300 transactions with revokes on a 1 MiB journal, 1 KiB blocks', body: churningGuest, mkfs: ['-b', '1024', '-J', 'size=1'], last: '/churn299' },
];

describe.skipIf(missing.length > 0)(umlSuiteTitle('a guest killed before unmount: the journal replayed in memory, against e2fsck', missing), () => {
  const lab = UmlLab.create();
  afterEach(() => lab.killGuests());
  afterAll(() => lab.dispose());

  for (const { name, body, mkfs, last } of cases) it(
    `${name}: ls -R, get and diff --files answer as the image after e2fsck replayed its journal, and say the journal was replayed`,
    async () => {
      const dir = lab.scratch('journal');
      const tree = path.join(dir, 'tree');
      fs.mkdirSync(path.join(tree, 'data'), { recursive: true });
      for (const name of ['append.txt', 'delete.txt', 'old-name.txt', 'mode.txt', 'untouched.txt']) fs.writeFileSync(path.join(tree, 'data', name), `${name}\n`);
      const base = path.join(dir, 'base.img');
      const mk = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext4', ...mkfs, '-d', tree, base, '64M']);
      expect(mk.status, mk.stderr).toBe(0);
      const cow = path.join(dir, 'vm.cow');
      expect((await ubdcow(['create', cow, base])).status).toBe(0);
      const result = await lab.run(body, { disks: { b: `${cow},${base}` }, timeoutMs: 120_000 });
      expect(markersNamed(result, 'synced'), result.console).toHaveLength(1);
      const [written] = markersNamed(result, 'file');
      expect(written![0]).toBe('new/journaled.bin');

      const merged = path.join(dir, 'merged.img');
      expect((await ubdcow(['commit', cow, merged])).status).toBe(0);
      expect((await runProgram('dumpe2fs', ['-h', merged])).stdout).toMatch(/^Filesystem features:.*needs_recovery/m);
      // Without replay the changes are not all there (debugfs does not replay): what the old
      // ubdcow showed, and why a replay is needed.
      expect((await debugfsListing(merged)).has(last)).toBe(false);
      const truth = path.join(dir, 'truth.img');
      fs.copyFileSync(merged, truth);
      const fsck = await runProgram('e2fsck', ['-fy', truth]);
      expect(fsck.stdout).toMatch(/recovering journal/);
      const truthListing = await debugfsListing(truth);
      expect(truthListing.has(last)).toBe(true);
      const before = [md5OfFile(cow), md5OfFile(base)];

      const ls = await ubdcow(['ls', cow, '-R', '--json']);
      expect(ls.status, ls.stderr).toBe(0);
      expect(ls.stderr).toMatch(/^ubdcow ls: warning: .*vm\.cow: the ext4 journal needed recovery .*replayed in memory \(\d+ transactions?, \d+ blocks?\)/);
      const listing = JSON.parse(ls.stdout);
      expect(listing.journal).toMatchObject({ file: cow });
      expect(listing.journal.transactions).toBeGreaterThan(0);
      const ours = lsJsonListing(ls.stdout);
      expect(ours).toEqual(truthListing);

      for (const file of ['/new/journaled.bin', '/data/append.txt', '/data/new-name.txt']) {
        const out = path.join(dir, 'out');
        const got = await ubdcow(['get', cow, file, '-o', out, '--force']);
        expect(got.status, got.stderr).toBe(0);
        expect(fs.readFileSync(out).equals(await debugfsCat(truth, file)), file).toBe(true);
        // The bytes the guest wrote, as it checksummed them while writing.
        if (file === '/new/journaled.bin') expect(md5(fs.readFileSync(out))).toBe(written![1]);
      }

      // The smart diff (COW against its backing) equals a full comparison of e2fsck's result with the base.
      const diff = await ubdcow(['diff', '--files', cow, '--json']);
      expect(diff.status, diff.stderr).toBe(1);
      const answer = JSON.parse(diff.stdout);
      expect(answer.mode).toBe('smart');
      expect(answer.journal).toEqual([listing.journal]);
      const reference = await ubdcow(['diff', '--files', truth, base, '--json']);
      expect(reference.status, reference.stderr).toBe(1);
      const paths = (changes: Array<{ path: string; change: string }>) => changes.map((c) => `${c.change} ${c.path}`);
      expect(paths(answer.changes)).toEqual(paths(JSON.parse(reference.stdout).changes));
      expect(paths(answer.changes)).toEqual(
        expect.arrayContaining(['removed /data/delete.txt', 'added /data/new-name.txt', 'modified /data/append.txt', 'added /newdir', 'added /new/journaled.bin', `added ${last}`]),
      );
      expect([md5OfFile(cow), md5OfFile(base)]).toEqual(before);
    },
    umlTestTimeout,
  );
});
