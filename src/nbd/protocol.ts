/**
 * The NBD wire format (NetworkBlockDevice/nbd doc/proto.md, fixed newstyle, simple and structured
 * replies, base:allocation), as pure encoders and decoders: no sockets, no state. Every decoder
 * takes bytes a hostile client sent, so it checks each length against the bytes it has and
 * returns a problem instead of reading past them. Numbers are big-endian ("network order").
 */

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, 16 bits). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** Client flags (32 bits). */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags (16 bits). */
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_ROTATIONAL = 1 << 4;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_RESIZE = 1 << 9;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;

/** Option types. */
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_PEEK_EXPORT = 4;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

/** Option reply types; errors have bit 31 set. */
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;

/** NBD_INFO_* types (in NBD_REP_INFO replies to NBD_OPT_INFO and NBD_OPT_GO). */
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

/** Commands. */
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_RESIZE = 8;

/** Command flags. */
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply flags and chunk types. */
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** Error values (the protocol's own numbers, not the host's errno). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** base:allocation status flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
export const BASE_ALLOCATION = 'base:allocation';

/** Strings "MUST be no longer than 4096 bytes". */
export const MAX_STRING_BYTES = 4096;
/** The sizes of the fixed-length messages. */
export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
export const OPTION_HEADER_BYTES = 16;
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_HEADER_BYTES = 20;

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** S: NBDMAGIC, IHAVEOPT, 16 bits of handshake flags. */
export function encodeGreeting(handshakeFlags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES): Buffer {
  const b = Buffer.alloc(GREETING_BYTES);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

/** C: IHAVEOPT, option, length. Undefined when the magic is wrong (the client is not speaking NBD). */
export function decodeOptionHeader(b: Uint8Array): OptionHeader | undefined {
  const buf = asBuffer(b);
  if (buf.length < OPTION_HEADER_BYTES || buf.readBigUInt64BE(0) !== IHAVEOPT) return undefined;
  return { option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) };
}

export function encodeOptionHeader(option: number, length: number): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_BYTES);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  return b;
}

/** S: reply magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

/** An error reply carrying a message for the user (cut to the protocol's string limit). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, limitString(message));
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** For tests and clients: one option reply from the front of `b`, with the bytes it used. */
export function decodeOptionReply(b: Uint8Array): { reply: OptionReply; bytes: number } | undefined {
  const buf = asBuffer(b);
  if (buf.length < 20 || buf.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) return undefined;
  const length = buf.readUInt32BE(16);
  if (buf.length < 20 + length) return undefined;
  return {
    reply: { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), data: buf.subarray(20, 20 + length) },
    bytes: 20 + length,
  };
}

/** NBD_REP_SERVER data: name length, name, optional description. */
export function encodeServerEntry(name: string, description = ''): Buffer {
  const n = limitString(name);
  const d = limitString(description);
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  b.set(n, 4);
  b.set(d, 4 + n.length);
  return b;
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(type: typeof INFO_NAME | typeof INFO_DESCRIPTION, text: string): Buffer {
  const s = limitString(text);
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(type, 0);
  b.set(s, 2);
  return b;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(sizes.minimum, 2);
  b.writeUInt32BE(sizes.preferred, 6);
  b.writeUInt32BE(sizes.maximum, 10);
  return b;
}

/** Checks block size constraints against the rules of the "Block size constraints" section. */
export function blockSizeProblem(sizes: BlockSizes, exportSize: number): string | undefined {
  const pow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  if (!pow2(sizes.minimum) || sizes.minimum > 65536) return `minimum block size ${sizes.minimum} is not a power of 2 up to 65536`;
  if (!pow2(sizes.preferred) || sizes.preferred < Math.max(sizes.minimum, 512)) {
    return `preferred block size ${sizes.preferred} is not a power of 2 at least max(minimum, 512)`;
  }
  if (sizes.maximum !== 0xffffffff && (sizes.maximum % sizes.minimum !== 0 || sizes.maximum < Math.min(sizes.preferred, exportSize))) {
    return `maximum block size ${sizes.maximum} is not a multiple of the minimum or is smaller than min(preferred, export size)`;
  }
  return undefined;
}

export function encodeMetaContext(id: number, name: string): Buffer {
  const s = utf8.encode(name);
  const b = Buffer.alloc(4 + s.length);
  b.writeUInt32BE(id >>> 0, 0);
  b.set(s, 4);
  return b;
}

/** S (after NBD_OPT_EXPORT_NAME): size, transmission flags, 124 zeroes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; problem: string };

/** A string field: valid UTF-8, no NUL, at most 4096 bytes. */
export function decodeString(b: Uint8Array, what: string): Decoded<string> {
  if (b.length > MAX_STRING_BYTES) return { ok: false, problem: `${what} is ${b.length} bytes, more than ${MAX_STRING_BYTES}` };
  let text: string;
  try {
    text = strictUtf8.decode(b);
  } catch {
    return { ok: false, problem: `${what} is not valid UTF-8` };
  }
  if (text.includes('\0')) return { ok: false, problem: `${what} contains NUL` };
  return { ok: true, value: text };
}

export interface InfoRequest {
  name: string;
  /** NBD_INFO_* types the client asked for, in its order. */
  requests: number[];
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, count × 16-bit info types. */
export function decodeInfoRequest(data: Uint8Array): Decoded<InfoRequest> {
  const buf = asBuffer(data);
  if (buf.length < 6) return { ok: false, problem: `option data is ${buf.length} bytes, at least 6 expected` };
  const nameLength = buf.readUInt32BE(0);
  if (nameLength > buf.length - 6) return { ok: false, problem: `name length ${nameLength} is larger than the option data allows` };
  const name = decodeString(buf.subarray(4, 4 + nameLength), 'export name');
  if (!name.ok) return name;
  const count = buf.readUInt16BE(4 + nameLength);
  const listStart = 6 + nameLength;
  if (buf.length !== listStart + 2 * count) {
    return { ok: false, problem: `${count} information requests need ${listStart + 2 * count} bytes of option data, got ${buf.length}` };
  }
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(buf.readUInt16BE(listStart + 2 * i));
  return { ok: true, value: { name: name.value, requests } };
}

export function encodeInfoRequest(name: string, requests: number[]): Buffer {
  const n = utf8.encode(name);
  const b = Buffer.alloc(6 + n.length + 2 * requests.length);
  b.writeUInt32BE(n.length, 0);
  b.set(n, 4);
  b.writeUInt16BE(requests.length, 4 + n.length);
  requests.forEach((r, i) => b.writeUInt16BE(r, 6 + n.length + 2 * i));
  return b;
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: name, count, count × (length, query). */
export function decodeMetaContextRequest(data: Uint8Array): Decoded<MetaContextRequest> {
  const buf = asBuffer(data);
  if (buf.length < 8) return { ok: false, problem: `option data is ${buf.length} bytes, at least 8 expected` };
  const nameLength = buf.readUInt32BE(0);
  if (nameLength > buf.length - 8) return { ok: false, problem: `name length ${nameLength} is larger than the option data allows` };
  const name = decodeString(buf.subarray(4, 4 + nameLength), 'export name');
  if (!name.ok) return name;
  const count = buf.readUInt32BE(4 + nameLength);
  let at = 8 + nameLength;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (buf.length - at < 4) return { ok: false, problem: `query ${i + 1} of ${count} lies past the end of the option data` };
    const length = buf.readUInt32BE(at);
    at += 4;
    if (length > buf.length - at) return { ok: false, problem: `query ${i + 1} (${length} bytes) lies past the end of the option data` };
    const query = decodeString(buf.subarray(at, at + length), 'query');
    if (!query.ok) return query;
    queries.push(query.value);
    at += length;
  }
  if (at !== buf.length) return { ok: false, problem: `${buf.length - at} bytes follow the last query` };
  return { ok: true, value: { name: name.value, queries } };
}

export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(utf8.encode(name));
  const head = Buffer.alloc(4);
  head.writeUInt32BE(n.length, 0);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(head, n, count);
  for (const q of queries) {
    const s = Buffer.from(utf8.encode(q));
    const l = Buffer.alloc(4);
    l.writeUInt32BE(s.length, 0);
    parts.push(l, s);
  }
  return Buffer.concat(parts);
}

/**
 * Which of our contexts a query names. `base:` is a wildcard for LIST only and is ignored by SET;
 * queries in other namespaces (or without a colon) select nothing, as the spec requires.
 */
export function matchMetaContexts(query: string, forList: boolean, available: readonly string[] = [BASE_ALLOCATION]): string[] {
  const colon = query.indexOf(':');
  if (colon <= 0) return [];
  const namespace = query.slice(0, colon + 1);
  const leaf = query.slice(colon + 1);
  if (leaf === '') return forList ? available.filter((c) => c.startsWith(namespace)) : [];
  return available.filter((c) => c === query);
}

export interface Request {
  flags: number;
  type: number;
  /** The client's 8-byte handle, echoed back untouched. */
  handle: Buffer;
  /** Offset as a number, or Infinity when it does not fit one exactly (past any disk we serve). */
  offset: number;
  length: number;
}

/** C: magic, flags, type, handle, offset, length. Undefined when the magic is wrong. */
export function decodeRequest(b: Uint8Array): Request | undefined {
  const buf = asBuffer(b);
  if (buf.length < REQUEST_HEADER_BYTES || buf.readUInt32BE(0) !== REQUEST_MAGIC) return undefined;
  const big = buf.readBigUInt64BE(16);
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    handle: Buffer.from(buf.subarray(8, 16)),
    offset: big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : Number.POSITIVE_INFINITY,
    length: buf.readUInt32BE(24),
  };
}

export function encodeRequest(r: { flags?: number; type: number; handle: Uint8Array | bigint; offset: number | bigint; length: number }): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_BYTES);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  if (typeof r.handle === 'bigint') b.writeBigUInt64BE(r.handle, 8);
  else b.set(r.handle.subarray(0, 8), 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

/** S: magic, error, handle; a successful read's data follows, so callers may leave room for it. */
export function writeSimpleReplyHeader(into: Buffer, error: number, handle: Uint8Array): void {
  into.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  into.writeUInt32BE(error >>> 0, 4);
  into.set(handle.subarray(0, 8), 8);
}

export function encodeSimpleReply(error: number, handle: Uint8Array): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_BYTES);
  writeSimpleReplyHeader(b, error, handle);
  return b;
}

/** S: magic, flags, type, handle, payload length (the payload follows). */
export function writeStructuredHeader(into: Buffer, flags: number, type: number, handle: Uint8Array, length: number, at = 0): void {
  into.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  into.writeUInt16BE(flags, at + 4);
  into.writeUInt16BE(type, at + 6);
  into.set(handle.subarray(0, 8), at + 8);
  into.writeUInt32BE(length >>> 0, at + 16);
}

export function encodeStructuredNone(handle: Uint8Array): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES);
  writeStructuredHeader(b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
  return b;
}

/** Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk; `dataLength` bytes follow. */
export const OFFSET_DATA_PREFIX_BYTES = STRUCTURED_HEADER_BYTES + 8;
export function writeOffsetDataPrefix(into: Buffer, flags: number, handle: Uint8Array, offset: number, dataLength: number): void {
  writeStructuredHeader(into, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + dataLength);
  into.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_BYTES);
}

export function encodeOffsetHole(flags: number, handle: Uint8Array, offset: number, size: number): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES + 12);
  writeStructuredHeader(b, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_BYTES);
  b.writeUInt32BE(size, STRUCTURED_HEADER_BYTES + 8);
  return b;
}

/** An NBD_REPLY_TYPE_ERROR chunk (always the final one here). */
export function encodeStructuredError(handle: Uint8Array, error: number, message = ''): Buffer {
  const m = limitString(message);
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES + 6 + m.length);
  writeStructuredHeader(b, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + m.length);
  b.writeUInt32BE(error >>> 0, STRUCTURED_HEADER_BYTES);
  b.writeUInt16BE(m.length, STRUCTURED_HEADER_BYTES + 4);
  b.set(m, STRUCTURED_HEADER_BYTES + 6);
  return b;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function encodeBlockStatus(flags: number, handle: Uint8Array, contextId: number, descriptors: readonly StatusDescriptor[]): Buffer {
  if (descriptors.length === 0) throw new RangeError('a block status chunk needs at least one descriptor');
  const payload = 4 + 8 * descriptors.length;
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES + payload);
  writeStructuredHeader(b, flags, REPLY_TYPE_BLOCK_STATUS, handle, payload);
  b.writeUInt32BE(contextId >>> 0, STRUCTURED_HEADER_BYTES);
  descriptors.forEach((d, i) => {
    if (!(d.length > 0 && d.length <= 0xffffffff)) throw new RangeError(`descriptor length ${d.length} out of range`);
    b.writeUInt32BE(d.length, STRUCTURED_HEADER_BYTES + 4 + 8 * i);
    b.writeUInt32BE(d.flags >>> 0, STRUCTURED_HEADER_BYTES + 8 + 8 * i);
  });
  return b;
}

export interface StructuredChunk {
  flags: number;
  type: number;
  handle: Buffer;
  payload: Buffer;
}

/** For tests: one structured chunk from the front of `b`, with the bytes it used. */
export function decodeStructuredChunk(b: Uint8Array): { chunk: StructuredChunk; bytes: number } | undefined {
  const buf = asBuffer(b);
  if (buf.length < STRUCTURED_HEADER_BYTES || buf.readUInt32BE(0) !== STRUCTURED_REPLY_MAGIC) return undefined;
  const length = buf.readUInt32BE(16);
  if (buf.length < STRUCTURED_HEADER_BYTES + length) return undefined;
  return {
    chunk: {
      flags: buf.readUInt16BE(4),
      type: buf.readUInt16BE(6),
      handle: buf.subarray(8, 16),
      payload: buf.subarray(STRUCTURED_HEADER_BYTES, STRUCTURED_HEADER_BYTES + length),
    },
    bytes: STRUCTURED_HEADER_BYTES + length,
  };
}

/** Maps a host error (errno name) to the protocol's error value. */
export function nbdErrorFor(code: string | undefined): number {
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
    case 'read-only':
      return NBD_EPERM;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
    case 'out-of-range':
      return NBD_EINVAL;
    default:
      return NBD_EIO;
  }
}

function limitString(text: string): Uint8Array {
  const bytes = utf8.encode(text.replace(/\0/g, ''));
  if (bytes.length <= MAX_STRING_BYTES) return bytes;
  // Cut on a character boundary so the result stays valid UTF-8.
  let end = MAX_STRING_BYTES;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}
