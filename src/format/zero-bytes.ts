/**
 * Whether bytes are all zero, compared natively against a zero block: what decides that a block
 * becomes a hole (commit to a new file, `cat > file`) instead of written zeros.
 */
const ZEROES = Buffer.alloc(64 << 10);

export function isAllZero(bytes: Uint8Array): boolean {
  return isAllZeroAt(bytes, 0, bytes.length);
}

/**
 * isAllZero of bytes[start, end), compared in place: no subarray per call (a commit asks this of
 * every 4 KiB block it writes; the views were most of its garbage).
 */
export function isAllZeroAt(bytes: Uint8Array, start: number, end: number): boolean {
  for (let at = start; at < end; at += ZEROES.length) {
    const length = Math.min(end - at, ZEROES.length);
    if (ZEROES.compare(bytes, at, at + length, 0, length) !== 0) return false;
  }
  return true;
}
