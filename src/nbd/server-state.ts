/**
 * What an NBD export is made of (the block device, the serve options) and what one connection
 * sees of the server it belongs to. Kept apart from server.ts so that connections depend on this
 * contract, not on the server that creates them (no import cycle between the two).
 */
import type * as P from './protocol.js';
import type { FileRange } from './reply-writer.js';
import type { TransmissionSlots } from './slots.js';

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
  /**
   * Connections accepted beyond `shared`: they run their handshakes, then wait in arrival order
   * for a transmission slot. A connection beyond `shared + queue` is closed at once. Default 128.
   */
  queue?: number;
  /** True when device.write is durable before it resolves (FUA then needs no flush). */
  writesDurable?: boolean;
  /** Bytes of request payloads and read replies in flight per connection before reading pauses. */
  maxInFlightBytes?: number;
  /** A connection that has not finished the handshake after this long is dropped (default 10 s; waiting for a slot does not count). */
  handshakeTimeoutMs?: number;
  /**
   * close(): how long connections get to finish their in-flight requests (a client that does not
   * read its replies never lets them finish) before they are closed regardless. Default 3 s.
   */
  stopGraceMs?: number;
  /** false: never send replies with sendfile (default: when the OS layer and the device allow it). */
  zeroCopy?: boolean;
  /** Called with one line per notable event (connections, protocol violations). */
  log?: (line: string) => void;
}

/** What every connection of one server shares: the device, the options, the transmission slots. */
export interface ServerState {
  readonly device: NbdBlockDevice;
  readonly options: NbdServeOptions;
  /** Clients served at once. */
  readonly shared: number;
  readonly readOnly: boolean;
  readonly slots: TransmissionSlots;
  /** The server is shutting down: no new transmission starts. */
  readonly stopping: boolean;
  readonly exportName: string;
  /** The empty name is the default export; ours is the only one. */
  isOurExport(name: string): boolean;
}
