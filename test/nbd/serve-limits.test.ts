/*
 * `ubdcow serve` under load and misbehaviour, as real processes: 100 concurrent nbdcopy clients
 * against --shared 1 (they queue for the one slot, as with qemu-nbd -e 1), sockets that idle in
 * the handshake (they hold no slot and time out), the --queue bound, SIGTERM while a client never
 * reads its replies (the server still exits, the COW consistent), IPv6 addresses in brackets.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as P from '../../src/nbd/protocol.js';
import { hostPort } from '../../src/nbd/server.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, run, titleWithSkipReason } from '../helpers/tools.js';
import { RawClient } from './raw-client.js';
import { type ServeProcess, missingNbdTools, nbdUri, patternedBacking, pollUntil, socketIn, startServe } from './serve-harness.js';

const missing = missingNbdTools();
const SIZE = 1 << 20;

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

/** Runs a program without blocking the event loop (the server under test is another process, but the raw clients live here). */
function runAsync(command: string, args: string[]): Promise<{ status: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout: Buffer.concat(out), stderr }));
  });
}

/** A connection that sends nothing at all (or only `bytes`), then idles. */
function idleSocket(sock: string, bytes?: Buffer): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(sock);
    s.on('error', () => undefined);
    // Flowing, so the server's close is seen (a paused socket never reports its end).
    s.resume();
    s.once('connect', () => {
      if (bytes) s.write(bytes);
      resolve(s);
    });
    s.once('error', reject);
  });
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('ubdcow serve: queueing, handshake timeouts, shutdown under a stuck client, IPv6', missing), () => {
  const tmp = useTempDir();
  let server: ServeProcess | undefined;
  const sockets: net.Socket[] = [];

  afterEach(async () => {
    for (const s of sockets.splice(0)) s.destroy();
    await server?.stop('SIGKILL');
    server = undefined;
  });

  function setup(): { dir: string; cow: string; model: Buffer; sock: string } {
    const dir = tmp.path;
    const base = path.join(dir, 'base.img');
    const model = patternedBacking(base, SIZE);
    const cow = path.join(dir, 'vm.cow');
    expect(run(process.execPath, [cli, 'create', cow, base]).status).toBe(0);
    return { dir, cow, model, sock: socketIn(dir) };
  }

  it('--shared 1: 100 concurrent nbdcopy clients are all served, one after another, with the right bytes', async () => {
    const { cow, model, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--shared', '1', '-v']);
    const copies = await Promise.all(Array.from({ length: 100 }, () => runAsync('nbdcopy', [nbdUri(sock), '-'])));
    const failed = copies.filter((c) => c.status !== 0 || !c.stdout.equals(model));
    expect(failed.map((c) => c.stderr), `${failed.length} of 100 clients failed`).toEqual([]);
    // They did wait for the one slot rather than being served at once.
    expect(server.stderr()).toMatch(/all 1 slots busy \(--shared 1\): waiting/);
    expect(await server.stop('SIGTERM')).toBe(0);
  }, 120_000);

  it('sockets idling in the handshake hold no slot: another client is served at once; they time out, logged', async () => {
    const { model, cow, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--shared', '1', '-v']);
    // One sends nothing; one stops after the client flags, before any option.
    sockets.push(await idleSocket(sock));
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0);
    const midway = await idleSocket(sock, flags);
    sockets.push(midway);
    const midwayClosed = new Promise<number>((resolve) => midway.on('close', () => resolve(Date.now())));
    const started = Date.now();
    const copy = await runAsync('nbdcopy', [nbdUri(sock), '-']);
    expect(copy.status, copy.stderr).toBe(0);
    expect(copy.stdout.equals(model)).toBe(true);
    expect(Date.now() - started).toBeLessThan(3000);
    // The stalled handshakes are closed after the 10 s handshake timeout, and -v says so.
    const closedAt = await midwayClosed;
    expect(closedAt - started).toBeGreaterThan(8000);
    expect(closedAt - started).toBeLessThan(15_000);
    await pollUntil(() => (server!.stderr().match(/handshake not finished within 10000 ms: closing/g) ?? []).length === 2);
  }, 30_000);

  it('--queue bounds the waiting clients: one more is closed at once (logged); the waiting one is served once the slot frees', async () => {
    const { model, cow, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--shared', '1', '--queue', '1', '-v']);
    const holder = await RawClient.connect(sock);
    await holder.go();
    const waiting = runAsync('nbdcopy', [nbdUri(sock), '-']);
    await pollUntil(() => /waiting, 1 in the queue/.test(server!.stderr()));
    const refused = await RawClient.connect(sock);
    await refused.closed;
    expect(server.stderr()).toMatch(/refused: 2 connections open, the limit is --shared 1 \+ --queue 1/);
    // The holder still works, then leaves; the waiting client gets the slot.
    holder.request({ type: P.CMD_READ, offset: 0, length: 512, handle: 7n });
    const reply = await holder.simpleReply(512);
    expect(reply.error).toBe(0);
    expect(reply.data.equals(model.subarray(0, 512))).toBe(true);
    holder.request({ type: P.CMD_DISC, offset: 0, length: 0 });
    const copy = await waiting;
    expect(copy.status, copy.stderr).toBe(0);
    expect(copy.stdout.equals(model)).toBe(true);
    expect(await server.stop('SIGTERM')).toBe(0);
  }, 30_000);

  it('SIGTERM while a client never reads its replies: exits within a few seconds; flushed data there, the COW checks clean', async () => {
    const { dir, cow, model, sock } = setup();
    server = await startServe([cow, '--socket', sock, '--shared', '2', '-v']);
    const writer = await RawClient.connect(sock);
    await writer.go();
    const data = Buffer.alloc(65536, 0x5a);
    writer.request({ type: P.CMD_WRITE, offset: 131072, length: data.length, handle: 1n }, data);
    expect((await writer.simpleReply()).error).toBe(0);
    writer.request({ type: P.CMD_FLUSH, offset: 0, length: 0, handle: 2n });
    expect((await writer.simpleReply()).error).toBe(0);
    writer.close();
    // 400 reads of 1 MiB, never read back: the socket and the in-flight budget fill up.
    const stuck = await RawClient.connect(sock);
    await stuck.go();
    for (let i = 0; i < 400; i++) stuck.request({ type: P.CMD_READ, offset: 0, length: SIZE, handle: BigInt(i) });
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const signalled = Date.now();
    const exit = await Promise.race([server.stop('SIGTERM'), new Promise((resolve) => setTimeout(() => resolve('still running'), 20_000))]);
    expect(exit).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(8000);
    expect(server.stderr()).toMatch(/the client does not take its replies\): closing/);
    server = undefined;
    stuck.close();
    const check = run(process.execPath, [cli, 'check', cow]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
    const out = path.join(dir, 'cat.raw');
    expect(run('sh', ['-c', `"${process.execPath}" "${cli}" cat "${cow}" > "${out}"`]).status).toBe(0);
    model.fill(0x5a, 131072, 131072 + 65536);
    expect(fs.readFileSync(out).equals(model)).toBe(true);
  }, 60_000);

  it('--bind ::1 prints the address in brackets, in text and --json, and clients reach it', async () => {
    const { model, cow } = setup();
    server = await startServe([cow, '--port', '0', '--bind', '::1', '--read-only']);
    const port = Number(/\]:(\d+)/.exec(server.listening)?.[1]);
    expect(server.listening).toMatch(new RegExp(`^listening on \\[::1\\]:${port} `));
    const copy = await runAsync('nbdcopy', [`nbd://[::1]:${port}`, '-']);
    expect(copy.status, copy.stderr).toBe(0);
    expect(copy.stdout.equals(model)).toBe(true);
    expect(await server.stop('SIGTERM')).toBe(0);
    server = await startServe([cow, '--port', '0', '--bind', '::', '--read-only', '--json']);
    const json = JSON.parse(server.listening) as { listening: string; port: number };
    expect(json.listening).toBe(`[::]:${json.port}`);
    expect(hostPort({ address: '127.0.0.1', family: 'IPv4', port: 10809 })).toBe('127.0.0.1:10809');
  }, 30_000);
});
