/**
 * An NBD server (fixed newstyle) over a small block-device interface. Each connection
 * (connection.ts) runs the handshake (handshake.ts), which settles the options once, then the
 * request loop (request-loop.ts), which reads requests as fast as the in-flight budget allows and
 * answers each as soon as the device settles it (replies may be out of order, as the protocol
 * permits). Every request is validated before it touches the device: a hostile or broken client
 * gets the protocol's error value or a closed connection, never a crashed server and never a
 * byte changed outside the range it asked for.
 *
 * Durability: a write's reply is sent once the device resolved it (for openCow: data, then the
 * bitmap bits that point at it); FLUSH and FUA call device.flush(), which makes everything
 * resolved so far durable, so whatever was acknowledged before a FLUSH reply survives kill -9.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { UbdcowError, fromSystemError } from '../errors.js';
import * as P from './protocol.js';
import { type OptionKeys, checkOptions } from '../options.js';
import { Connection } from './connection.js';
import { BLOCK_SIZES } from './request-checks.js';
import { TransmissionSlots } from './slots.js';
import type { NbdBlockDevice, NbdServeOptions, ServerState } from './server-state.js';

export interface NbdServer {
  /** `unix:PATH` or `HOST:PORT`. */
  readonly address: string;
  readonly port?: number;
  readonly socketPath?: string;
  /** Connections currently open. */
  readonly connections: number;
  /** Stops accepting, lets in-flight requests finish (for up to stopGraceMs), closes connections, flushes the device. */
  close(): Promise<void>;
}

const serveNbdOptionKeys: OptionKeys<NbdServeOptions> = { socket: true, port: true, bind: true, name: true, description: true, readOnly: true, shared: true, queue: true, stopGraceMs: true, writesDurable: true, maxInFlightBytes: true, zeroCopy: true, handshakeTimeoutMs: true, log: true };

export async function serveNbd(device: NbdBlockDevice, options: NbdServeOptions): Promise<NbdServer> {
  checkOptions('serveNbd', options, serveNbdOptionKeys);
  if ((options.socket === undefined) === (options.port === undefined)) {
    throw new UbdcowError('usage', 'serveNbd: give exactly one of socket or port');
  }
  const shared = options.shared ?? 1;
  if (!Number.isInteger(shared) || shared < 1) throw new UbdcowError('usage', `--shared ${shared}: expected a whole number of clients, at least 1`);
  const queue = options.queue ?? DEFAULT_QUEUE;
  if (!Number.isInteger(queue) || queue < 0) throw new UbdcowError('usage', `--queue ${queue}: expected a whole number of waiting clients, 0 or more`);
  const sizeProblem = P.blockSizeProblem(BLOCK_SIZES, device.size);
  if (sizeProblem) throw new Error(sizeProblem);
  const state = new SharedServerState(device, options, shared, queue);
  // No server.maxConnections: it closes a connection over the limit without a word. Clients
  // beyond `shared` queue for a slot instead (see slots.ts), and SharedServerState.accept bounds them.
  const server = net.createServer({ pauseOnConnect: false }, (socket) => state.accept(socket));
  if (options.socket !== undefined) await removeStaleSocket(options.socket);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const where = options.socket ?? `${options.bind ?? '127.0.0.1'}:${options.port}`;
      reject(fromSystemError(err, where, 'listen on'));
    });
    if (options.socket !== undefined) server.listen(options.socket, resolve);
    else server.listen(options.port, options.bind ?? '127.0.0.1', resolve);
  });
  server.on('error', (err) => options.log?.(`server error: ${err.message}`));
  const bound = server.address();
  const address = typeof bound === 'string' || bound === null ? `unix:${options.socket}` : hostPort(bound);
  let closing: Promise<void> | undefined;
  return {
    address,
    port: typeof bound === 'object' && bound !== null ? bound.port : undefined,
    socketPath: options.socket,
    get connections() {
      return state.open.size;
    },
    close() {
      closing ??= (async () => {
        const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
        await state.stop();
        await stopped;
        if (options.socket !== undefined) await fs.promises.unlink(options.socket).catch(() => undefined);
        if (!state.readOnly) await device.flush();
      })();
      return closing;
    },
  };
}

/** Clients that may wait for a transmission slot by default (serve --queue). */
export const DEFAULT_QUEUE = 128;
/** How long a shutdown waits for in-flight requests by default. */
const DEFAULT_STOP_GRACE_MS = 3000;

/** `HOST:PORT`, an IPv6 host in brackets (`[::1]:10809`) as URIs and qemu's nbd:HOST:PORT want it. */
export function hostPort(bound: net.AddressInfo): string {
  const ipv6 = bound.family === 'IPv6' || (bound.family as unknown) === 6;
  return ipv6 ? `[${bound.address}]:${bound.port}` : `${bound.address}:${bound.port}`;
}

/** A socket file left by a server that is gone is removed; one a live server answers on is not. */
async function removeStaleSocket(file: string): Promise<void> {
  const stat = await fs.promises.lstat(file).catch(() => undefined);
  if (!stat) return;
  if (!stat.isSocket()) throw new UbdcowError('exists', `${file}: exists and is not a socket; choose another --socket path`, { file });
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(file);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new UbdcowError('in-use', `${file}: another server is listening on this socket; stop it or choose another --socket path`, { file });
  await fs.promises.unlink(file).catch(() => undefined);
}

/** What every connection of one server shares: the device, the options, the open connections, the slots. */
export class SharedServerState implements ServerState {
  readonly open = new Set<Connection>();
  readonly readOnly: boolean;
  readonly slots: TransmissionSlots;
  stopping = false;

  constructor(
    readonly device: NbdBlockDevice,
    readonly options: NbdServeOptions,
    readonly shared: number,
    readonly queue: number,
  ) {
    this.readOnly = Boolean(options.readOnly) || device.readOnly;
    this.slots = new TransmissionSlots(shared);
  }

  get exportName(): string {
    return this.options.name ?? '';
  }

  /** The empty name is the default export; ours is the only one. */
  isOurExport(name: string): boolean {
    return name === this.exportName || name === '';
  }

  accept(socket: net.Socket): void {
    if (this.stopping) {
      socket.destroy();
      return;
    }
    if (this.open.size >= this.shared + this.queue) {
      const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'local client';
      this.options.log?.(`${peer}: refused: ${this.open.size} connections open, the limit is --shared ${this.shared} + --queue ${this.queue}`);
      socket.destroy();
      return;
    }
    socket.setNoDelay?.(true);
    const connection = new Connection(this, socket);
    this.open.add(connection);
    connection.run().finally(() => this.open.delete(connection));
  }

  /**
   * Stops every connection: in-flight requests get `stopGraceMs` to finish; connections still
   * busy then (their clients do not read the replies, so the socket never drains) are closed, so
   * a shutdown always ends and the device can be flushed and closed.
   */
  async stop(): Promise<void> {
    this.stopping = true;
    this.slots.cancelAll('server is shutting down');
    const stopped = Promise.all([...this.open].map((c) => c.stop()));
    const graceMs = this.options.stopGraceMs ?? DEFAULT_STOP_GRACE_MS;
    let timer: NodeJS.Timeout | undefined;
    const late = await Promise.race([stopped.then(() => false), new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), graceMs)))]);
    clearTimeout(timer);
    if (late) {
      for (const c of this.open) c.abandon(`requests still in flight ${graceMs} ms into the shutdown (the client does not take its replies): closing`);
      await stopped;
    }
  }
}
