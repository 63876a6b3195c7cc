/**
 * The koffi bindings of src/os against the C headers and the kernel of this machine: struct
 * layouts and constants as a C compiler sees them, and each call's effect as other tools see it.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import * as libc from '../../src/os/libc.js';
import { FILE_CLONE_RANGE_LAYOUT, FLOCK_LAYOUT, IOVEC_LAYOUT, boundLayouts, osCalls, osCallsUnavailable, overrideOsCalls } from '../../src/os/libc.js';
import { holdLockInChild, procLocksFor } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, repoRoot, titleWithSkipReason } from '../helpers/tools.js';

const checkedHere = process.platform === 'linux' && (process.arch === 'x64' || process.arch === 'arm64');
const notHere = checkedHere ? [] : [`bindings are for linux x64/arm64, this is ${process.platform} ${process.arch}`];

const probe = `
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stddef.h>
#include <unistd.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <sys/uio.h>
int main(void) {
  printf("flock.size %zu\\nflock.l_type %zu\\nflock.l_whence %zu\\nflock.l_start %zu\\nflock.l_len %zu\\nflock.l_pid %zu\\n",
    sizeof(struct flock), offsetof(struct flock, l_type), offsetof(struct flock, l_whence), offsetof(struct flock, l_start),
    offsetof(struct flock, l_len), offsetof(struct flock, l_pid));
  printf("fcr.size %zu\\nfcr.src_fd %zu\\nfcr.src_offset %zu\\nfcr.src_length %zu\\nfcr.dest_offset %zu\\n",
    sizeof(struct file_clone_range), offsetof(struct file_clone_range, src_fd), offsetof(struct file_clone_range, src_offset),
    offsetof(struct file_clone_range, src_length), offsetof(struct file_clone_range, dest_offset));
  printf("F_GETLK %d\\nF_SETLK %d\\nF_SETLKW %d\\nF_OFD_GETLK %d\\nF_OFD_SETLK %d\\nF_OFD_SETLKW %d\\n", F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW);
  printf("F_RDLCK %d\\nF_WRLCK %d\\nF_UNLCK %d\\nSEEK_DATA %d\\nSEEK_HOLE %d\\n", F_RDLCK, F_WRLCK, F_UNLCK, SEEK_DATA, SEEK_HOLE);
  printf("FICLONE %lu\\nFICLONERANGE %lu\\nFALLOC_FL_KEEP_SIZE %d\\nFALLOC_FL_PUNCH_HOLE %d\\n", (unsigned long)FICLONE, (unsigned long)FICLONERANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE);
  printf("iovec.size %zu\\niovec.iov_base %zu\\niovec.iov_len %zu\\nRWF_NOWAIT %d\\n",
    sizeof(struct iovec), offsetof(struct iovec, iov_base), offsetof(struct iovec, iov_len), RWF_NOWAIT);
  printf("SYNC_FILE_RANGE_WAIT_BEFORE %d\\nSYNC_FILE_RANGE_WRITE %d\\nSYNC_FILE_RANGE_WAIT_AFTER %d\\n", SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER);
  return 0;
}
`;

describe.skipIf(!checkedHere)(titleWithSkipReason(`struct layouts and constants on ${process.arch}`, notHere), () => {
  const tmp = useTempDir();

  it('koffi lays out struct flock, file_clone_range and iovec as asserted', () => {
    expect(osCallsUnavailable()).toBeUndefined();
    expect(boundLayouts()).toEqual({ flock: { ...FLOCK_LAYOUT }, fileCloneRange: { ...FILE_CLONE_RANGE_LAYOUT }, iovec: { ...IOVEC_LAYOUT } });
  });

  it.skipIf(missingTools('cc').length > 0)('the C compiler of this machine agrees on every layout and constant', () => {
    const source = path.join(tmp.path, 'probe.c');
    const binary = path.join(tmp.path, 'probe');
    fs.writeFileSync(source, probe);
    const cc = spawnSync('cc', ['-o', binary, source], { encoding: 'utf8' });
    expect(cc.status, cc.stderr).toBe(0);
    const values = Object.fromEntries(
      spawnSync(binary, { encoding: 'utf8' })
        .stdout.trim()
        .split('\n')
        .map((line) => line.split(' '))
        .map(([key, value]) => [key!, Number(value)]),
    );
    for (const [field, offset] of Object.entries(FLOCK_LAYOUT)) expect(values[`flock.${field}`], `flock.${field}`).toBe(offset);
    for (const [field, offset] of Object.entries(FILE_CLONE_RANGE_LAYOUT)) expect(values[`fcr.${field}`], `file_clone_range.${field}`).toBe(offset);
    for (const [field, offset] of Object.entries(IOVEC_LAYOUT)) expect(values[`iovec.${field}`], `iovec.${field}`).toBe(offset);
    const constants = libc as unknown as Record<string, number>;
    for (const name of Object.keys(values).filter((key) => !key.includes('.'))) expect(constants[name], name).toBe(values[name]);
  });
});

describe.skipIf(!checkedHere || missingTools('python3').length > 0)(titleWithSkipReason('fcntl locks through the binding, as other processes see them', [...notHere, ...missingTools('python3')]), () => {
  const tmp = useTempDir();

  it('l_start and l_len land where the kernel reads them: a byte-range lock shows its range in /proc/locks', () => {
    const file = path.join(tmp.path, 'f');
    fs.writeFileSync(file, Buffer.alloc(65536));
    const fd = fs.openSync(file, 'r+');
    try {
      osCalls()!.setLock(fd, 'write', { start: 4096, len: 8192 });
      expect(procLocksFor(file)).toHaveLength(1);
      expect(procLocksFor(file)[0]).toMatch(new RegExp(`POSIX\\s+ADVISORY\\s+WRITE\\s+${process.pid}\\s+\\S+\\s+4096\\s+12287$`));
      osCalls()!.setLock(fd, 'unlock', { start: 4096, len: 8192 });
      expect(procLocksFor(file)).toHaveLength(0);
      osCalls()!.setLock(fd, 'read', { ofd: true });
      expect(procLocksFor(file)[0]).toMatch(/OFDLCK\s+ADVISORY\s+READ\s+-1\s+\S+\s+0\s+EOF/);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('F_GETLK reports the holder and its pid (l_pid read back from the struct), F_SETLK fails with EAGAIN/EACCES', async () => {
    const file = path.join(tmp.path, 'f');
    fs.writeFileSync(file, Buffer.alloc(4096));
    const holder = await holdLockInChild(file);
    const fd = fs.openSync(file, 'r+');
    try {
      expect(osCalls()!.getLock(fd, 'read')).toEqual({ type: 'write', pid: holder.child.pid });
      let code: string | undefined;
      try {
        osCalls()!.setLock(fd, 'write');
      } catch (err) {
        code = (err as NodeJS.ErrnoException).code;
      }
      expect(['EAGAIN', 'EACCES']).toContain(code);
    } finally {
      fs.closeSync(fd);
      await holder.release();
    }
    const again = fs.openSync(file, 'r+');
    try {
      expect(osCalls()!.getLock(again, 'write')).toEqual({ type: 'unlock', pid: expect.any(Number) });
    } finally {
      fs.closeSync(again);
    }
  });
});

describe.skipIf(!checkedHere)(titleWithSkipReason('sendfile and dup on a real socket', notHere), () => {
  const tmp = useTempDir();

  /** A connected pair of Unix sockets: `ours` (a net.Socket) and the peer end's received bytes. */
  async function socketPair(): Promise<{ ours: net.Socket; fd: number; received: () => Buffer; peer: net.Socket; close: () => void }> {
    const sock = path.join(tmp.path, `s${Math.random().toString(36).slice(2)}`);
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const ours = net.connect(sock);
    await new Promise<void>((resolve) => ours.once('connect', () => resolve()));
    const peer = await accepted;
    peer.pause();
    const chunks: Buffer[] = [];
    peer.on('data', (chunk: Buffer) => chunks.push(chunk));
    const fd = (ours as unknown as { _handle: { fd: number } })._handle.fd;
    return { ours, fd, peer, received: () => Buffer.concat(chunks), close: () => (ours.destroy(), peer.destroy(), server.close()) };
  }

  it('sendFile puts the asked bytes of a file on the socket, and 0 at the end of the file', async () => {
    const file = path.join(tmp.path, 'data');
    const bytes = Buffer.from(Array.from({ length: 10000 }, (_, i) => (i * 7) & 0xff));
    fs.writeFileSync(file, bytes);
    const pair = await socketPair();
    const fd = fs.openSync(file, 'r');
    try {
      expect(osCalls()!.sendFile(pair.fd, fd, 1000, 5000)).toBe(5000);
      expect(osCalls()!.sendFile(pair.fd, fd, 10000, 10)).toBe(0);
      pair.peer.resume();
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(pair.received().equals(bytes.subarray(1000, 6000))).toBe(true);
    } finally {
      fs.closeSync(fd);
      pair.close();
    }
  });

  it('a full socket: sendFile answers undefined (EAGAIN) instead of blocking, and sends again once the peer reads', async () => {
    const file = path.join(tmp.path, 'big');
    fs.writeFileSync(file, Buffer.alloc(8 << 20, 0x5a));
    const pair = await socketPair();
    const fd = fs.openSync(file, 'r');
    try {
      let sent = 0;
      let result: number | undefined;
      while ((result = osCalls()!.sendFile(pair.fd, fd, sent, (8 << 20) - sent)) !== undefined) {
        sent += result;
        expect(sent).toBeLessThan(8 << 20);
      }
      pair.peer.resume();
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(osCalls()!.sendFile(pair.fd, fd, sent, (8 << 20) - sent)).toBeGreaterThan(0);
    } finally {
      fs.closeSync(fd);
      pair.close();
    }
  });

  it('dup gives another descriptor of the same socket, which outlives the original and closes with closeFd', async () => {
    const pair = await socketPair();
    const copy = osCalls()!.dup(pair.fd);
    expect(copy).not.toBe(pair.fd);
    fs.writeSync(copy, Buffer.from('via the copy'));
    pair.peer.resume();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(pair.received().toString()).toBe('via the copy');
    osCalls()!.closeFd(copy);
    expect(() => fs.fstatSync(copy)).toThrow(/EBADF/);
    pair.close();
  });
});

describe('when the bindings cannot load', () => {
  let restore: { reset(): void } | undefined;
  afterEach(() => restore?.reset());

  it('osCalls() is undefined and says why in one line', () => {
    restore = overrideOsCalls(undefined, 'koffi did not load (no prebuilt binary for this platform)');
    expect(osCalls()).toBeUndefined();
    expect(osCallsUnavailable()).toBe('koffi did not load (no prebuilt binary for this platform)');
  });

  it('UBDCOW_NO_OS_CALLS=1 turns them off in a fresh process', () => {
    const script = `import('${path.join(repoRoot, 'src/os/libc.ts')}').then((m) => console.log(JSON.stringify({ bound: m.osCalls() !== undefined, reason: m.osCallsUnavailable() })))`;
    const result = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { encoding: 'utf8', env: { ...process.env, UBDCOW_NO_OS_CALLS: '1' } });
    expect(result.status, result.stderr).toBe(0);
    expect(JSON.parse(result.stdout)).toEqual({ bound: false, reason: 'disabled by UBDCOW_NO_OS_CALLS' });
  });
});

describe('ubdcow without the bindings', () => {
  it('demo (create, write, commit: every command that locks) passes with exactly one one-line warning', () => {
    const cli = ensureBuiltCli();
    const result = spawnSync(process.execPath, [cli, 'demo'], { encoding: 'utf8', env: { ...process.env, UBDCOW_NO_OS_CALLS: '1' } });
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toMatch(/all steps passed/);
    const lines = result.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^ubdcow: warning: .*demo\.cow: .*cannot be locked here \(disabled by UBDCOW_NO_OS_CALLS\)/);
    expect(result.stdout).toMatch(/temporary folder \S+ removed/);
  });
});
