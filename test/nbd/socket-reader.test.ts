/**
 * SocketReader.tryRead: the request loop takes requests already buffered without a promise each,
 * so it must hand out exactly the bytes read() would, in order, and never jump a pending read.
 */
import * as net from 'node:net';
import { describe, expect, it } from 'vitest';
import { SocketReader } from '../../src/nbd/socket-reader.js';

/** A connected pair of sockets; `server` is the side read with a SocketReader. */
async function socketPair(): Promise<{ client: net.Socket; server: net.Socket; close: () => void }> {
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const { port } = listener.address() as net.AddressInfo;
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect(port, '127.0.0.1');
  const server = await accepted;
  return {
    client,
    server,
    close: () => {
      client.destroy();
      server.destroy();
      listener.close();
    },
  };
}

describe('SocketReader.tryRead', () => {
  it('returns buffered bytes at once, in order with read(), and undefined while short or while a read waits', async () => {
    const { client, server, close } = await socketPair();
    try {
      const reader = new SocketReader(server);
      expect(reader.tryRead(4)).toBeUndefined();
      const pending = reader.read(6);
      client.write(Buffer.from('abc'));
      // A read is waiting: tryRead must not take bytes from under it.
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(reader.tryRead(2)).toBeUndefined();
      client.write(Buffer.from('defghijklm'));
      expect((await pending).toString()).toBe('abcdef');
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(reader.tryRead(3)?.toString()).toBe('ghi');
      expect(reader.tryRead(5)).toBeUndefined();
      expect(reader.tryRead(4)?.toString()).toBe('jklm');
      expect(reader.tryRead(1)).toBeUndefined();
      client.write(Buffer.from('n'));
      expect((await reader.read(1)).toString()).toBe('n');
    } finally {
      close();
    }
  });
});
