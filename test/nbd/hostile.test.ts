/*
 * Hostile and broken NBD clients: each gets the protocol's error value or a closed connection,
 * the server stays up, bytes outside a request are never touched, and a well-behaved client
 * (qemu-io, a real one) is served correctly afterwards.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ServeHandle, serveImage } from '../../src/commands/serve.js';
import { createCow } from '../../src/commands/create.js';
import * as P from '../../src/nbd/protocol.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { runProgram } from '../uml/harness.js';
import { RawClient } from './raw-client.js';
import { nbdUri, patternedBacking } from './serve-harness.js';

const SIZE = 1 << 20;
const missing = missingTools('qemu-io');
const sha = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

describe('hostile NBD clients', () => {
  let dir: string;
  let sock: string;
  let roSock: string;
  let served: ServeHandle;
  let readOnly: ServeHandle;
  let backingHash: string;
  let backing: Buffer;

  beforeAll(async () => {
    dir = makeTempDir();
    const base = path.join(dir, 'base.img');
    backing = patternedBacking(base, SIZE);
    backingHash = sha(base);
    await createCow(path.join(dir, 'vm.cow'), base);
    await createCow(path.join(dir, 'ro.cow'), base);
    sock = path.join(dir, 'rw.sock');
    roSock = path.join(dir, 'ro.sock');
    // Sector granularity: the block-status replies below are checked sector by sector.
    served = await serveImage(path.join(dir, 'vm.cow'), { socket: sock, shared: 4, allocationUnit: 512 });
    readOnly = await serveImage(path.join(dir, 'ro.cow'), { socket: roSock, readOnly: true });
  });

  afterAll(async () => {
    await served?.close();
    await readOnly?.close();
    removeTempDir(dir);
  });

  it('option haggling errors: unknown option, unknown export, meta context before structured replies, LIST with data, then GO works', async () => {
    const c = await RawClient.connect(sock);
    const handshakeFlags = await c.greet();
    expect(handshakeFlags).toBe(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES);
    expect((await c.option(99))[0].type).toBe(P.REP_ERR_UNSUP);
    expect((await c.option(P.OPT_STARTTLS))[0].type).toBe(P.REP_ERR_UNSUP);
    expect((await c.option(P.OPT_INFO, P.encodeInfoRequest('nope', [])))[0].type).toBe(P.REP_ERR_UNKNOWN);
    expect((await c.option(P.OPT_INFO, Buffer.from([0, 0, 0, 9, 1])))[0].type).toBe(P.REP_ERR_INVALID);
    expect((await c.option(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest('', [P.BASE_ALLOCATION])))[0].type).toBe(P.REP_ERR_INVALID);
    expect((await c.option(P.OPT_LIST, Buffer.from('x')))[0].type).toBe(P.REP_ERR_INVALID);
    expect((await c.option(P.OPT_STRUCTURED_REPLY, Buffer.from('x')))[0].type).toBe(P.REP_ERR_INVALID);
    const list = await c.option(P.OPT_LIST_META_CONTEXT, P.encodeMetaContextRequest('', ['base:']));
    expect(list.map((r) => r.type)).toEqual([P.REP_META_CONTEXT, P.REP_ACK]);
    expect(list[0].data.subarray(4).toString()).toBe('base:allocation');
    expect((await c.option(P.OPT_STRUCTURED_REPLY))[0].type).toBe(P.REP_ACK);
    // Unknown namespaces select nothing; base:allocation gets an id.
    const set = await c.option(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest('', ['qemu:dirty-bitmap:x', P.BASE_ALLOCATION]));
    expect(set.map((r) => r.type)).toEqual([P.REP_META_CONTEXT, P.REP_ACK]);
    const info = await c.option(P.OPT_INFO, P.encodeInfoRequest('', [P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE]));
    const infoTypes = info.filter((r) => r.type === P.REP_INFO).map((r) => r.data.readUInt16BE(0));
    expect(infoTypes.sort()).toEqual([P.INFO_EXPORT, P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE]);
    const go = await c.option(P.OPT_GO, P.encodeInfoRequest('', []));
    expect(go[go.length - 1].type).toBe(P.REP_ACK);
    c.request({ type: P.CMD_BLOCK_STATUS, offset: 0, length: SIZE });
    const bs = await c.chunk();
    expect(bs.type).toBe(P.REPLY_TYPE_BLOCK_STATUS);
    expect(bs.payload.readUInt32BE(4)).toBe(SIZE);
    expect(bs.payload.readUInt32BE(8)).toBe(P.STATE_HOLE);
    c.request({ type: P.CMD_DISC, offset: 0, length: 0 });
    await c.closed;
  });

  it('NBD_OPT_EXPORT_NAME: an unknown name closes the session; the known one answers with NO_ZEROES honoured', async () => {
    const bad = await RawClient.connect(sock);
    await bad.greet();
    bad.send(P.encodeOptionHeader(P.OPT_EXPORT_NAME, 4), Buffer.from('nope'));
    await bad.closed;
    const good = await RawClient.connect(sock);
    await good.greet(P.FLAG_C_FIXED_NEWSTYLE);
    good.send(P.encodeOptionHeader(P.OPT_EXPORT_NAME, 0));
    const reply = await good.read(134);
    expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
    expect(reply.subarray(10).every((b) => b === 0)).toBe(true);
    good.request({ type: P.CMD_READ, offset: 512, length: 512 });
    expect((await good.simpleReply(512)).data.equals(backing.subarray(512, 1024))).toBe(true);
    good.close();
    const unknownFlags = await RawClient.connect(sock);
    await unknownFlags.greet(0x80);
    await unknownFlags.closed;
  });

  it('requests past the end, 4 GiB lengths, bad flags, unknown commands and TRIM get EINVAL/ENOSPC; the session goes on', async () => {
    const c = await RawClient.connect(sock);
    await c.go();
    const expectError = async (r: Parameters<RawClient['request']>[0], error: number, payload?: Buffer) => {
      c.request(r, payload);
      expect((await c.simpleReply()).error, `${r.type} at ${r.offset}`).toBe(error);
    };
    await expectError({ type: P.CMD_READ, offset: SIZE - 512, length: 1024 }, P.NBD_EINVAL);
    await expectError({ type: P.CMD_READ, offset: 0, length: 0xffffffff }, P.NBD_EINVAL);
    await expectError({ type: P.CMD_READ, offset: 2n ** 64n - 1n, length: 1 }, P.NBD_EINVAL);
    await expectError({ type: P.CMD_WRITE, offset: SIZE - 10, length: 20 }, P.NBD_ENOSPC, Buffer.alloc(20, 0xee));
    await expectError({ type: P.CMD_WRITE_ZEROES, offset: SIZE, length: 1 }, P.NBD_ENOSPC);
    await expectError({ type: P.CMD_WRITE, offset: 0, length: 4, flags: P.CMD_FLAG_REQ_ONE }, P.NBD_EINVAL, Buffer.alloc(4, 0xee));
    await expectError({ type: P.CMD_READ, offset: 0, length: 4, flags: P.CMD_FLAG_DF }, P.NBD_EINVAL); // DF needs structured replies
    await expectError({ type: P.CMD_TRIM, offset: 0, length: 4096 }, P.NBD_EINVAL);
    await expectError({ type: 77, offset: 0, length: 0 }, P.NBD_EINVAL);
    await expectError({ type: P.CMD_BLOCK_STATUS, offset: 0, length: 512 }, P.NBD_EINVAL); // no meta context selected
    await expectError({ type: P.CMD_FLUSH, offset: 1, length: 0 }, P.NBD_EINVAL);
    await expectError({ type: P.CMD_WRITE_ZEROES, offset: 0, length: 4096, flags: P.CMD_FLAG_FAST_ZERO }, P.NBD_EINVAL);
    // Nothing of the refused writes landed.
    c.request({ type: P.CMD_READ, offset: 0, length: 4096 });
    expect((await c.simpleReply(4096)).data.equals(backing.subarray(0, 4096))).toBe(true);
    c.request({ type: P.CMD_READ, offset: SIZE - 512, length: 512 });
    expect((await c.simpleReply(512)).data.equals(backing.subarray(SIZE - 512))).toBe(true);
    // A write payload far above the maximum is not read into memory: the connection is closed.
    c.request({ type: P.CMD_WRITE, offset: 0, length: 0xffffffff });
    await c.closed;
  });

  it('structured replies: errors as error chunks, reads as one data chunk, REQ_ONE gives one descriptor', async () => {
    const c = await RawClient.connect(sock);
    await c.go({ structured: true, meta: true });
    c.request({ type: P.CMD_READ, offset: SIZE, length: 1 });
    const err = await c.chunk();
    expect(err.type).toBe(P.REPLY_TYPE_ERROR);
    expect(err.payload.readUInt32BE(0)).toBe(P.NBD_EINVAL);
    c.request({ type: P.CMD_READ, offset: 100, length: 1000, flags: P.CMD_FLAG_DF });
    const data = await c.chunk();
    expect(data.type).toBe(P.REPLY_TYPE_OFFSET_DATA);
    expect(data.flags & P.REPLY_FLAG_DONE).toBe(1);
    expect(Number(data.payload.readBigUInt64BE(0))).toBe(100);
    expect(data.payload.subarray(8).equals(backing.subarray(100, 1100))).toBe(true);
    c.request({ type: P.CMD_WRITE, offset: 8192, length: 512 }, Buffer.alloc(512, 0x77));
    expect((await c.chunk()).type).toBe(-1);
    c.request({ type: P.CMD_BLOCK_STATUS, offset: 0, length: SIZE, flags: P.CMD_FLAG_REQ_ONE });
    const one = await c.chunk();
    expect(one.payload.length).toBe(12);
    expect([one.payload.readUInt32BE(4), one.payload.readUInt32BE(8)]).toEqual([8192, P.STATE_HOLE]);
    c.request({ type: P.CMD_BLOCK_STATUS, offset: 8000, length: 1000 });
    const many = await c.chunk();
    expect([many.payload.readUInt32BE(4), many.payload.readUInt32BE(8), many.payload.readUInt32BE(12), many.payload.readUInt32BE(16)]).toEqual([192, P.STATE_HOLE, 512, 0]);
    expect(many.payload.readUInt32BE(20)).toBe(1000 - 192 - 512);
    c.request({ type: P.CMD_READ, offset: 0, length: 0 });
    expect((await c.chunk()).type).toBe(P.REPLY_TYPE_NONE);
    c.close();
  });

  it('a read-only export refuses writes with EPERM and stays in step with the client', async () => {
    const c = await RawClient.connect(roSock);
    const { flags } = await c.go();
    expect(flags & P.FLAG_READ_ONLY).toBe(P.FLAG_READ_ONLY);
    expect(flags & P.FLAG_CAN_MULTI_CONN).toBe(0);
    c.request({ type: P.CMD_WRITE, offset: 0, length: 4096 }, Buffer.alloc(4096, 0xcc));
    expect((await c.simpleReply()).error).toBe(P.NBD_EPERM);
    c.request({ type: P.CMD_WRITE_ZEROES, offset: 0, length: 4096 });
    expect((await c.simpleReply()).error).toBe(P.NBD_EPERM);
    c.request({ type: P.CMD_READ, offset: 0, length: 4096 });
    expect((await c.simpleReply(4096)).data.equals(backing.subarray(0, 4096))).toBe(true);
    c.request({ type: P.CMD_FLUSH, offset: 0, length: 0 });
    expect((await c.simpleReply()).error).toBe(0);
    c.close();
  });

  it('a disconnect in the middle of a write leaves the disk as it was', async () => {
    const c = await RawClient.connect(sock);
    await c.go();
    c.request({ type: P.CMD_WRITE, offset: 65536, length: 65536 }, Buffer.alloc(1000, 0xab));
    await new Promise((r) => setTimeout(r, 50));
    c.close();
    const d = await RawClient.connect(sock);
    await d.go();
    d.request({ type: P.CMD_READ, offset: 65536, length: 65536 });
    expect((await d.simpleReply(65536)).data.equals(backing.subarray(65536, 131072))).toBe(true);
    d.close();
  });

  /** Sends `bytes` as a whole client stream, half-closes, and waits (bounded) for the server to hang up. */
  async function session(target: string, bytes: Uint8Array): Promise<void> {
    const s = net.connect(target);
    s.on('error', () => undefined);
    s.on('data', () => undefined);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        s.destroy();
        resolve();
      }, 2000);
      s.on('close', () => {
        clearTimeout(timer);
        resolve();
      });
      s.on('connect', () => s.end(bytes));
    });
  }

  /** A well-formed client stream: handshake with every option kind, then a mix of requests. */
  function validStream(): Buffer {
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0);
    const opt = (o: number, d: Buffer = Buffer.alloc(0)) => Buffer.concat([P.encodeOptionHeader(o, d.length), d]);
    const req = (type: number, offset: number, length: number, f = 0) => P.encodeRequest({ type, flags: f, handle: 7n, offset, length });
    return Buffer.concat([
      flags,
      opt(P.OPT_LIST),
      opt(P.OPT_STRUCTURED_REPLY),
      opt(P.OPT_LIST_META_CONTEXT, P.encodeMetaContextRequest('', [])),
      opt(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest('', [P.BASE_ALLOCATION])),
      opt(P.OPT_INFO, P.encodeInfoRequest('', [P.INFO_BLOCK_SIZE])),
      opt(P.OPT_GO, P.encodeInfoRequest('', [P.INFO_BLOCK_SIZE])),
      req(P.CMD_READ, 4096, 4096),
      req(P.CMD_WRITE, 200_000, 600, P.CMD_FLAG_FUA),
      Buffer.alloc(600, 0x5c),
      req(P.CMD_BLOCK_STATUS, 0, SIZE),
      req(P.CMD_WRITE_ZEROES, 300_000, 5000),
      req(P.CMD_FLUSH, 0, 0),
      req(P.CMD_READ, 0, 100, P.CMD_FLAG_DF),
      req(P.CMD_DISC, 0, 0),
    ]);
  }

  it('random and mutated handshakes and requests never bring the server down (property, bounded)', async () => {
    const valid = validStream();
    const mutated = fc
      .array(
        fc.oneof(
          fc.record({ kind: fc.constant('flip' as const), at: fc.nat(valid.length - 1), value: fc.integer({ min: 0, max: 255 }) }),
          fc.record({ kind: fc.constant('cut' as const), at: fc.nat(valid.length - 1), value: fc.constant(0) }),
          fc.record({ kind: fc.constant('insert' as const), at: fc.nat(valid.length - 1), value: fc.integer({ min: 0, max: 255 }) }),
        ),
        { minLength: 1, maxLength: 6 },
      )
      .map((edits) => {
        let b = Buffer.from(valid);
        for (const e of edits) {
          const at = Math.min(e.at, b.length);
          if (e.kind === 'flip') {
            if (at < b.length) b[at] = e.value;
          } else if (e.kind === 'cut') b = b.subarray(0, at);
          else b = Buffer.concat([b.subarray(0, at), Buffer.from([e.value]), b.subarray(at)]);
        }
        return b;
      });
    const stream = fc.oneof(fc.uint8Array({ maxLength: 512 }).map((u) => Buffer.from(u)), mutated, mutated);
    const started = Date.now();
    await fc.assert(
      fc.asyncProperty(stream, fc.boolean(), async (bytes, toReadOnly) => {
        await session(toReadOnly ? roSock : sock, bytes);
      }),
      { numRuns: Number(process.env.NBD_FUZZ_RUNS ?? 150), interruptAfterTimeLimit: 40_000, verbose: 2 },
    );
    expect(Date.now() - started).toBeLessThan(45_000);
    // Still up, nothing leaked, the backing file untouched.
    await new Promise((r) => setTimeout(r, 100));
    expect(served.server.connections).toBe(0);
    expect(sha(path.join(dir, 'base.img'))).toBe(backingHash);
    const c = await RawClient.connect(roSock);
    await c.go();
    c.request({ type: P.CMD_READ, offset: 0, length: SIZE });
    expect((await c.simpleReply(SIZE)).data.equals(backing)).toBe(true);
    c.close();
  }, 60_000);

  it.skipIf(missing.length > 0)(titleWithSkipReason('a real client (qemu-io) is served correctly after all that', missing), async () => {
    // Asynchronously: the server lives in this process and must keep running meanwhile.
    const r = await runProgram('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 500000 70000', '-c', 'read -P 0x3c 500000 70000', '-c', 'flush', nbdUri(sock)]);
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/fail|error/i);
  });
});
