/**
 * The fixed-newstyle handshake of one connection (the spec's "option haggling"): the greeting,
 * the client's flags, then options until the client chooses the export or leaves.
 *
 * Invariant: options are resolved once. What the options decide (structured replies, the meta
 * context selection, no-zeroes) is kept only while they are haggled; when the client chooses the
 * export, `negotiate` settles it into one frozen `Negotiated` value (negotiated.ts), and the
 * replies that choose the export advertise that value's flags. The transmission phase serves by
 * that value alone. Option data is bytes a hostile client sent: every length is bounded before
 * it is read, and a malformed option gets the protocol's error reply, never a crash.
 */
import * as P from './protocol.js';
import type { Negotiated } from './negotiated.js';
import { BLOCK_SIZES } from './request-checks.js';
import type { ServerState } from './server-state.js';
import type { SocketReader } from './socket-reader.js';

/** Option data longer than this is taken as a denial-of-service attempt (hard disconnect). */
const MAX_OPTION_BYTES = 64 << 10;
/** Options per connection before the server gives up on the client. */
const MAX_OPTIONS = 4096;
/** The id of base:allocation, our only meta context, in NBD_REP_META_CONTEXT and block status replies. */
const BASE_ALLOCATION_ID = 1;

/** What the handshake needs of its connection. */
export interface HandshakeIo {
  readonly reader: SocketReader;
  /** Queues bytes for the client; they go out whole and in the order given. */
  send(data: Buffer): void;
  log(line: string): void;
  /**
   * Takes a transmission slot (--shared) when the client chooses the export, before the reply
   * that starts transmission; false when the wait ended without one (the session then ends).
   */
  takeSlot(): Promise<boolean>;
}

/**
 * Runs the handshake: the negotiated options once the client chose the export (transmission
 * begins), or undefined when the session ends in the handshake (the client aborted, broke the
 * protocol, or no slot came).
 */
export function negotiate(server: ServerState, io: HandshakeIo): Promise<Negotiated | undefined> {
  return new Haggle(server, io).run();
}

interface MetaSelection {
  exportName: string;
  baseAllocation: boolean;
}

type Outcome = 'continue' | 'close' | Negotiated;

/** The options of one handshake while they are haggled (the client may change its mind until it chooses). */
class Haggle {
  private structured = false;
  private noZeroes = false;
  private meta: MetaSelection | undefined;

  constructor(
    private readonly server: ServerState,
    private readonly io: HandshakeIo,
  ) {}

  async run(): Promise<Negotiated | undefined> {
    const { reader } = this.io;
    this.io.send(P.encodeGreeting(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES));
    const clientFlags = (await reader.read(P.CLIENT_FLAGS_BYTES)).readUInt32BE(0);
    if ((clientFlags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) !== 0) {
      this.io.log(`unknown client flags 0x${clientFlags.toString(16)}: closing, as the protocol requires`);
      return undefined;
    }
    this.noZeroes = (clientFlags & P.FLAG_C_NO_ZEROES) !== 0;
    for (let count = 0; count < MAX_OPTIONS; count++) {
      const header = P.decodeOptionHeader(await reader.read(P.OPTION_HEADER_BYTES));
      if (!header) {
        this.io.log('bad option magic: closing');
        return undefined;
      }
      if (header.length > MAX_OPTION_BYTES) {
        this.io.log(`option ${header.option} with ${header.length} bytes of data: closing`);
        return undefined;
      }
      const data = await reader.read(header.length);
      const outcome = await this.option(header.option, data);
      if (outcome === 'close') return undefined;
      if (outcome !== 'continue') return outcome;
    }
    this.io.log(`more than ${MAX_OPTIONS} options: closing`);
    return undefined;
  }

  /** The flags the options agreed so far would give (NBD_OPT_INFO shows them before the choice). */
  private transmissionFlags(): number {
    let flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA;
    flags |= this.server.readOnly ? P.FLAG_READ_ONLY : P.FLAG_SEND_WRITE_ZEROES;
    if (this.structured) flags |= P.FLAG_SEND_DF;
    // One device and one flush for all connections: a FLUSH on any connection covers every write.
    if (this.server.shared > 1) flags |= P.FLAG_CAN_MULTI_CONN;
    return flags;
  }

  /** The client chose export `name`: the options resolved, once, into the value transmission serves by. */
  private settle(name: string): Negotiated {
    const meta = this.meta;
    const baseAllocation = this.structured && meta !== undefined && meta.baseAllocation && meta.exportName === name;
    return Object.freeze({
      exportName: name,
      size: this.server.device.size,
      readOnly: this.server.readOnly,
      structured: this.structured,
      noZeroes: this.noZeroes,
      baseAllocationId: baseAllocation ? BASE_ALLOCATION_ID : undefined,
      transmissionFlags: this.transmissionFlags(),
      blockSizes: BLOCK_SIZES,
    });
  }

  private reply(option: number, type: number, data?: Uint8Array): void {
    this.io.send(P.encodeOptionReply(option, type, data));
  }

  private error(option: number, type: number, message: string): 'continue' {
    this.io.send(P.encodeOptionError(option, type, message));
    return 'continue';
  }

  private async option(option: number, data: Buffer): Promise<Outcome> {
    if (this.server.stopping && option !== P.OPT_ABORT) return this.error(option, P.REP_ERR_SHUTDOWN, 'server is shutting down');
    switch (option) {
      case P.OPT_EXPORT_NAME: {
        const name = P.decodeString(data, 'export name');
        // This option cannot be answered with an error: the spec says to end the session.
        if (!name.ok || !this.server.isOurExport(name.value)) {
          this.io.log(`NBD_OPT_EXPORT_NAME for an unknown export: closing`);
          return 'close';
        }
        if (!(await this.io.takeSlot())) return 'close';
        const chosen = this.settle(name.value);
        this.io.send(P.encodeExportNameReply(chosen.size, chosen.transmissionFlags, chosen.noZeroes));
        return chosen;
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

  private async infoOrGo(option: number, data: Buffer): Promise<Outcome> {
    const request = P.decodeInfoRequest(data);
    if (!request.ok) return this.error(option, P.REP_ERR_INVALID, request.problem);
    const { name, requests } = request.value;
    if (!this.server.isOurExport(name)) return this.error(option, P.REP_ERR_UNKNOWN, `no export named "${name}"`);
    if (option === P.OPT_GO && !(await this.io.takeSlot())) return 'close';
    // GO settles before it replies, so the flags it advertises are the ones transmission serves by.
    const chosen = option === P.OPT_GO ? this.settle(name) : undefined;
    const flags = chosen ? chosen.transmissionFlags : this.transmissionFlags();
    this.reply(option, P.REP_INFO, P.encodeInfoExport(this.server.device.size, flags));
    if (requests.includes(P.INFO_NAME)) this.reply(option, P.REP_INFO, P.encodeInfoString(P.INFO_NAME, this.server.exportName));
    const description = this.server.options.description;
    if (requests.includes(P.INFO_DESCRIPTION) && description) this.reply(option, P.REP_INFO, P.encodeInfoString(P.INFO_DESCRIPTION, description));
    // Sent even unrequested (allowed): our maximum is tighter than the default "unlimited".
    this.reply(option, P.REP_INFO, P.encodeInfoBlockSize(BLOCK_SIZES));
    this.reply(option, P.REP_ACK);
    return chosen ?? 'continue';
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
}
