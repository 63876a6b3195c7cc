/**
 * One NBD client connection: the glue around its two phases. The handshake (handshake.ts) runs
 * under a timer and returns the negotiated options once; the request loop (request-loop.ts)
 * then serves by them. This file owns what spans both: the socket, its one reader and one reply
 * writer, the transmission slot (--shared), and the connection's end.
 *
 * Invariant: a connection ends one way whatever ended it (the client, a protocol violation, the
 * handshake timer, the server stopping): every request in flight settles first, then the reply
 * writer is closed, the socket ended, and a slot it held given back, exactly once. See server.ts for the
 * server these connections share.
 */
import type * as net from 'node:net';
import { osCalls } from '../os/libc.js';
import { negotiate } from './handshake.js';
import { ReplyWriter } from './reply-writer.js';
import { DEFAULT_MAX_IN_FLIGHT_BYTES, RequestLoop } from './request-loop.js';
import type { ServerState } from './server-state.js';
import { waitForSlot } from './slots.js';
import { ConnectionClosed, SocketReader } from './socket-reader.js';

/** A client that has not chosen the export this long after connecting is dropped (qemu-nbd's default). */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

export class Connection {
  private readonly reader: SocketReader;
  private phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  /** The transmission phase, once the handshake has settled the options. */
  private loop: RequestLoop | undefined;
  private finished: Promise<void> | undefined;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** One of the server's transmission slots (--shared) is this connection's. */
  private holdsSlot = false;
  private readonly peer: string;
  private readonly output: ReplyWriter;

  constructor(
    private readonly server: ServerState,
    private readonly socket: net.Socket,
  ) {
    this.reader = new SocketReader(socket);
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
      const negotiated = await negotiate(this.server, {
        reader: this.reader,
        send: (data) => void this.output.write(data),
        log: (line) => this.log(line),
        takeSlot: () => this.takeSlot(),
      });
      clearTimeout(this.handshakeTimer);
      if (negotiated) {
        this.phase = 'transmission';
        this.loop = new RequestLoop(negotiated, {
          device: this.server.device,
          writesDurable: Boolean(this.server.options.writesDurable),
          maxInFlightBytes: this.server.options.maxInFlightBytes ?? DEFAULT_MAX_IN_FLIGHT_BYTES,
          reader: this.reader,
          output: this.output,
          log: (line) => this.log(line),
          destroy: () => this.socket.destroy(),
        });
        await this.loop.run();
      }
    } catch (err) {
      if (!(err instanceof ConnectionClosed)) this.log(`dropped: ${(err as Error).message}`);
    } finally {
      clearTimeout(this.handshakeTimer);
      this.phase = 'closing';
      await this.loop?.drain();
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
}
