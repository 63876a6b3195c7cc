/**
 * One NBD client connection: the fixed-newstyle handshake as a state machine, then the
 * transmission phase, which reads requests as fast as the in-flight budget allows, validates each
 * before it touches the device, and answers each as soon as the device settles it (replies may be
 * out of order, as the protocol permits). See server.ts for the server these connections share.
 */
import type * as net from 'node:net';
import * as P from './protocol.js';
import { osCalls } from '../os/libc.js';
import { ReplyBufferPool } from './reply-buffers.js';
import { ReplyWriter } from './reply-writer.js';
import { BLOCK_SIZES, requestProblem } from './request-checks.js';
import { waitForSlot } from './slots.js';
import { ConnectionClosed, SocketReader } from './socket-reader.js';
import type { ServerState } from './server-state.js';

export { BLOCK_SIZES };
/** Option data longer than this is taken as a denial-of-service attempt (hard disconnect). */
const MAX_OPTION_BYTES = 64 << 10;
/** Options per connection before the server gives up on the client. */
const MAX_OPTIONS = 4096;
/** Largest write payload read only to be refused (the spec says up to 32 MiB is never DoS). */
const MAX_DRAINED_PAYLOAD = 2 * BLOCK_SIZES.maximum;
const BASE_ALLOCATION_ID = 1;
const ZEROES = Buffer.alloc(1 << 20);
const MAX_STATUS_EXTENTS = 2048;
/** A client that has not chosen the export this long after connecting is dropped (qemu-nbd's default). */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Reads from this size on are sent from the files with sendfile when the device allows it. */
const ZERO_COPY_MIN_BYTES = 64 << 10;

interface MetaSelection {
  exportName: string;
  baseAllocation: boolean;
}

export class Connection {
  private readonly reader: SocketReader;
  private phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  private structured = false;
  private noZeroes = false;
  private meta: MetaSelection | undefined;
  private blockStatusOn = false;
  private flags = 0;
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiters: (() => void)[] = [];
  private finished: Promise<void> | undefined;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** One of the server's transmission slots (--shared) is this connection's. */
  private holdsSlot = false;
  private readonly peer: string;
  private readonly replyBuffers: ReplyBufferPool;
  private readonly output: ReplyWriter;

  constructor(
    private readonly server: ServerState,
    private readonly socket: net.Socket,
  ) {
    this.reader = new SocketReader(socket);
    this.replyBuffers = new ReplyBufferPool(server.options.maxInFlightBytes ?? 64 << 20);
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'local client';
    socket.on('error', () => undefined);
    this.output = new ReplyWriter(socket, server.options.zeroCopy === false ? undefined : osCalls());
  }

  run(): Promise<void> {
    this.finished ??= this.serve();
    return this.finished;
  }

  /** Handshake: drop the client. Transmission: stop reading, finish what is in flight, then close. */
  async stop(): Promise<void> {
    if (this.phase === 'handshake') this.socket.destroy();
    this.reader.abort();
    await this.finished?.catch(() => undefined);
  }

  /** Closes the connection now, whatever is in flight (a shutdown whose grace ran out). */
  abandon(why: string): void {
    if (this.socket.destroyed) return;
    this.log(why);
    this.socket.destroy();
  }

  private log(line: string): void {
    this.server.options.log?.(`${this.peer}: ${line}`);
  }

  private async serve(): Promise<void> {
    const timeoutMs = this.server.options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
    this.handshakeTimer = setTimeout(() => {
      if (this.phase === 'handshake') {
        this.log(`handshake not finished within ${timeoutMs} ms: closing`);
        this.socket.destroy();
      }
    }, timeoutMs);
    try {
      const proceed = await this.handshake();
      clearTimeout(this.handshakeTimer);
      if (proceed) await this.transmit();
    } catch (err) {
      if (!(err instanceof ConnectionClosed)) this.log(`dropped: ${(err as Error).message}`);
    } finally {
      clearTimeout(this.handshakeTimer);
      this.phase = 'closing';
      await this.drain();
      this.output.close();
      this.socket.end();
      this.socket.destroySoon?.();
      setTimeout(() => this.socket.destroy(), 1000).unref();
      if (this.holdsSlot) {
        this.holdsSlot = false;
        this.server.slots.release();
      }
    }
  }

  /** A transmission slot (--shared); the handshake timer stops first: a client waiting here has done its part. */
  private async takeSlot(): Promise<boolean> {
    clearTimeout(this.handshakeTimer);
    this.holdsSlot = await waitForSlot(this.server.slots, this.socket, (line) => this.log(line));
    return this.holdsSlot;
  }

  // ---- handshake -------------------------------------------------------------------------

  private transmissionFlags(): number {
    let flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA;
    flags |= this.server.readOnly ? P.FLAG_READ_ONLY : P.FLAG_SEND_WRITE_ZEROES;
    if (this.structured) flags |= P.FLAG_SEND_DF;
    // One device and one flush for all connections: a FLUSH on any connection covers every write.
    if (this.server.shared > 1) flags |= P.FLAG_CAN_MULTI_CONN;
    return flags;
  }

  /** True when the client chose the export and transmission begins. */
  private async handshake(): Promise<boolean> {
    void this.send(P.encodeGreeting(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES));
    const clientFlags = (await this.reader.read(P.CLIENT_FLAGS_BYTES)).readUInt32BE(0);
    if ((clientFlags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) !== 0) {
      this.log(`unknown client flags 0x${clientFlags.toString(16)}: closing, as the protocol requires`);
      return false;
    }
    this.noZeroes = (clientFlags & P.FLAG_C_NO_ZEROES) !== 0;
    for (let count = 0; count < MAX_OPTIONS; count++) {
      const header = P.decodeOptionHeader(await this.reader.read(P.OPTION_HEADER_BYTES));
      if (!header) {
        this.log('bad option magic: closing');
        return false;
      }
      if (header.length > MAX_OPTION_BYTES) {
        this.log(`option ${header.option} with ${header.length} bytes of data: closing`);
        return false;
      }
      const data = await this.reader.read(header.length);
      const outcome = await this.option(header.option, data);
      if (outcome !== 'continue') return outcome === 'transmit';
    }
    this.log(`more than ${MAX_OPTIONS} options: closing`);
    return false;
  }

  private reply(option: number, type: number, data?: Uint8Array): void {
    void this.send(P.encodeOptionReply(option, type, data));
  }

  private error(option: number, type: number, message: string): 'continue' {
    void this.send(P.encodeOptionError(option, type, message));
    return 'continue';
  }

  private async option(option: number, data: Buffer): Promise<'continue' | 'transmit' | 'close'> {
    if (this.server.stopping && option !== P.OPT_ABORT) return this.error(option, P.REP_ERR_SHUTDOWN, 'server is shutting down');
    switch (option) {
      case P.OPT_EXPORT_NAME: {
        const name = P.decodeString(data, 'export name');
        // This option cannot be answered with an error: the spec says to end the session.
        if (!name.ok || !this.server.isOurExport(name.value)) {
          this.log(`NBD_OPT_EXPORT_NAME for an unknown export: closing`);
          return 'close';
        }
        if (!(await this.takeSlot())) return 'close';
        this.enterTransmission(name.value);
        void this.send(P.encodeExportNameReply(this.server.device.size, this.flags, this.noZeroes));
        return 'transmit';
      }
      case P.OPT_ABORT:
        this.reply(option, P.REP_ACK);
        return 'close';
      case P.OPT_LIST:
        if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        this.reply(option, P.REP_SERVER, P.encodeServerEntry(this.server.exportName, this.server.options.description ?? ''));
        this.reply(option, P.REP_ACK);
        return 'continue';
      case P.OPT_STARTTLS:
        if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        return this.error(option, P.REP_ERR_UNSUP, 'this server does not support TLS');
      case P.OPT_INFO:
      case P.OPT_GO:
        return this.infoOrGo(option, data);
      case P.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        this.reply(option, P.REP_ACK);
        return 'continue';
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.error(option, P.REP_ERR_UNSUP, `option ${option} is not supported by this server`);
    }
  }

  private async infoOrGo(option: number, data: Buffer): Promise<'continue' | 'transmit' | 'close'> {
    const request = P.decodeInfoRequest(data);
    if (!request.ok) return this.error(option, P.REP_ERR_INVALID, request.problem);
    const { name, requests } = request.value;
    if (!this.server.isOurExport(name)) return this.error(option, P.REP_ERR_UNKNOWN, `no export named "${name}"`);
    if (option === P.OPT_GO && !(await this.takeSlot())) return 'close';
    const flags = this.transmissionFlags();
    this.reply(option, P.REP_INFO, P.encodeInfoExport(this.server.device.size, flags));
    if (requests.includes(P.INFO_NAME)) this.reply(option, P.REP_INFO, P.encodeInfoString(P.INFO_NAME, this.server.exportName));
    const description = this.server.options.description;
    if (requests.includes(P.INFO_DESCRIPTION) && description) this.reply(option, P.REP_INFO, P.encodeInfoString(P.INFO_DESCRIPTION, description));
    // Sent even unrequested (allowed): our maximum is tighter than the default "unlimited".
    this.reply(option, P.REP_INFO, P.encodeInfoBlockSize(BLOCK_SIZES));
    this.reply(option, P.REP_ACK);
    if (option === P.OPT_INFO) return 'continue';
    this.enterTransmission(name);
    return 'transmit';
  }

  private metaContext(option: number, data: Buffer): 'continue' {
    const set = option === P.OPT_SET_META_CONTEXT;
    // A SET replaces the selection even when it fails.
    if (set) this.meta = undefined;
    if (set && !this.structured) return this.error(option, P.REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
    const request = P.decodeMetaContextRequest(data);
    if (!request.ok) return this.error(option, P.REP_ERR_INVALID, request.problem);
    const { name, queries } = request.value;
    if (!this.server.isOurExport(name)) return this.error(option, P.REP_ERR_UNKNOWN, `no export named "${name}"`);
    const found = new Set<string>();
    if (!set && queries.length === 0) found.add(P.BASE_ALLOCATION);
    for (const query of queries) for (const context of P.matchMetaContexts(query, !set)) found.add(context);
    for (const context of found) this.reply(option, P.REP_META_CONTEXT, P.encodeMetaContext(set ? BASE_ALLOCATION_ID : 0, context));
    this.reply(option, P.REP_ACK);
    if (set) this.meta = { exportName: name, baseAllocation: found.has(P.BASE_ALLOCATION) };
    return 'continue';
  }

  private enterTransmission(name: string): void {
    this.flags = this.transmissionFlags();
    this.blockStatusOn = this.structured && this.meta !== undefined && this.meta.baseAllocation && this.meta.exportName === name;
    this.phase = 'transmission';
  }

  // ---- transmission ----------------------------------------------------------------------

  private async transmit(): Promise<void> {
    const budget = this.server.options.maxInFlightBytes ?? 64 << 20;
    for (;;) {
      const request = P.decodeRequest(this.reader.tryRead(P.REQUEST_HEADER_BYTES) ?? (await this.reader.read(P.REQUEST_HEADER_BYTES)));
      if (!request) {
        this.log('bad request magic: closing');
        return;
      }
      let payload: Buffer | undefined;
      if (request.type === P.CMD_WRITE) {
        // The payload must be consumed to stay in step with the client, even for a refused write.
        if (request.length > MAX_DRAINED_PAYLOAD) {
          this.log(`write of ${request.length} bytes: closing (the limit is ${BLOCK_SIZES.maximum})`);
          return;
        }
        payload = this.reader.tryRead(request.length) ?? (await this.reader.read(request.length));
      }
      if (request.type === P.CMD_DISC) return;
      const cost = request.type === P.CMD_READ ? Math.min(request.length, MAX_DRAINED_PAYLOAD) : (payload?.length ?? 0);
      while (this.inFlight > 0 && this.inFlightBytes + cost > budget) await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
      this.inFlight++;
      this.inFlightBytes += cost;
      void this.handle(request, payload)
        .catch((err) => {
          this.log(`request failed unexpectedly: ${(err as Error).message}`);
          this.socket.destroy();
        })
        .finally(() => {
          this.inFlight--;
          this.inFlightBytes -= cost;
          for (const wake of this.slotWaiters.splice(0)) wake();
        });
    }
  }

  /** Waits until no request is in flight. */
  private async drain(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
  }

  private async handle(r: P.Request, payload: Buffer | undefined): Promise<void> {
    const refused = requestProblem(r, { size: this.server.device.size, readOnly: this.server.readOnly, structured: this.structured, blockStatusOn: this.blockStatusOn });
    if (refused) return this.sendError(r, refused.error, refused.message);
    const device = this.server.device;
    try {
      switch (r.type) {
        case P.CMD_READ:
          return await this.read(r);
        case P.CMD_WRITE:
          if (r.length > 0) await device.write(r.offset, payload!);
          if (r.flags & P.CMD_FLAG_FUA) await this.durable();
          return this.sendOk(r);
        case P.CMD_WRITE_ZEROES:
          await this.writeZeroes(r.offset, r.length);
          if (r.flags & P.CMD_FLAG_FUA) await this.durable();
          return this.sendOk(r);
        case P.CMD_FLUSH:
          if (!this.server.readOnly) await device.flush();
          return this.sendOk(r);
        case P.CMD_BLOCK_STATUS:
          return await this.blockStatus(r);
      }
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? ((err as { cause?: NodeJS.ErrnoException }).cause?.code);
      return this.sendError(r, P.nbdErrorFor(code), (err as Error).message);
    }
  }

  private durable(): Promise<void> {
    return this.server.options.writesDurable ? Promise.resolve() : this.server.device.flush();
  }

  private async read(r: P.Request): Promise<void> {
    const device = this.server.device;
    if (this.structured && r.length === 0) return this.send(P.encodeStructuredNone(r.handle));
    // The header goes out only once the data is read, or the device has named where every byte
    // lives, so DONE on the one data chunk is safe.
    const headerBytes = this.structured ? P.OFFSET_DATA_PREFIX_BYTES : P.SIMPLE_REPLY_BYTES;
    const writeHeader = (into: Buffer) => {
      if (this.structured) P.writeOffsetDataPrefix(into, P.REPLY_FLAG_DONE, r.handle, r.offset, r.length);
      else P.writeSimpleReplyHeader(into, 0, r.handle);
    };
    if (r.length >= ZERO_COPY_MIN_BYTES && this.output.zeroCopy && device.withFileRanges) {
      const header = Buffer.allocUnsafe(headerBytes);
      writeHeader(header);
      const sent = device.withFileRanges(r.offset, r.length, (ranges) => this.output.sendFile(header, ranges));
      if (sent) return sent;
    }
    const reply = this.replyBuffers.take(headerBytes + r.length);
    try {
      if (r.length > 0) await device.readInto(r.offset, reply.subarray(headerBytes));
    } catch (err) {
      this.replyBuffers.give(reply);
      throw err;
    }
    writeHeader(reply);
    return this.send(reply, () => this.replyBuffers.give(reply));
  }

  private async writeZeroes(offset: number, length: number): Promise<void> {
    // Zeroes are written as data (NO_HOLE holds trivially): a COW has no way to punch a sector.
    const pieces: Promise<void>[] = [];
    for (let at = 0; at < length; at += ZEROES.length) {
      pieces.push(this.server.device.write(offset + at, ZEROES.subarray(0, Math.min(ZEROES.length, length - at))));
    }
    await Promise.all(pieces);
  }

  private async blockStatus(r: P.Request): Promise<void> {
    const reqOne = (r.flags & P.CMD_FLAG_REQ_ONE) !== 0;
    const query = this.server.device.blockStatus;
    let descriptors = query
      ? await query.call(this.server.device, r.offset, r.length, reqOne ? 1 : MAX_STATUS_EXTENTS)
      : [{ length: r.length, flags: 0 }];
    // Never more than asked for: one descriptor with REQ_ONE, never past the request's end.
    let total = 0;
    const clipped: P.StatusDescriptor[] = [];
    for (const d of descriptors) {
      if (total >= r.length || (reqOne && clipped.length === 1)) break;
      const length = Math.min(d.length, r.length - total);
      if (length <= 0) continue;
      clipped.push({ length, flags: d.flags });
      total += length;
    }
    descriptors = clipped.length > 0 ? clipped : [{ length: r.length, flags: 0 }];
    return this.send(P.encodeBlockStatus(P.REPLY_FLAG_DONE, r.handle, BASE_ALLOCATION_ID, descriptors));
  }

  private sendOk(r: P.Request): Promise<void> {
    return this.send(P.encodeSimpleReply(0, r.handle));
  }

  private sendError(r: P.Request, error: number, message: string): Promise<void> {
    // Structured replies carry a message, and a READ must not get a simple reply once negotiated.
    if (this.structured) return this.send(P.encodeStructuredError(r.handle, error, message));
    return this.send(P.encodeSimpleReply(error, r.handle));
  }

  /** Resolves once the socket can take more (its buffer counts against the in-flight budget). */
  private send(data: Buffer, onWritten?: () => void): Promise<void> {
    return this.output.write(data, onWritten);
  }
}
