/**
 * Scenario 4: while a guest has its COW device open, the UML kernel holds a POSIX write lock on the
 * COW file, and ubdcow refuses to commit it (nothing changes); once the guest is gone the same
 * commit succeeds. And the other way round: while ubdcow's engine holds a COW, the kernel cannot
 * open that device.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { UbdcowError, openCow } from '../../src/index.js';
import {
  UmlLab,
  debugfsCat,
  e2fsckReadOnly,
  expectGuestOk,
  filesWritten,
  markersNamed,
  md5,
  md5OfFile,
  missingUmlTools,
  processesInGroup,
  runProgram,
  ubdcow,
  ubdcowJson,
  umlSuiteTitle,
  umlTestTimeout,
} from './harness.js';

const missing = missingUmlTools();

/* The mount keeps /dev/ubdb open (the kernel only opens, and locks, a ubd file while its device is
 * open); the guest then waits for a line on its console. */
const holdingBody = `
mount -t ext2 /dev/ubdb /mnt
put /mnt while-locked.bin 4096 5
sync
mark holding
read answer
mark released "$answer"
umount /mnt
`;

const probeBody = `
if dd if=/dev/ubdb of=/dev/null bs=4096 count=1 2>/dev/null; then mark opened; else mark refused; fi
`;

/** POSIX locks on `file` from /proc/locks: kind (READ/WRITE) and owner pid. */
function locksOn(file: string): { kind: string; pid: number }[] {
  const { dev, ino } = fs.statSync(file);
  const major = Math.floor(dev / 256) & 0xfff;
  const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${ino}`;
  return fs
    .readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .map((line) => line.trim().split(/\s+/))
    .filter((fields) => fields[1] === 'POSIX' && fields[5] === id)
    .map((fields) => ({ kind: fields[3]!, pid: Number(fields[4]) }));
}

describe.skipIf(missing.length > 0)(umlSuiteTitle('a running guest\'s COW is locked against ubdcow, and the reverse', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let base: string;
  let cow: string;

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('lock');
    base = path.join(dir, 'base.img');
    const mkfs = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext2', '-b', '4096', base, '16M']);
    expect(mkfs.status, mkfs.stderr).toBe(0);
    cow = path.join(dir, 'disk.cow');
    expect((await ubdcow(['create', cow, base])).status).toBe(0);
  });
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('commit is refused while the guest runs, and works after it exits', async () => {
    const guest = await lab.boot(holdingBody, { disks: { b: `${cow},${base}` }, interactive: true });
    const holding = await guest.waitForMarker('holding');
    expect(holding, 'the guest reached its waiting point').toEqual(['holding']);

    // The kernel's lock, as the system sees it: a write lock on the COW (and a read lock on the backing).
    const cowLocks = locksOn(cow);
    expect(cowLocks.map((lock) => lock.kind)).toEqual(['WRITE']);
    expect(processesInGroup(guest.pid)).toContain(cowLocks[0]!.pid);
    expect(locksOn(base).map((lock) => lock.kind)).toEqual(['READ']);

    const cowBefore = md5OfFile(cow);
    const baseBefore = md5OfFile(base);
    const out = path.join(dir, 'out.img');
    const toNewFile = await ubdcow(['commit', cow, out]);
    expect(toNewFile.status).not.toBe(0);
    expect(toNewFile.stderr).toMatch(/^ubdcow commit: .*in use/);
    // The holder is named: the UML kernel (the pid that holds the lock), not another program.
    expect(toNewFile.stderr).toContain(`a running UML holds a lock on it, pid ${cowLocks[0]!.pid};`);
    expect(toNewFile.stderr.trim().split('\n')).toHaveLength(1);
    expect(fs.existsSync(out)).toBe(false);

    const inPlace = await ubdcow(['commit', cow]);
    expect(inPlace.status).not.toBe(0);
    expect(inPlace.stderr).toMatch(/in use/);
    expect(md5OfFile(cow)).toBe(cowBefore);
    expect(md5OfFile(base)).toBe(baseBefore);
    expect(fs.existsSync(`${cow}.ubdcow-commit`)).toBe(false);

    const { value: check } = await ubdcowJson(['check', cow], [0, 1]);
    expect(check.inUse).toBe(true);
    await expect(openCow(cow)).rejects.toSatisfy((err) => err instanceof UbdcowError && err.code === 'locked');

    guest.send('go');
    const result = expectGuestOk(await guest.done);
    expect(markersNamed(result, 'released')).toEqual([['go']]);
    expect(processesInGroup(guest.pid), 'no process of the guest is left').toEqual([]);
    expect(locksOn(cow)).toEqual([]);

    const commit = await ubdcow(['commit', cow, out]);
    expect(commit.status, commit.stderr).toBe(0);
    const [file, info] = [...filesWritten(result)][0]!;
    expect(md5(await debugfsCat(out, file))).toBe(info.md5);
    expect((await e2fsckReadOnly(out)).status).toBe(0);
  }, umlTestTimeout);

  it('while the engine holds the COW, the guest cannot open the device', async () => {
    const device = await openCow(cow);
    let refused;
    try {
      refused = expectGuestOk(await lab.run(probeBody, { disks: { b: `${cow},${base}` } }));
    } finally {
      await device.close();
    }
    expect(markersNamed(refused, 'refused')).toEqual([[]]);
    const opened = expectGuestOk(await lab.run(probeBody, { disks: { b: `${cow},${base}` } }));
    expect(markersNamed(opened, 'opened')).toEqual([[]]);
  }, umlTestTimeout);
});
