/**
 * The NBD transmission phase on the wire: requests, simple and structured replies, block status,
 * and the errno mapping. Pure encoders and decoders, as protocol.ts (which re-exports these).
 */
import {
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  NBD_EPERM,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_EINVAL,
  NBD_ENOSPC,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_BYTES,
  STRUCTURED_HEADER_BYTES,
} from './constants.js';
import { asBuffer, limitString } from './bytes.js';

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
