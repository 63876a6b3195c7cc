/**
 * `ubdcow customize` as a user runs it: operations in the order given across different repeated
 * options and --commands-from-file, --ssh-inject and --copy-in checked with debugfs, `diff --files`
 * naming exactly the changed paths, --json, and one-line errors.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { debugfsCat, ubdcow } from '../uml/harness.js';
import { debugfsListing } from '../helpers/debugfs-listing.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { baseAndCow, debugfsStat, flatten, fsConfigs, fsckClean } from '../helpers/customize-fixtures.js';

const missing = missingTools('mke2fs', 'debugfs', 'e2fsck');
const ext4 = fsConfigs[2]!;

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow customize (CLI)', missing), () => {
  const tmp = useTempDir();

  it('applies mixed repeated options and a commands file in argument order', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const commands = path.join(tmp.path, 'ops.txt');
    fs.writeFileSync(commands, ['# from a file', 'append-line /etc/f:from-file', '', 'write /etc/g:\\', 'continued'].join('\n'));
    const result = await ubdcow(['customize', cow, '--write', '/etc/f:a', '--append-line=/etc/f:b', '--commands-from-file', commands, '--write', '/etc/h:c', '--append-line', '/etc/f:d']);
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout.split('\n')[0]).toBe('--write /etc/f:a  -> /etc/f');
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    expect((await debugfsCat(flat, '/etc/f')).toString()).toBe('a\nb\nfrom-file\nd\n');
    expect((await debugfsCat(flat, '/etc/g')).toString()).toBe('continued');
  });

  it('--ssh-inject creates ~/.ssh 0700 and authorized_keys 0600 owned by the user, once per key', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const keyFile = path.join(tmp.path, 'root.pub');
    fs.writeFileSync(keyFile, 'ssh-ed25519 AAAAroot root@host\n');
    const key = 'ssh-ed25519 AAAAalice alice@host';
    const args = ['customize', cow, '--ssh-inject', `alice:string:${key}`, '--ssh-inject', `root:file:${keyFile}`, '--ssh-inject', `alice:string:${key}`];
    const result = await ubdcow(args);
    expect(result.status, result.stderr).toBe(0);
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    const listing = await debugfsListing(flat);
    expect(listing.get('/home/alice/.ssh')).toBe('dir 700 1000 1000 ');
    expect(listing.get('/home/alice/.ssh/authorized_keys')).toBe(`file 600 1000 1000 ${key.length + 1}`);
    expect((await debugfsCat(flat, '/home/alice/.ssh/authorized_keys')).toString()).toBe(`${key}\n`);
    expect(listing.get('/root/.ssh')).toBe('dir 700 0 0 ');
    expect((await debugfsCat(flat, '/root/.ssh/authorized_keys')).toString()).toBe('ssh-ed25519 AAAAroot root@host\n');
    const unknown = await ubdcow(['customize', cow, '--ssh-inject', 'mallory:string:k']);
    expect(unknown.status).toBe(1);
    expect(unknown.stderr).toMatch(/^ubdcow customize: operation 1 \(--ssh-inject mallory:string:\.\.\.\): .*no such user in the guest's \/etc\/passwd; nothing was changed\n$/);
  });

  it('--copy-in copies a tree with modes, owners, times, symlinks and hard links', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const src = path.join(tmp.path, 'payload');
    fs.mkdirSync(path.join(src, 'bin'), { recursive: true });
    fs.writeFileSync(path.join(src, 'bin', 'tool'), '#!/bin/sh\necho hi\n');
    fs.chmodSync(path.join(src, 'bin', 'tool'), 0o755);
    fs.writeFileSync(path.join(src, 'secret'), 'x'.repeat(70_000));
    fs.chmodSync(path.join(src, 'secret'), 0o600);
    fs.linkSync(path.join(src, 'secret'), path.join(src, 'secret-hardlink'));
    fs.symlinkSync('bin/tool', path.join(src, 'tool-link'));
    fs.chmodSync(path.join(src, 'bin'), 0o750);
    // Host times, kept in the guest (seconds and nanoseconds), directories and symlinks included.
    fs.utimesSync(path.join(src, 'bin', 'tool'), 1_500_000_000.25, 1_600_000_000.5);
    fs.utimesSync(path.join(src, 'bin'), 1_500_000_001, 1_600_000_001);
    fs.lutimesSync(path.join(src, 'tool-link'), 1_500_000_002, 1_600_000_002);
    fs.utimesSync(src, 1_500_000_003, 1_600_000_003);
    const result = await ubdcow(['customize', cow, '--mkdir', '/opt/dest', '--copy-in', `${src}:/opt/dest`]);
    expect(result.status, result.stderr).toBe(0);
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    const listing = await debugfsListing(flat);
    const uid = process.getuid!();
    const gid = process.getgid!();
    expect(listing.get('/opt/dest/payload')).toBe(`dir 755 ${uid} ${gid} `);
    expect(listing.get('/opt/dest/payload/bin')).toBe(`dir 750 ${uid} ${gid} `);
    expect(listing.get('/opt/dest/payload/bin/tool')).toBe(`file 755 ${uid} ${gid} 18`);
    expect(listing.get('/opt/dest/payload/secret')).toBe(`file 600 ${uid} ${gid} 70000`);
    expect((await debugfsCat(flat, '/opt/dest/payload/secret-hardlink')).toString()).toBe('x'.repeat(70_000));
    const inode = (text: string) => /Inode: (\d+)/.exec(text)?.[1];
    const first = await debugfsStat(flat, '/opt/dest/payload/secret');
    expect(inode(await debugfsStat(flat, '/opt/dest/payload/secret-hardlink'))).toBe(inode(first));
    expect(first).toContain('Links: 2');
    expect(await debugfsStat(flat, '/opt/dest/payload/tool-link')).toContain('Fast link dest: "bin/tool"');
    const times = async (p: string) => {
      const text = await debugfsStat(flat, p);
      const field = (name: string) => {
        const match = new RegExp(` ${name}: 0x([0-9a-f]+):([0-9a-f]+)`).exec(text);
        return match ? Number.parseInt(match[1]!, 16) + (Number.parseInt(match[2]!, 16) >>> 2) / 1e9 : NaN;
      };
      return [field('atime'), field('mtime')];
    };
    expect(await times('/opt/dest/payload/bin/tool')).toEqual([1_500_000_000.25, 1_600_000_000.5]);
    expect(await times('/opt/dest/payload/bin')).toEqual([1_500_000_001, 1_600_000_001]);
    expect(await times('/opt/dest/payload/tool-link')).toEqual([1_500_000_002, 1_600_000_002]);
    expect(await times('/opt/dest/payload')).toEqual([1_500_000_003, 1_600_000_003]);
    // A later operation on a copied path gives it the time of the run, as any write does.
    const later = await ubdcow(['customize', cow, '--copy-in', `${src}:/opt`, '--write', '/opt/payload/secret:new']);
    expect(later.status, later.stderr).toBe(0);
    const flat2 = await flatten(cow, path.join(tmp.path, 'flat2.img'));
    await fsckClean(flat2);
    const secret = /mtime: 0x([0-9a-f]+)/.exec(await debugfsStat(flat2, '/opt/payload/secret'))?.[1];
    expect(Number.parseInt(secret!, 16)).toBeGreaterThan(1_700_000_000);
    expect(/mtime: 0x([0-9a-f]+)/.exec(await debugfsStat(flat2, '/opt/payload/bin/tool'))?.[1]).toBe((1_600_000_000).toString(16));
  });

  it('diff --files reports exactly the paths the operations changed (and their parent directories)', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const result = await ubdcow(['customize', cow, '--mkdir', '/srv', '--write', '/srv/a:1', '--chmod', '0700:/etc/motd', '--delete', '/etc/gone.txt', '--move', '/etc/old.conf:/etc/new.conf', '--append-line', '/etc/hostname:x', '--json']);
    expect(result.status, result.stderr).toBe(0);
    const json = JSON.parse(result.stdout);
    expect(json).toMatchObject({ schemaVersion: 1, image: cow, kind: 'cow', location: 'whole disk', dryRun: false, recovery: 'none' });
    expect(json.steps).toHaveLength(6);
    const diff = await ubdcow(['diff', '--files', cow, '--json']);
    expect(diff.status, diff.stderr).toBe(1);
    const changes = JSON.parse(diff.stdout).changes.map((c: { path: string; change: string }) => `${c.change} ${c.path}`).sort();
    expect(changes).toEqual(
      ['modified /', 'added /srv', 'added /srv/a', 'modified /etc/motd', 'removed /etc/gone.txt', 'removed /etc/old.conf', 'added /etc/new.conf', 'modified /etc/hostname', 'modified /etc'].sort(),
    );
  });

  it('bad input: one line on stderr, exit 1, image unchanged', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const before = fs.readFileSync(cow);
    for (const args of [['--chmod', '9:/x'], ['--write', 'relative:x'], ['--chown', 'a:b:/x'], ['--commands-from-file', '/no/such/file'], ['--link', '/only-target']]) {
      const result = await ubdcow(['customize', cow, ...args]);
      expect(result.status, args.join(' ')).toBe(1);
      expect(result.stderr, args.join(' ')).toMatch(/^ubdcow customize: [^\n]+\n$/);
    }
    expect(Buffer.compare(fs.readFileSync(cow), before)).toBe(0);
  });
});
