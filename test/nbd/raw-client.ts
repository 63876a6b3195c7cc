/* A byte-level NBD client for tests that must send what real clients never would. */
import * as net from 'node:net';
import * as P from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';

export class RawClient {
  readonly reader: SocketReader;
  private closedFlag = false;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    this.reader = new SocketReader(socket);
    this.closed = new Promise((resolve) => socket.on('close', () => resolve()));
    socket.on('close', () => (this.closedFlag = true));
    socket.on('error', () => undefined);
  }

  static connect(socketPath: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(socketPath);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  send(...parts: Uint8Array[]): void {
    for (const p of parts) this.socket.write(p);
  }

  read(n: number): Promise<Buffer> {
    return this.reader.read(n);
  }

  /** Reads the greeting and answers with `clientFlags`. */
  async greet(clientFlags = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES): Promise<number> {
    const g = await this.read(P.GREETING_BYTES);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags, 0);
    this.send(flags);
    return g.readUInt16BE(16);
  }

  async option(option: number, data: Uint8Array = Buffer.alloc(0)): Promise<P.OptionReply[]> {
    this.send(P.encodeOptionHeader(option, data.length), data);
    const replies: P.OptionReply[] = [];
    for (;;) {
      const head = await this.read(20);
      const length = head.readUInt32BE(16);
      const body = await this.read(length);
      const reply = P.decodeOptionReply(Buffer.concat([head, body]))!.reply;
      replies.push(reply);
      if (reply.type === P.REP_ACK || reply.type >= 0x80000000) return replies;
    }
  }

  /** Handshake to transmission with NBD_OPT_GO; structured replies and base:allocation optional. */
  async go(options: { structured?: boolean; meta?: boolean; name?: string } = {}): Promise<{ size: number; flags: number }> {
    await this.greet();
    if (options.structured) await this.option(P.OPT_STRUCTURED_REPLY);
    if (options.meta) await this.option(P.OPT_SET_META_CONTEXT, P.encodeMetaContextRequest(options.name ?? '', [P.BASE_ALLOCATION]));
    const replies = await this.option(P.OPT_GO, P.encodeInfoRequest(options.name ?? '', [P.INFO_BLOCK_SIZE]));
    const last = replies[replies.length - 1];
    if (last.type !== P.REP_ACK) throw new Error(`NBD_OPT_GO failed: ${last.type.toString(16)} ${last.data.toString()}`);
    const info = replies.find((r) => r.type === P.REP_INFO && r.data.readUInt16BE(0) === P.INFO_EXPORT)!;
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10) };
  }

  request(r: { type: number; flags?: number; offset: number | bigint; length: number; handle?: bigint }, payload?: Uint8Array): void {
    this.send(P.encodeRequest({ handle: r.handle ?? 1n, ...r }));
    if (payload) this.send(payload);
  }

  /** A simple reply (and `dataLength` bytes of read data when the error is 0). */
  async simpleReply(dataLength = 0): Promise<{ error: number; handle: bigint; data: Buffer }> {
    const head = await this.read(P.SIMPLE_REPLY_BYTES);
    if (head.readUInt32BE(0) !== P.SIMPLE_REPLY_MAGIC) throw new Error(`not a simple reply: ${head.toString('hex')}`);
    const error = head.readUInt32BE(4);
    const data = error === 0 && dataLength > 0 ? await this.read(dataLength) : Buffer.alloc(0);
    return { error, handle: head.readBigUInt64BE(8), data };
  }

  /** One structured chunk (a simple reply is returned as type -1 with its error). */
  async chunk(): Promise<P.StructuredChunk | { type: -1; error: number; handle: Buffer; flags: number; payload: Buffer }> {
    const magic = await this.read(4);
    if (magic.readUInt32BE(0) === P.SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      return { type: -1, error: rest.readUInt32BE(0), handle: rest.subarray(4, 12), flags: 1, payload: Buffer.alloc(0) };
    }
    const head = Buffer.concat([magic, await this.read(16)]);
    const length = head.readUInt32BE(16);
    const payload = await this.read(length);
    return P.decodeStructuredChunk(Buffer.concat([head, payload]))!.chunk;
  }

  close(): void {
    this.socket.destroy();
  }
}
