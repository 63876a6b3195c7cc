/** Byte helpers the NBD codecs share: strings as the spec bounds them, Buffer views. */
import { MAX_STRING_BYTES } from './constants.js';

export const utf8 = new TextEncoder();
export const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** UTF-8 without NULs, cut on a character boundary at the spec's 4096-byte limit. */
export function limitString(text: string): Uint8Array {
  const bytes = utf8.encode(text.replace(/\0/g, ''));
  if (bytes.length <= MAX_STRING_BYTES) return bytes;
  // Cut on a character boundary so the result stays valid UTF-8.
  let end = MAX_STRING_BYTES;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

export function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}
