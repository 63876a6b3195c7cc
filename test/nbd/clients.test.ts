/*
 * `ubdcow serve` against the real NBD clients: qemu-io, qemu-img (compare, convert, map),
 * nbdinfo, nbdcopy. The reference for every byte is a model of the disk (the backing with the
 * same writes applied) and `ubdcow cat`, which reads the COW without the server.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { holdLockInChild, procLocksFor } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, run, titleWithSkipReason } from '../helpers/tools.js';
import { runProgram } from '../uml/harness.js';
import { type ServeProcess, missingNbdTools, nbdUri, patternedBacking, socketIn, startServe } from './serve-harness.js';

const missing = missingNbdTools('python3');
const SIZE = 4 << 20;

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

function ubdcow(args: string[], cwd?: string) {
  return run(process.execPath, [cli, ...args], { cwd });
}

function qemuIo(uri: string, commands: string[], extra: string[] = []) {
  const result = run('qemu-io', ['-f', 'raw', ...extra, ...commands.flatMap((c) => ['-c', c]), uri]);
  return { ...result, failed: /fail|error|Pattern verification/i.test(result.stdout + result.stderr) || result.status !== 0 };
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow serve with real NBD clients', missing), () => {
  const tmp = useTempDir();
  let server: ServeProcess | undefined;

  afterEach(async () => {
    await server?.stop('SIGKILL');
    server = undefined;
  });

  function setup(): { dir: string; cow: string; base: string; model: Buffer; sock: string } {
    const dir = tmp.path;
    const base = path.join(dir, 'base.img');
    const model = patternedBacking(base, SIZE);
    const cow = path.join(dir, 'vm.cow');
    expect(ubdcow(['create', cow, base]).status).toBe(0);
    return { dir, cow, base, model, sock: socketIn(dir) };
  }

  function catOf(cow: string, dir: string): Buffer {
    const out = path.join(dir, 'cat.raw');
    const result = run('sh', ['-c', `"${process.execPath}" "${cli}" cat "${cow}" > "${out}"`]);
    expect(result.status, result.stderr).toBe(0);
    return fs.readFileSync(out);
  }

  it('qemu-io writes and reads at aligned and unaligned offsets; the COW holds exactly them', async () => {
    const { dir, cow, model, sock } = setup();
    server = await startServe([cow, '--socket', sock]);
    expect(server.listening).toContain(`listening on unix:${sock}`);
    const writes: [number, number, number][] = [
      [0xa1, 0, 65536],
      [0xb2, 1 << 20, 4096],
      [0xc3, 1000, 3000],
      [0xd4, 4095, 2],
      [0xe5, (2 << 20) + 511, 1025],
      [0xf6, SIZE - 7, 7],
    ];
    const commands = writes.map(([p, o, l]) => `write -P ${p} ${o} ${l}`);
    // Later writes overlap earlier ones (1000+3000 crosses 4095): the model applies them in order.
    const w = qemuIo(nbdUri(sock), [...commands, 'flush']);
    expect(w.failed, w.stdout + w.stderr).toBe(false);
    for (const [p, o, l] of writes) model.fill(p, o, o + l);
    const r = qemuIo(nbdUri(sock), [`read -P 0xa1 0 1000`, `read -P 0xc3 1000 3000`, `read -P 0xd4 4095 2`, `read -P 0xe5 ${(2 << 20) + 511} 1025`, `read -P 0xf6 ${SIZE - 7} 7`, `read -P 0xb2 ${1 << 20} 4096`]);
    expect(r.failed, r.stdout + r.stderr).toBe(false);
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(catOf(cow, dir).equals(model)).toBe(true);
    // Every byte through the server, backing bytes around the writes included. qemu-img compare
    // takes a hole without the zero flag for zeros, so it gets the merged allocation.
    const check = path.join(dir, 'model.raw');
    fs.writeFileSync(check, model);
    server = await startServe([cow, '--socket', sock, '--read-only', '--allocation', 'merged']);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', nbdUri(sock), check]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  });

  it('qemu-img compare of the export with ubdcow cat, qemu-img convert of the export, nbdcopy', async () => {
    const { dir, cow, sock } = setup();
    server = await startServe([cow, '--socket', sock]);
    const w = qemuIo(nbdUri(sock), ['write -P 0x42 8192 65536', 'write -P 0x43 3000000 777', 'write -z 1048576 131072']);
    expect(w.failed, w.stdout + w.stderr).toBe(false);
    await server.stop('SIGTERM');
    const merged = catOf(cow, dir);
    fs.writeFileSync(path.join(dir, 'merged.raw'), merged);
    expect(merged.subarray(1048576, 1048576 + 131072).every((b) => b === 0)).toBe(true);
    server = await startServe([cow, '--socket', sock, '--read-only', '--allocation', 'merged']);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', nbdUri(sock), path.join(dir, 'merged.raw')]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    await server.stop('SIGTERM');
    // The default export (COW allocation: holes over the backing) for convert and nbdcopy.
    server = await startServe([cow, '--socket', sock, '--read-only']);
    const conv = run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', nbdUri(sock), path.join(dir, 'out.qcow2')]);
    expect(conv.status, conv.stderr).toBe(0);
    const cmp2 = run('qemu-img', ['compare', '-F', 'raw', path.join(dir, 'out.qcow2'), path.join(dir, 'merged.raw')]);
    expect(cmp2.status, cmp2.stdout + cmp2.stderr).toBe(0);
    const copy = path.join(dir, 'copy.raw');
    fs.writeFileSync(copy, '');
    fs.truncateSync(copy, SIZE);
    const nc = run('nbdcopy', [nbdUri(sock), copy]);
    expect(nc.status, nc.stderr).toBe(0);
    expect(fs.readFileSync(copy).equals(merged)).toBe(true);
    const dn = run('nbdcopy', [nbdUri(sock), 'null:']);
    expect(dn.status, dn.stderr).toBe(0);
    await server.stop('SIGTERM');
    // --shared 4 advertises multi-conn: nbdcopy then reads over 4 connections at once.
    server = await startServe([cow, '--socket', sock, '--read-only', '--shared', '4']);
    fs.truncateSync(copy, 0);
    fs.truncateSync(copy, SIZE);
    const multi = run('nbdcopy', ['-C', '4', '--request-size=65536', nbdUri(sock), copy]);
    expect(multi.status, multi.stderr).toBe(0);
    expect(fs.readFileSync(copy).equals(merged)).toBe(true);
  });

  it('nbdinfo --json: size, flags, block sizes, base:allocation; --read-only and --shared change the flags', async () => {
    const { cow, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--name', 'vm1']);
    const info = JSON.parse(run('nbdinfo', ['--json', nbdUri(sock, 'vm1')]).stdout);
    const e = info.exports[0];
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.structured).toBe(true);
    expect(e['export-name']).toBe('vm1');
    expect(e['export-size']).toBe(SIZE);
    expect(e.contexts).toContain('base:allocation');
    expect(e).toMatchObject({ is_read_only: false, can_flush: true, can_fua: true, can_zero: true, can_trim: false, can_multi_conn: false, can_fast_zero: false });
    expect([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum]).toEqual([1, 4096, 32 << 20]);
    // An unknown export name is refused with an error the client can show.
    const unknown = run('nbdinfo', ['--json', nbdUri(sock, 'nope')]);
    expect(unknown.status).not.toBe(0);
    // NBD_OPT_LIST shows the export.
    const list = run('nbdinfo', ['--list', '--json', nbdUri(sock)]);
    expect(JSON.parse(list.stdout).exports.map((x: { 'export-name': string }) => x['export-name'])).toContain('vm1');
    await server.stop('SIGTERM');
    server = await startServe([cow, '--socket', sock, '--read-only', '--shared', '2']);
    const ro = JSON.parse(run('nbdinfo', ['--json', nbdUri(sock)]).stdout).exports[0];
    expect(ro).toMatchObject({ is_read_only: true, can_multi_conn: true });
  });

  it('nbdinfo --map and qemu-img map show the COW allocation that ubdcow map reports', async () => {
    const { cow, sock } = setup();
    server = await startServe([cow, '--socket', sock]);
    const w = qemuIo(nbdUri(sock), ['write -P 1 4096 8192', 'write -P 2 100001 777', 'write -P 3 3145728 1048576']);
    expect(w.failed, w.stdout).toBe(false);
    const map = JSON.parse(ubdcow(['map', cow, '--json']).stdout) as { extents: { offset: number; length: number }[] };
    const expected = map.extents.map((x) => [x.offset, x.length]);
    expect(expected).toEqual([
      [4096, 8192],
      [98304, 4096], // 777 bytes at 100001: their whole 4 KiB page (--allocation-unit's default)
      [3145728, 1048576],
    ]);
    const nbdMap = JSON.parse(run('nbdinfo', ['--map', '--json', nbdUri(sock)]).stdout) as { offset: number; length: number; type: number }[];
    const dataFromNbd = nbdMap.filter((x) => (x.type & 1) === 0).map((x) => [x.offset, x.length]);
    expect(dataFromNbd).toEqual(expected);
    // The rest is hole without the zero flag: it reads through to the (non-zero) backing.
    expect(nbdMap.filter((x) => (x.type & 1) === 1).every((x) => (x.type & 2) === 0)).toBe(true);
    const qmap = JSON.parse(run('qemu-img', ['map', '-f', 'raw', '--output=json', nbdUri(sock)]).stdout) as { start: number; length: number; data: boolean }[];
    expect(qmap.filter((x) => x.data).map((x) => [x.start, x.length])).toEqual(expected);
  });

  it('--allocation merged is the disk as one image: data where the COW or the backing holds it, zeros where neither does (nbdinfo, qemu-img map, convert stays sparse)', async () => {
    const dir = tmp.path;
    const MiB = 1 << 20;
    const base = path.join(dir, 'sparse-base.img');
    fs.writeFileSync(base, '');
    fs.truncateSync(base, 8 * MiB);
    const fd = fs.openSync(base, 'r+');
    fs.writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, MiB, 2 * MiB);
    fs.closeSync(fd);
    const cow = path.join(dir, 'sparse.cow');
    expect(ubdcow(['create', cow, base]).status).toBe(0);
    const sock = socketIn(dir);
    server = await startServe([cow, '--socket', sock]);
    // A page in a hole of the base, and one inside its data (which must not split the data extent).
    const w = qemuIo(nbdUri(sock), ['write -P 1 4096 8192', `write -P 2 ${2 * MiB + 65536} 4096`, 'flush']);
    expect(w.failed, w.stdout).toBe(false);
    await server.stop('SIGTERM');
    server = await startServe([cow, '--socket', sock, '--read-only', '--allocation', 'merged']);
    const nbdMap = JSON.parse(run('nbdinfo', ['--map', '--json', nbdUri(sock)]).stdout) as { offset: number; length: number; type: number }[];
    expect(nbdMap.map((x) => [x.offset, x.length, x.type])).toEqual([
      [0, 4096, 3],
      [4096, 8192, 0],
      [12288, 2 * MiB - 12288, 3],
      [2 * MiB, MiB, 0],
      [3 * MiB, 5 * MiB, 3],
    ]);
    const qmap = JSON.parse(run('qemu-img', ['map', '-f', 'raw', '--output=json', nbdUri(sock)]).stdout) as { start: number; length: number; data: boolean; zero: boolean }[];
    expect(qmap.filter((x) => x.data).map((x) => [x.start, x.length])).toEqual([
      [4096, 8192],
      [2 * MiB, MiB],
    ]);
    const out = path.join(dir, 'out.qcow2');
    const conv = run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', nbdUri(sock), out]);
    expect(conv.status, conv.stderr).toBe(0);
    const merged = catOf(cow, dir);
    const flat = path.join(dir, 'flat.raw');
    fs.writeFileSync(flat, merged);
    const cmp = run('qemu-img', ['compare', '-F', 'raw', out, flat]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    // Only the data was written: the zero ranges are unallocated in the qcow2.
    const outMap = JSON.parse(run('qemu-img', ['map', '--output=json', out]).stdout) as { start: number; length: number; data: boolean }[];
    expect(outMap.filter((x) => x.data).reduce((sum, x) => sum + x.length, 0)).toBeLessThanOrEqual(MiB + 128 * 1024);
  });

  it('serves one client after another, and TCP on 127.0.0.1 with --port 0', async () => {
    const { cow } = setup();
    server = await startServe([cow, '--port', '0', '--json']);
    const listening = JSON.parse(server.listening) as { listening: string; port: number };
    expect(listening.listening).toMatch(/^127\.0\.0\.1:\d+$/);
    const uri = `nbd://127.0.0.1:${listening.port}`;
    for (let i = 0; i < 3; i++) {
      const w = qemuIo(uri, [`write -P ${i + 1} ${i * 4096} 4096`, `read -P ${i + 1} ${i * 4096} 4096`]);
      expect(w.failed, w.stdout + w.stderr).toBe(false);
    }
    expect(JSON.parse(run('nbdinfo', ['--json', uri]).stdout).exports[0]['export-size']).toBe(SIZE);
  });

  it('--shared 2: two qemu-io writers at once, each sees its own data, the COW holds both', async () => {
    const { dir, cow, model, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--shared', '2']);
    const writer = (pattern: number, start: number) => {
      const commands = Array.from({ length: 64 }, (_, i) => ['-c', `write -P ${pattern} ${start + i * 8192} 4096`]).flat();
      commands.push('-c', `read -P ${pattern} ${start + 63 * 8192} 4096`, '-c', 'flush');
      return runProgram('qemu-io', ['-f', 'raw', ...commands, nbdUri(sock)]);
    };
    const [a, b] = await Promise.all([writer(0x61, 0), writer(0x62, 1 << 20)]);
    for (const r of [a, b]) {
      expect(r.status, r.stdout + r.stderr).toBe(0);
      expect(r.stdout).not.toMatch(/fail|error/i);
    }
    for (let i = 0; i < 64; i++) {
      model.fill(0x61, i * 8192, i * 8192 + 4096);
      model.fill(0x62, (1 << 20) + i * 8192, (1 << 20) + i * 8192 + 4096);
    }
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(catOf(cow, dir).equals(model)).toBe(true);
  });

  it('SIGTERM: exit 0, lock released, socket and pid file removed; the COW is served again afterwards', async () => {
    const { dir, cow, sock } = setup();
    const pidFile = path.join(dir, 'serve.pid');
    server = await startServe([cow, '--socket', sock, '--pid-file', pidFile]);
    expect(Number(fs.readFileSync(pidFile, 'utf8'))).toBe(server.child.pid);
    expect(procLocksFor(cow).some((l) => l.includes('WRITE'))).toBe(true);
    // A second server (or a UML guest) cannot take the COW while it is served.
    const second = await startServe([cow, '--socket', socketIn(dir, 'other.sock')]).catch((e: { code: number; stderr: string }) => e);
    expect((second as { code: number }).code).toBe(1);
    expect((second as { stderr: string }).stderr.trim().split('\n')).toHaveLength(1);
    expect((second as { stderr: string }).stderr).toMatch(/lock|in use|held/i);
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    expect(fs.existsSync(pidFile)).toBe(false);
    expect(procLocksFor(cow)).toEqual([]);
    server = await startServe([cow, '--socket', sock]);
    expect(await server.stop('SIGINT')).toBe(0);
  });

  it('refuses a COW another process (as a running UML would) holds locked', async () => {
    const { cow, sock } = setup();
    const holder = await holdLockInChild(cow);
    try {
      const refused = await startServe([cow, '--socket', sock]).catch((e: { code: number; stderr: string }) => e);
      expect((refused as { code: number }).code).toBe(1);
      const lines = (refused as { stderr: string }).stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^ubdcow serve: /);
      expect(fs.existsSync(sock)).toBe(false);
    } finally {
      await holder.release();
    }
  });

  it('bad arguments are one line, exit 1', () => {
    const { cow } = setup();
    for (const args of [['serve', cow], ['serve', cow, '--port', '70000'], ['serve', path.join(tmp.path, 'missing.cow'), '--socket', 'x.sock']]) {
      const r = ubdcow(args);
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).not.toMatch(/^\s+at /m);
    }
  });
});
