/**
 * A real UML guest boots on a COW `ubdcow customize` changed (ext4 with metadata_csum and 64bit
 * over a shared base): its kernel mounts the file system, reads every customized file with the
 * checksum the host expects (mode, owner and symlink target too), then keeps writing: new files,
 * a removal, into the directories customize made; unmounts. e2fsck is clean afterwards and the
 * guest's files read back on the host. The base file is never written.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { UmlLab, debugfsCat, expectGuestOk, filesWritten, markersNamed, md5, missingUmlTools, ubdcow, umlSuiteTitle, umlTestTimeout, type GuestResult } from './harness.js';
import { baseAndCow, flatten, fsConfigs, fsckClean } from '../helpers/customize-fixtures.js';
import { sha256 } from '../helpers/cow-fixtures.js';

const missing = missingUmlTools();

const guestBody = `
mount -t ext4 /dev/ubdb /mnt
for f in srv/app/payload.bin etc/app.conf etc/hostname etc/motd root/.ssh/authorized_keys srv/app/link; do sumfile /mnt $f; done
for f in srv/app srv/app/payload.bin etc/app.conf root/.ssh root/.ssh/authorized_keys; do mark meta $f $(stat -c '%a %u %g' /mnt/$f); done
mark target $(readlink /mnt/srv/app/link)
mark copied $(stat -c '%Y %a' /mnt/opt/bundle/tool) $(cat /mnt/opt/bundle/tool)
test ! -e /mnt/etc/gone.txt && mark gone etc/gone.txt
put /mnt srv/app/guest-new.bin 4096 300
put /mnt srv/app/sub/small 100 1
i=0
while [ $i -lt 40 ]; do put /mnt etc/many/guest-$i 1000 2; i=$((i + 1)); done
rm /mnt/srv/app/payload.bin
mark removed srv/app/payload.bin
umount /mnt
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('a UML guest boots a customized COW, reads the changes and keeps writing', missing), () => {
  let lab: UmlLab;
  let dir: string;
  let cow: string;
  let baseHash: string;
  let payload: Buffer;
  let result: GuestResult;

  beforeAll(async () => {
    lab = UmlLab.create();
    dir = lab.scratch('customize-boot');
    const made = await baseAndCow(dir, fsConfigs[2]!);
    cow = made.cow;
    baseHash = sha256(made.base);
    payload = Buffer.alloc(5 << 20);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 2654435761) >>> 24;
    fs.writeFileSync(path.join(dir, 'payload.bin'), payload);
    fs.chmodSync(path.join(dir, 'payload.bin'), 0o640);
    // A copied tree whose times customize writes into the inodes itself (checksums recomputed): the kernel must accept them.
    const bundle = path.join(dir, 'bundle');
    fs.mkdirSync(bundle);
    fs.writeFileSync(path.join(bundle, 'tool'), 'copied');
    fs.chmodSync(path.join(bundle, 'tool'), 0o751);
    fs.utimesSync(path.join(bundle, 'tool'), 1_500_000_000, 1_600_000_000);
    const customized = await ubdcow([
      'customize', cow,
      '--mkdir', '/srv/app',
      '--upload', `${path.join(dir, 'payload.bin')}:/srv/app`,
      '--write', '/etc/app.conf:port=8080',
      '--chmod', '0600:/etc/app.conf',
      '--chown', '1000:1000:/srv/app',
      '--link', 'payload.bin:/srv/app/link',
      '--hostname', 'vm-7',
      '--append-line', '/etc/motd:welcome',
      '--delete', '/etc/gone.txt',
      '--ssh-inject', 'root:string:ssh-ed25519 AAAAkey root@host',
      '--mkdir', '/opt',
      '--copy-in', `${bundle}:/opt`,
    ]);
    expect(customized.status, customized.stderr).toBe(0);
    result = expectGuestOk(await lab.run(guestBody, { disks: { b: `${cow},${made.base}` } }));
  }, umlTestTimeout);
  afterEach(() => lab.killGuests());
  afterAll(() => lab?.dispose());

  it('the guest kernel reads every customized file, mode, owner and link target as written', () => {
    const read = new Map(markersNamed(result, 'read').map(([file, sum, bytes]) => [file!, { sum, bytes: Number(bytes) }]));
    expect(read.get('srv/app/payload.bin')).toEqual({ sum: md5(payload), bytes: payload.length });
    expect(read.get('srv/app/link')).toEqual({ sum: md5(payload), bytes: payload.length });
    expect(read.get('etc/app.conf')).toEqual({ sum: md5(Buffer.from('port=8080')), bytes: 9 });
    expect(read.get('etc/hostname')).toEqual({ sum: md5(Buffer.from('vm-7\n')), bytes: 5 });
    expect(read.get('etc/motd')).toEqual({ sum: md5(Buffer.from('no newline at the end\nwelcome\n')), bytes: 30 });
    expect(read.get('root/.ssh/authorized_keys')?.sum).toBe(md5(Buffer.from('ssh-ed25519 AAAAkey root@host\n')));
    const meta = new Map(markersNamed(result, 'meta').map(([file, ...rest]) => [file!, rest.join(' ')]));
    expect(Object.fromEntries(meta)).toEqual({
      'srv/app': '755 1000 1000',
      'srv/app/payload.bin': `640 ${process.getuid!()} ${process.getgid!()}`,
      'etc/app.conf': '600 0 0',
      'root/.ssh': '700 0 0',
      'root/.ssh/authorized_keys': '600 0 0',
    });
    expect(markersNamed(result, 'target')).toEqual([['payload.bin']]);
    expect(markersNamed(result, 'gone')).toEqual([['etc/gone.txt']]);
    expect(markersNamed(result, 'copied')).toEqual([['1600000000', '751', 'copied']]);
  });

  it('after the guest wrote more files, e2fsck is clean and they read back on the host; the base is untouched', async () => {
    const flat = await flatten(cow, path.join(dir, 'flat.img'));
    await fsckClean(flat);
    const written = filesWritten(result);
    expect(written.size).toBe(42);
    for (const [file, expected] of written) expect(md5(await debugfsCat(flat, file)), file).toBe(expected.md5);
    expect(sha256(path.join(dir, 'base.img'))).toBe(baseHash);
  });
});
