/**
 * The handshake settles the options once: negotiate() returns one frozen Negotiated value when
 * the client chooses the export, and that value is what the choosing reply advertised (flags,
 * size, block sizes), whatever options came and went before. Driven byte by byte by RawClient.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import * as P from '../../src/nbd/protocol.js';
import { negotiate } from '../../src/nbd/handshake.js';
import type { Negotiated } from '../../src/nbd/negotiated.js';
import { BLOCK_SIZES } from '../../src/nbd/request-checks.js';
import type { ServerState } from '../../src/nbd/server-state.js';
import { TransmissionSlots } from '../../src/nbd/slots.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';
import { RawClient } from './raw-client.js';

const SIZE = 3 << 20;
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

function serverState(options: { readOnly?: boolean; shared?: number } = {}): ServerState {
  const untouched = () => Promise.reject(new Error('the handshake never touches the data'));
  return {
    device: { size: SIZE, readOnly: false, readInto: untouched, write: untouched, flush: untouched },
    options: { description: 'a test export' },
    shared: options.shared ?? 1,
    readOnly: options.readOnly ?? false,
    slots: new TransmissionSlots(options.shared ?? 1),
    stopping: false,
    exportName: 'ubd',
    isOurExport: (name) => name === 'ubd' || name === '',
  };
}

/** Runs negotiate() on the server side of a Unix socket; the client side is a RawClient. */
async function handshake(state: ServerState, slot = true): Promise<{ client: RawClient; result: Promise<Negotiated | undefined> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubdcow-handshake-'));
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(path.join(dir, 's'), resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = await RawClient.connect(path.join(dir, 's'));
  const socket = await accepted;
  cleanups.push(() => {
    client.socket.destroy();
    socket.destroy();
    listener.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const result = negotiate(state, {
    reader: new SocketReader(socket),
    send: (data) => void socket.write(data),
    log: () => undefined,
    takeSlot: async () => slot,
  });
  return { client, result };
}

function infoOf(replies: P.OptionReply[], type: number): Buffer {
  return replies.find((r) => r.type === P.REP_INFO && r.data.readUInt16BE(0) === type)!.data;
}

describe('negotiate', () => {
  it('NBD_OPT_GO: one frozen value, the flags, size and block sizes the GO reply advertised', async () => {
    const { client, result } = await handshake(serverState());
    await client.greet();
    await client.option(P.OPT_STRUCTURED_REPLY);
    await client.option(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest('ubd', [P.BASE_ALLOCATION]));
    const replies = await client.option(P.OPT_GO, P.encodeInfoRequest('ubd', []));
    const negotiated = (await result)!;
    expect(Object.isFrozen(negotiated)).toBe(true);
    const exportInfo = infoOf(replies, P.INFO_EXPORT);
    const sizes = infoOf(replies, P.INFO_BLOCK_SIZE);
    expect(negotiated).toEqual({
      exportName: 'ubd',
      size: Number(exportInfo.readBigUInt64BE(2)),
      readOnly: false,
      structured: true,
      noZeroes: true,
      baseAllocationId: 1,
      transmissionFlags: exportInfo.readUInt16BE(10),
      blockSizes: { minimum: sizes.readUInt32BE(2), preferred: sizes.readUInt32BE(6), maximum: sizes.readUInt32BE(10) },
    });
    expect(negotiated.size).toBe(SIZE);
    expect(negotiated.blockSizes).toEqual(BLOCK_SIZES);
    expect(negotiated.transmissionFlags & P.FLAG_SEND_DF).toBe(P.FLAG_SEND_DF);
    expect(negotiated.transmissionFlags & P.FLAG_READ_ONLY).toBe(0);
  });

  it('the last SET_META_CONTEXT decides, and only for the export chosen', async () => {
    for (const [sets, chosen, expected] of [
      [[['ubd', [P.BASE_ALLOCATION]], ['ubd', ['nocolon']]], 'ubd', undefined],
      [[['ubd', ['nocolon']], ['', [P.BASE_ALLOCATION]]], '', 1],
      [[['ubd', [P.BASE_ALLOCATION]]], '', undefined],
    ] as const) {
      const { client, result } = await handshake(serverState());
      await client.greet();
      await client.option(P.OPT_STRUCTURED_REPLY);
      for (const [name, queries] of sets) await client.option(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest(name, [...queries]));
      // NBD_OPT_INFO shows the export without choosing it: the handshake goes on.
      await client.option(P.OPT_INFO, P.encodeInfoRequest(chosen, []));
      await client.option(P.OPT_GO, P.encodeInfoRequest(chosen, []));
      const negotiated = (await result)!;
      expect(negotiated.exportName).toBe(chosen);
      expect(negotiated.baseAllocationId).toBe(expected);
    }
  });

  it('NBD_OPT_EXPORT_NAME without NO_ZEROES: the 134-byte reply carries the value\'s flags; read-only and --shared show in them', async () => {
    const { client, result } = await handshake(serverState({ readOnly: true, shared: 2 }));
    await client.greet(P.FLAG_C_FIXED_NEWSTYLE);
    client.send(P.encodeOptionHeader(P.OPT_EXPORT_NAME, 0));
    const reply = await client.read(134);
    const negotiated = (await result)!;
    expect(negotiated).toMatchObject({ exportName: '', structured: false, noZeroes: false, readOnly: true, baseAllocationId: undefined });
    expect(Number(reply.readBigUInt64BE(0))).toBe(negotiated.size);
    expect(reply.readUInt16BE(8)).toBe(negotiated.transmissionFlags);
    expect(negotiated.transmissionFlags & (P.FLAG_READ_ONLY | P.FLAG_CAN_MULTI_CONN)).toBe(P.FLAG_READ_ONLY | P.FLAG_CAN_MULTI_CONN);
    expect(reply.subarray(10).every((b) => b === 0)).toBe(true);
  });

  it('no value when the session ends in the handshake: NBD_OPT_ABORT, or no slot came', async () => {
    const aborted = await handshake(serverState());
    await aborted.client.greet();
    await aborted.client.option(P.OPT_ABORT);
    expect(await aborted.result).toBeUndefined();

    const noSlot = await handshake(serverState(), false);
    await noSlot.client.greet();
    noSlot.client.send(P.encodeOptionHeader(P.OPT_GO, 6), P.encodeInfoRequest('', []));
    expect(await noSlot.result).toBeUndefined();
  });
});
