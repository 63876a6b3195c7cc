/**
 * READ replies sent with sendfile straight from the COW's and the backing's page cache
 * (nbd/reply-writer.ts, CowDevice.withFileRanges): the same bytes, handles and order as the
 * copying path, under pipelines that fill the socket; errors found before the header goes out are
 * ordinary error replies; a file that ends inside a reply closes only that connection.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { type CowDevice, openCow } from '../../src/io/engine/engine.js';
import { memoryImage, openMemoryCow } from '../io/engine-setup.js';
import { type NbdServer, serveNbd } from '../../src/nbd/server.js';
import * as P from '../../src/nbd/protocol.js';
import { type OsCalls, osCalls, osCallsUnavailable, overrideOsCalls } from '../../src/os/libc.js';
import { seededRandom } from '../helpers/cow-writes.js';
import { useTempDir } from '../helpers/tmp.js';
import { titleWithSkipReason } from '../helpers/tools.js';
import { RawClient } from './raw-client.js';

const SECTORS = 8192; // 4 MiB
const unavailable = osCallsUnavailable();

/** sendFile calls made through the bindings while `counted` is in force. */
function countingCalls(): { calls: OsCalls; sent: () => number } {
  const real = osCalls()!;
  let sent = 0;
  return {
    calls: {
      ...real,
      sendFile: (...args) => {
        sent++;
        return real.sendFile(...args);
      },
    },
    sent: () => sent,
  };
}

describe.skipIf(unavailable !== undefined)(titleWithSkipReason('NBD READ replies sent with sendfile', unavailable ? [unavailable] : []), () => {
  const tmp = useTempDir();
  const opened: { server?: NbdServer; device?: CowDevice; clients: RawClient[]; restore?: { reset(): void } } = { clients: [] };
  afterEach(async () => {
    for (const client of opened.clients.splice(0)) client.close();
    await opened.server?.close();
    await opened.device?.close();
    opened.restore?.reset();
    opened.server = opened.device = opened.restore = undefined;
  });

  /** A COW over a patterned backing, with random data written over scattered sector runs. */
  async function makeCow(): Promise<string> {
    const random = seededRandom(7);
    const backing = path.join(tmp.path, 'base.img');
    const pattern = Buffer.alloc(SECTORS * 512);
    for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE(i, i);
    fs.writeFileSync(backing, pattern);
    const cow = path.join(tmp.path, 'disk.cow');
    await createCow(cow, backing);
    const device = await openCow(cow);
    for (let n = 0; n < 200; n++) {
      const sector = Math.floor(random() * (SECTORS - 64));
      const data = Buffer.alloc((1 + Math.floor(random() * 63)) * 512);
      for (let i = 0; i < data.length; i++) data[i] = Math.floor(random() * 256);
      await device.write(sector * 512, data);
    }
    await device.close();
    return cow;
  }

  async function serve(cow: string, zeroCopy: boolean): Promise<{ device: CowDevice; socket: string }> {
    const device = await openCow(cow, { readOnly: true });
    const socket = path.join(tmp.path, `nbd-${zeroCopy}.sock`);
    opened.device = device;
    opened.server = await serveNbd(device, { socket, readOnly: true, zeroCopy });
    return { device, socket };
  }

  async function client(socket: string, structured: boolean): Promise<RawClient> {
    const c = await RawClient.connect(socket);
    opened.clients.push(c);
    await c.go({ structured });
    return c;
  }

  /** Sends every read at once, then takes the replies as they come and checks each by its handle. */
  async function pipelinedReads(c: RawClient, device: CowDevice, structured: boolean, reads: { offset: number; length: number }[]): Promise<void> {
    reads.forEach((r, i) => c.request({ type: P.CMD_READ, offset: r.offset, length: r.length, handle: BigInt(i + 1) }));
    // Not reading for a while fills the socket, so the server meets EAGAIN and libuv queues writes.
    c.socket.pause();
    await new Promise((resolve) => setTimeout(resolve, 15));
    c.socket.resume();
    const seen = new Set<number>();
    for (let n = 0; n < reads.length; n++) {
      let index: number;
      let data: Buffer;
      if (structured) {
        const chunk = await c.chunk();
        expect(chunk.type).toBe(P.REPLY_TYPE_OFFSET_DATA);
        const handle = Number(Buffer.from((chunk as { handle: Uint8Array }).handle).readBigUInt64BE(0));
        index = handle - 1;
        const payload = Buffer.from((chunk as { payload: Uint8Array }).payload);
        expect(Number(payload.readBigUInt64BE(0))).toBe(reads[index]!.offset);
        data = payload.subarray(8);
      } else {
        const head = await c.read(P.SIMPLE_REPLY_BYTES);
        expect(head.readUInt32BE(4)).toBe(0);
        index = Number(head.readBigUInt64BE(8)) - 1;
        data = await c.read(reads[index]!.length);
      }
      expect(seen.has(index)).toBe(false);
      seen.add(index);
      const expected = Buffer.from(await device.read(reads[index]!.offset, reads[index]!.length));
      expect(data.equals(expected), `read ${index}: ${JSON.stringify(reads[index])}`).toBe(true);
    }
  }

  // Small reads are copied through buffers and large ones sent from the files: both kinds mixed,
  // so libuv often holds part of a buffer reply when a file reply is next.
  const lengthArb = fc.oneof(fc.integer({ min: 1, max: 65_535 }), fc.integer({ min: 65_536, max: 700_000 }));
  const readArb = fc.record({ offset: fc.integer({ min: 0, max: SECTORS * 512 - 1 }), length: lengthArb }).map((r) => ({
    offset: r.offset,
    length: Math.min(r.length, SECTORS * 512 - r.offset),
  }));

  for (const structured of [false, true]) {
    it(`${structured ? 'structured' : 'simple'} replies: pipelines of large and small reads at any offset equal the device's bytes, through sendfile`, async () => {
      const cow = await makeCow();
      const counting = countingCalls();
      opened.restore = overrideOsCalls(counting.calls);
      const { device, socket } = await serve(cow, true);
      const c = await client(socket, structured);
      await fc.assert(
        fc.asyncProperty(fc.array(readArb, { minLength: 1, maxLength: 60 }), (reads) => pipelinedReads(c, device, structured, reads)),
        { numRuns: 15, seed: 12 },
      );
      expect(counting.sent()).toBeGreaterThan(0);
    });
  }

  it('ranges not in the page cache are read on the thread pool instead (sendfile would stall the event loop): same bytes, same order', async () => {
    const cow = await makeCow();
    const counting = countingCalls();
    opened.restore = overrideOsCalls({ ...counting.calls, readCached: () => undefined });
    const { device, socket } = await serve(cow, true);
    const c = await client(socket, false);
    await fc.assert(
      fc.asyncProperty(fc.array(readArb, { minLength: 1, maxLength: 30 }), (reads) => pipelinedReads(c, device, false, reads)),
      { numRuns: 5, seed: 4 },
    );
    expect(counting.sent()).toBe(0);
  });

  it('zeroCopy: false sends the same bytes without sendfile', async () => {
    const cow = await makeCow();
    const counting = countingCalls();
    opened.restore = overrideOsCalls(counting.calls);
    const { device, socket } = await serve(cow, false);
    const c = await client(socket, true);
    await pipelinedReads(c, device, true, [{ offset: 0, length: SECTORS * 512 }, { offset: 513, length: 300_000 }]);
    expect(counting.sent()).toBe(0);
  });

  it('a data area shorter than a set bit needs: an error reply before any byte, and the connection goes on', async () => {
    const cow = await makeCow();
    const device = await openCow(cow);
    await device.write((SECTORS - 256) * 512, Buffer.alloc(256 * 512, 0x77));
    const dataEnd = device.geometry.dataOffset + SECTORS * 512;
    await device.close();
    fs.truncateSync(cow, dataEnd - 128 * 512);
    const { socket } = await serve(cow, true);
    const c = await client(socket, true);
    c.request({ type: P.CMD_READ, offset: (SECTORS - 512) * 512, length: 512 * 512, handle: 5n });
    const chunk = await c.chunk();
    expect(chunk.type).toBe(P.REPLY_TYPE_ERROR);
    c.request({ type: P.CMD_READ, offset: 0, length: 128 << 10, handle: 6n });
    expect((await c.chunk()).type).toBe(P.REPLY_TYPE_OFFSET_DATA);
    expect(c.isClosed).toBe(false);
  });

  it('a file that ends inside a reply already under way closes that connection only; the server serves the next client', async () => {
    const file = path.join(tmp.path, 'short.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 0x42));
    const fd = fs.openSync(file, 'r');
    try {
      // A device that claims 4 MiB but names a 1 MiB file for all of it.
      const device = {
        size: 4 << 20,
        readOnly: true,
        readInto: async (offset: number, buffer: Uint8Array) => buffer.fill(0x42),
        write: async () => undefined,
        flush: async () => undefined,
        withFileRanges: (offset: number, length: number, send: (ranges: { fd: number; position: number; length: number }[]) => Promise<void>) =>
          send([{ fd, position: offset, length }]),
      };
      const socket = path.join(tmp.path, 'short.sock');
      opened.server = await serveNbd(device, { socket, readOnly: true });
      const bad = await client(socket, true);
      bad.request({ type: P.CMD_READ, offset: (1 << 20) - 4096, length: 1 << 20, handle: 1n });
      await bad.closed;
      const good = await client(socket, true);
      good.request({ type: P.CMD_READ, offset: 0, length: 256 << 10, handle: 2n });
      const chunk = await good.chunk();
      expect(chunk.type).toBe(P.REPLY_TYPE_OFFSET_DATA);
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe('CowDevice.withFileRanges', () => {
  it('is undefined on a file system without descriptors (the server then copies)', async () => {
    const { fs } = await memoryImage(1 << 20, seededRandom(3));
    const device = await openMemoryCow(fs);
    try {
      expect(device.withFileRanges(0, 4096, async () => undefined)).toBeUndefined();
    } finally {
      await device.close();
    }
  });
});
