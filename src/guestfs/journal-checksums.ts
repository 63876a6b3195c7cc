/**
 * The two checksums of jbd2 journals, in the kernel's raw forms (no inversion before or after, so
 * a running value can be chained through several blocks):
 *   crc32c   (Castagnoli, reflected): csum v2/v3 tags, descriptor tails and commit blocks, seeded
 *            with crc32c(~0, journal UUID);
 *   crc32_be (IEEE polynomial, MSB first): the old v1 journal_checksum, one CRC over a whole
 *            transaction's descriptor and data blocks, started at ~0.
 * Node's zlib crc32 is neither (reflected IEEE, inverted).
 */
function makeTable(step: (c: number) => number, start: (n: number) => number): Uint32Array {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = start(n);
    for (let k = 0; k < 8; k++) c = step(c);
    table[n] = c >>> 0;
  }
  return table;
}

const castagnoli = makeTable((c) => (c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1), (n) => n);
const ieeeMsbFirst = makeTable((c) => (c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1), (n) => n << 24);

export function crc32c(seed: number, bytes: Uint8Array): number {
  let crc = seed >>> 0;
  for (let i = 0; i < bytes.length; i++) crc = castagnoli[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return crc >>> 0;
}

export function crc32be(seed: number, bytes: Uint8Array): number {
  let crc = seed >>> 0;
  for (let i = 0; i < bytes.length; i++) crc = (crc << 8) ^ ieeeMsbFirst[((crc >>> 24) ^ bytes[i]!) & 0xff]!;
  return crc >>> 0;
}
