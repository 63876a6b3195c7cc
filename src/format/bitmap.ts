import BitField from 'bitfield';

/**
 * UML numbers bitmap bits least significant first (sector N is byte N>>3, mask 1<<(N&7));
 * `bitfield` numbers them most significant first. XOR with 7 maps one onto the other.
 */
function toBitFieldIndex(sector: number): number {
  return sector ^ 7;
}

const hostIsLittleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

function popcount32(word: number): number {
  let v = word - ((word >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

function lowestSetBit(word: number): number {
  return 31 - Math.clz32(word & -word);
}

/** A run of sectors with the same allocation state: [start, end). */
export interface SectorRun {
  start: number;
  end: number;
  allocated: boolean;
}

/**
 * A slice of a COW sector bitmap held in memory, covering `bitCount` sectors starting at sector
 * `firstSector` of the disk. The whole map of an image is one slice; streamed scans use a slice
 * a chunk at a time. Scans go a 32-bit word at a time and skip words that are all 0 or all 1.
 */
export class SectorBitmap {
  readonly bytes: Uint8Array;
  readonly bitCount: number;
  readonly firstSector: number;
  private readonly bits: BitField;
  private readonly words: Uint32Array | undefined;
  /** Byte index where `words` starts (the first 4-byte aligned byte of `bytes`). */
  private readonly wordStartByte: number;

  constructor(bytes: Uint8Array, bitCount = bytes.length * 8, firstSector = 0) {
    if (bitCount > bytes.length * 8) throw new RangeError(`bitmap of ${bytes.length} bytes cannot hold ${bitCount} bits`);
    this.bytes = bytes;
    this.bitCount = bitCount;
    this.firstSector = firstSector;
    this.bits = new BitField(bytes);
    const misalignment = (4 - (bytes.byteOffset & 3)) & 3;
    const wordCount = hostIsLittleEndian ? Math.floor(Math.max(0, bytes.length - misalignment) / 4) : 0;
    this.wordStartByte = misalignment;
    this.words = wordCount > 0 ? new Uint32Array(bytes.buffer, bytes.byteOffset + misalignment, wordCount) : undefined;
  }

  static empty(bitCount: number): SectorBitmap {
    return new SectorBitmap(new Uint8Array(Math.ceil(bitCount / 8)), bitCount);
  }

  /** Sector numbers here are relative to this slice. */
  get(sector: number): boolean {
    this.check(sector, sector + 1);
    return sector < 2 ** 31 ? this.bits.get(toBitFieldIndex(sector)) : (this.bytes[Math.floor(sector / 8)] & (1 << (sector & 7))) !== 0;
  }

  set(sector: number, value = true): void {
    this.check(sector, sector + 1);
    if (sector < 2 ** 31) {
      this.bits.set(toBitFieldIndex(sector), value);
      return;
    }
    const byte = Math.floor(sector / 8);
    if (value) this.bytes[byte] |= 1 << (sector & 7);
    else this.bytes[byte] &= ~(1 << (sector & 7));
  }

  /** Sets or clears [start, end), whole bytes at a time in the middle. */
  setRange(start: number, end: number, value = true): void {
    this.check(start, end);
    let sector = start;
    while (sector < end && (sector & 7) !== 0) this.set(sector++, value);
    const wholeBytesEnd = sector + Math.floor((end - sector) / 8) * 8;
    if (wholeBytesEnd > sector) {
      this.bytes.fill(value ? 0xff : 0, sector / 8, wholeBytesEnd / 8);
      sector = wholeBytesEnd;
    }
    while (sector < end) this.set(sector++, value);
  }

  /** True when every sector in [start, end) is allocated. */
  allSet(start: number, end: number): boolean {
    return this.nextClear(start, end) === end;
  }

  /** True when no sector in [start, end) is allocated. */
  noneSet(start: number, end: number): boolean {
    return this.nextSet(start, end) === end;
  }

  /** The first allocated sector in [from, end), or `end` when there is none. */
  nextSet(from: number, end = this.bitCount): number {
    return this.scan(from, end, true);
  }

  /** The first unallocated sector in [from, end), or `end` when there is none. */
  nextClear(from: number, end = this.bitCount): number {
    return this.scan(from, end, false);
  }

  countSet(start = 0, end = this.bitCount): number {
    this.check(start, end);
    let count = 0;
    let sector = start;
    while (sector < end && (sector & 7) !== 0) count += this.get(sector++) ? 1 : 0;
    let byte = sector / 8;
    const lastWholeByte = Math.floor(end / 8);
    const words = this.words;
    while (byte < lastWholeByte) {
      const wordIndex = (byte - this.wordStartByte) / 4;
      if (words && Number.isInteger(wordIndex) && wordIndex >= 0 && wordIndex < words.length && byte + 4 <= lastWholeByte) {
        count += popcount32(words[wordIndex]);
        byte += 4;
      } else {
        count += popcount32(this.bytes[byte]);
        byte++;
      }
    }
    sector = Math.max(sector, byte * 8);
    while (sector < end) count += this.get(sector++) ? 1 : 0;
    return count;
  }

  /** Runs of equal allocation state covering [start, end), in order. */
  *runs(start = 0, end = this.bitCount): Generator<SectorRun> {
    this.check(start, end);
    let sector = start;
    while (sector < end) {
      const allocated = this.get(sector);
      const runEnd = allocated ? this.nextClear(sector, end) : this.nextSet(sector, end);
      yield { start: sector, end: runEnd, allocated };
      sector = runEnd;
    }
  }

  /** Runs of allocated sectors only. */
  *allocatedRuns(start = 0, end = this.bitCount): Generator<SectorRun> {
    let sector = this.nextSet(start, end);
    while (sector < end) {
      const runEnd = this.nextClear(sector, end);
      yield { start: sector, end: runEnd, allocated: true };
      sector = this.nextSet(runEnd, end);
    }
  }

  private scan(from: number, end: number, wanted: boolean): number {
    this.check(from, end);
    const skipByte = wanted ? 0 : 0xff;
    const skipWord = wanted ? 0 : 0xffffffff;
    let sector = from;
    // Bit by bit only up to the next byte boundary.
    while (sector < end && (sector & 7) !== 0) {
      if (this.get(sector) === wanted) return sector;
      sector++;
    }
    let byte = sector / 8;
    const lastWholeByte = Math.floor(end / 8);
    while (byte < lastWholeByte) {
      const words = this.words;
      const wordIndex = (byte - this.wordStartByte) / 4;
      if (words && Number.isInteger(wordIndex) && wordIndex >= 0 && wordIndex < words.length && byte + 4 <= lastWholeByte) {
        const value = words[wordIndex];
        if (value === skipWord) {
          byte += 4;
          continue;
        }
        const found = byte * 8 + lowestSetBit(wanted ? value : ~value >>> 0);
        return Math.min(found, end);
      }
      const value = this.bytes[byte];
      if (value !== skipByte) {
        const found = byte * 8 + lowestSetBit(wanted ? value : ~value & 0xff);
        return Math.min(found, end);
      }
      byte++;
    }
    sector = Math.max(sector, byte * 8);
    while (sector < end) {
      if (this.get(sector) === wanted) return sector;
      sector++;
    }
    return end;
  }

  private check(start: number, end: number): void {
    if (!(start >= 0 && end <= this.bitCount && start <= end)) {
      throw new RangeError(`sector range [${start}, ${end}) outside a bitmap of ${this.bitCount} sectors`);
    }
  }
}
