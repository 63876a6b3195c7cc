/**
 * Whether bytes are all zero, compared natively against a zero block: what decides that a block
 * becomes a hole (commit to a new file, `cat > file`) instead of written zeros.
 */
const ZEROES = new Uint8Array(64 << 10);

export function isAllZero(bytes: Uint8Array): boolean {
  for (let at = 0; at < bytes.length; at += ZEROES.length) {
    const piece = bytes.subarray(at, Math.min(bytes.length, at + ZEROES.length));
    if (Buffer.compare(piece, ZEROES.subarray(0, piece.length)) !== 0) return false;
  }
  return true;
}
