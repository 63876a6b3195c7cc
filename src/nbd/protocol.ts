/**
 * The NBD wire format (NetworkBlockDevice/nbd doc/proto.md, fixed newstyle, simple and structured
 * replies, base:allocation), as pure encoders and decoders: no sockets, no state. Every decoder
 * takes bytes a hostile client sent, so it checks each length against the bytes it has and
 * returns a problem instead of reading past them. Numbers are big-endian ("network order").
 */

export * from './constants.js';
export * from './transmission.js';
import {
  BASE_ALLOCATION,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  GREETING_BYTES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  INFO_NAME,
  MAX_STRING_BYTES,
  NBD_MAGIC,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_MAGIC,
} from './constants.js';

import { asBuffer, limitString, strictUtf8, utf8 } from './bytes.js';

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
