/**
 * The transmission phase of one connection: reads requests as fast as the in-flight budget
 * allows, validates each (request-checks.ts) before it touches the device, dispatches it, and
 * answers each as soon as the device settles it (replies may be out of order, as the protocol
 * permits) through the connection's one ReplyWriter.
 *
 * Invariants: the loop serves by the `Negotiated` value the handshake settled (structured
 * replies, base:allocation, read-only, size, block sizes) and never re-decides it. At most
 * `maxInFlightBytes` of write payloads and read replies are in flight (one request always may
 * run, whatever its size), so a client that floods requests is slowed, not buffered. A request
 * is refused with the protocol's error value before the device sees it; a write's payload is
 * read even when the write is refused, so the stream stays in step with the client.
 */
import * as P from './protocol.js';
import type { Negotiated } from './negotiated.js';
import { ReplyBufferPool } from './reply-buffers.js';
import type { ReplyWriter } from './reply-writer.js';
import { requestProblem } from './request-checks.js';
import type { NbdBlockDevice } from './server-state.js';
import type { SocketReader } from './socket-reader.js';

const ZEROES = Buffer.alloc(1 << 20);
const MAX_STATUS_EXTENTS = 2048;
/** Reads from this size on are sent from the files with sendfile when the device allows it. */
const ZERO_COPY_MIN_BYTES = 64 << 10;
/** Bytes in flight per connection when the serve options do not say (NbdServeOptions.maxInFlightBytes). */
export const DEFAULT_MAX_IN_FLIGHT_BYTES = 64 << 20;

/** What the loop serves and through what. */
export interface RequestLoopIo {
  readonly device: NbdBlockDevice;
  /** device.write is durable once it resolves: FUA needs no flush. */
  readonly writesDurable: boolean;
  readonly maxInFlightBytes: number;
  readonly reader: SocketReader;
  readonly output: ReplyWriter;
  log(line: string): void;
  /** Ends the connection at once: a request failed in a way no reply can tell. */
  destroy(): void;
}

export class RequestLoop {
  private inFlight = 0;
  private inFlightBytes = 0;
  /** Woken whenever a request settles: the reader waiting for budget, and drain(). */
  private budgetWaiters: (() => void)[] = [];
  private readonly replyBuffers: ReplyBufferPool;
  /** Largest write payload read only to be refused (the spec says up to 32 MiB is never DoS). */
  private readonly maxDrainedPayload: number;

  constructor(
    private readonly negotiated: Negotiated,
    private readonly io: RequestLoopIo,
  ) {
    this.replyBuffers = new ReplyBufferPool(io.maxInFlightBytes);
    this.maxDrainedPayload = 2 * negotiated.blockSizes.maximum;
  }

  /** Serves requests until NBD_CMD_DISC or a broken request; rejects with ConnectionClosed when the client leaves or the reader is aborted. */
  async run(): Promise<void> {
    const { reader, maxInFlightBytes: budget } = this.io;
    for (;;) {
      const request = P.decodeRequest(reader.tryRead(P.REQUEST_HEADER_BYTES) ?? (await reader.read(P.REQUEST_HEADER_BYTES)));
      if (!request) {
        this.io.log('bad request magic: closing');
        return;
      }
      let payload: Buffer | undefined;
      if (request.type === P.CMD_WRITE) {
        // The payload must be consumed to stay in step with the client, even for a refused write.
        if (request.length > this.maxDrainedPayload) {
          this.io.log(`write of ${request.length} bytes: closing (the limit is ${this.negotiated.blockSizes.maximum})`);
          return;
        }
        payload = reader.tryRead(request.length) ?? (await reader.read(request.length));
      }
      if (request.type === P.CMD_DISC) return;
      const cost = request.type === P.CMD_READ ? Math.min(request.length, this.maxDrainedPayload) : (payload?.length ?? 0);
      while (this.inFlight > 0 && this.inFlightBytes + cost > budget) await new Promise<void>((resolve) => this.budgetWaiters.push(resolve));
      this.inFlight++;
      this.inFlightBytes += cost;
      void this.handle(request, payload)
        .catch((err) => {
          this.io.log(`request failed unexpectedly: ${(err as Error).message}`);
          this.io.destroy();
        })
        .finally(() => {
          this.inFlight--;
          this.inFlightBytes -= cost;
          for (const wake of this.budgetWaiters.splice(0)) wake();
        });
    }
  }

  /** Waits until no request is in flight. */
  async drain(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((resolve) => this.budgetWaiters.push(resolve));
  }

  private async handle(r: P.Request, payload: Buffer | undefined): Promise<void> {
    const refused = requestProblem(r, this.negotiated);
    if (refused) return this.sendError(r, refused.error, refused.message);
    const device = this.io.device;
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
          if (!this.negotiated.readOnly) await device.flush();
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
    return this.io.writesDurable ? Promise.resolve() : this.io.device.flush();
  }

  private async read(r: P.Request): Promise<void> {
    const device = this.io.device;
    const structured = this.negotiated.structured;
    if (structured && r.length === 0) return this.send(P.encodeStructuredNone(r.handle));
    // The header goes out only once the data is read, or the device has named where every byte
    // lives, so DONE on the one data chunk is safe.
    const headerBytes = structured ? P.OFFSET_DATA_PREFIX_BYTES : P.SIMPLE_REPLY_BYTES;
    const writeHeader = (into: Buffer) => {
      if (structured) P.writeOffsetDataPrefix(into, P.REPLY_FLAG_DONE, r.handle, r.offset, r.length);
      else P.writeSimpleReplyHeader(into, 0, r.handle);
    };
    if (r.length >= ZERO_COPY_MIN_BYTES && this.io.output.zeroCopy && device.withFileRanges) {
      const header = Buffer.allocUnsafe(headerBytes);
      writeHeader(header);
      const sent = device.withFileRanges(r.offset, r.length, (ranges) => this.io.output.sendFile(header, ranges));
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
      pieces.push(this.io.device.write(offset + at, ZEROES.subarray(0, Math.min(ZEROES.length, length - at))));
    }
    await Promise.all(pieces);
  }

  private async blockStatus(r: P.Request): Promise<void> {
    const reqOne = (r.flags & P.CMD_FLAG_REQ_ONE) !== 0;
    const device = this.io.device;
    const query = device.blockStatus;
    let descriptors = query ? await query.call(device, r.offset, r.length, reqOne ? 1 : MAX_STATUS_EXTENTS) : [{ length: r.length, flags: 0 }];
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
    // requestProblem let BLOCK_STATUS through, so base:allocation was selected and has its id.
    return this.send(P.encodeBlockStatus(P.REPLY_FLAG_DONE, r.handle, this.negotiated.baseAllocationId!, descriptors));
  }

  private sendOk(r: P.Request): Promise<void> {
    return this.send(P.encodeSimpleReply(0, r.handle));
  }

  private sendError(r: P.Request, error: number, message: string): Promise<void> {
    // Structured replies carry a message, and a READ must not get a simple reply once negotiated.
    if (this.negotiated.structured) return this.send(P.encodeStructuredError(r.handle, error, message));
    return this.send(P.encodeSimpleReply(error, r.handle));
  }

  /** Resolves once the socket can take more (its buffer counts against the in-flight budget). */
  private send(data: Buffer, onWritten?: () => void): Promise<void> {
    return this.io.output.write(data, onWritten);
  }
}
