/**
 * An NBD server (fixed newstyle) over a small block-device interface. Each connection runs the
 * handshake as a state machine, then reads requests as fast as the in-flight budget allows and
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
import type { FileRange } from './reply-writer.js';

export type { FileRange };

export { BLOCK_SIZES };
import { BLOCK_SIZES, Connection } from './connection.js';
import { type OptionKeys, checkOptions } from '../options.js';

/** The block device behind an export. `openCow` devices fit it as they are. */
export interface NbdBlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  /** Fills `buffer` with the bytes at `offset`. */
  readInto(offset: number, buffer: Uint8Array): Promise<unknown>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Everything resolved so far is durable. */
  flush(): Promise<void>;
  /**
   * base:allocation of consecutive extents from `offset`, covering at most `length` bytes and at
   * most `maxExtents` descriptors (fewer bytes is fine: clients ask again). Without it, every
   * range is reported as allocated data (status 0), which the protocol always allows.
   */
  blockStatus?(offset: number, length: number, maxExtents: number): P.StatusDescriptor[] | Promise<P.StatusDescriptor[]>;
  /**
   * Zero-copy reads: calls `send` with the file ranges that hold [offset, offset + length), in
   * order, keeping their descriptors open until its promise settles; the server then sends them
   * with sendfile(2). Returns undefined when the bytes cannot be named so (no descriptors), and
   * the server falls back to readInto. A rejection before `send` is called is the read's error.
   */
  withFileRanges?(offset: number, length: number, send: (ranges: FileRange[]) => Promise<void>): Promise<void> | undefined;
}

export interface NbdServeOptions {
  /** A Unix socket path to listen on (the default kind of endpoint: only local users reach it). */
  socket?: string;
  /** A TCP port (0 picks a free one), bound to `bind` (default 127.0.0.1). */
  port?: number;
  bind?: string;
  /** Export name; the empty name (the default export) is accepted too. Default ''. */
  name?: string;
  description?: string;
  /** Advertise NBD_FLAG_READ_ONLY and refuse writes with EPERM (also when the device is read-only). */
  readOnly?: boolean;
  /** Clients served at once (NBD_FLAG_CAN_MULTI_CONN is advertised when more than 1). Default 1. */
  shared?: number;
  /** True when device.write is durable before it resolves (FUA then needs no flush). */
  writesDurable?: boolean;
  /** Bytes of request payloads and read replies in flight per connection before reading pauses. */
  maxInFlightBytes?: number;
  /** A connection that has not finished the handshake after this long is dropped. */
  handshakeTimeoutMs?: number;
  /** false: never send replies with sendfile (default: when the OS layer and the device allow it). */
  zeroCopy?: boolean;
  /** Called with one line per notable event (connections, protocol violations). */
  log?: (line: string) => void;
}

export interface NbdServer {
  /** `unix:PATH` or `HOST:PORT`. */
  readonly address: string;
  readonly port?: number;
  readonly socketPath?: string;
  /** Connections currently open. */
  readonly connections: number;
  /** Stops accepting, lets in-flight requests finish, closes connections, flushes the device. */
  close(): Promise<void>;
}

const serveNbdOptionKeys: OptionKeys<NbdServeOptions> = { socket: true, port: true, bind: true, name: true, description: true, readOnly: true, shared: true, writesDurable: true, maxInFlightBytes: true, zeroCopy: true, handshakeTimeoutMs: true, log: true };

export async function serveNbd(device: NbdBlockDevice, options: NbdServeOptions): Promise<NbdServer> {
  checkOptions('serveNbd', options, serveNbdOptionKeys);
  if ((options.socket === undefined) === (options.port === undefined)) {
    throw new UbdcowError('usage', 'serveNbd: give exactly one of socket or port');
  }
  const shared = options.shared ?? 1;
  if (!Number.isInteger(shared) || shared < 1) throw new UbdcowError('usage', `--shared ${shared}: expected a whole number of clients, at least 1`);
  const sizeProblem = P.blockSizeProblem(BLOCK_SIZES, device.size);
  if (sizeProblem) throw new Error(sizeProblem);
  const state = new ServerState(device, options, shared);
  const server = net.createServer({ pauseOnConnect: false }, (socket) => state.accept(socket));
  server.maxConnections = shared;
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
  const address = typeof bound === 'string' || bound === null ? `unix:${options.socket}` : `${bound.address}:${bound.port}`;
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

/** What every connection of one server shares: the device, the options, the open connections. */
export class ServerState {
  readonly open = new Set<Connection>();
  readonly readOnly: boolean;
  stopping = false;

  constructor(
    readonly device: NbdBlockDevice,
    readonly options: NbdServeOptions,
    readonly shared: number,
  ) {
    this.readOnly = Boolean(options.readOnly) || device.readOnly;
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
    socket.setNoDelay?.(true);
    const connection = new Connection(this, socket);
    this.open.add(connection);
    connection.run().finally(() => this.open.delete(connection));
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all([...this.open].map((c) => c.stop()));
  }
}
