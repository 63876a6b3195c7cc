import { CowFormatError } from '../errors.js';

/** "MOOO": the first four bytes of every UML COW file (big-endian, or host order in V1). */
export const COW_MAGIC = 0x4f4f4f4d;

export const V1_PATH_LENGTH = 256;
export const V2_PATH_LENGTH = 4096;
export const V3_PATH_LENGTH = 4096;

export const V1_HEADER_SIZE = 280;
export const V2_HEADER_SIZE = 4120;
export const V3_HEADER_SIZE = 4128;
/** The 64-bit "broken" V3 layout: 4 pad bytes after mtime, struct padded to 8. */
export const V3_BROKEN_HEADER_SIZE = 4136;

/** Enough bytes to parse any known header. */
export const MAX_HEADER_SIZE = V3_BROKEN_HEADER_SIZE;

/** What uml_mkcow and the kernel use when creating. */
export const DEFAULT_SECTOR_SIZE = 512;
export const DEFAULT_ALIGNMENT = 4096;
export const MAX_SECTOR_SIZE = 65536;

export type HeaderLayout = 'v1' | 'v2' | 'v3' | 'v3-broken';

export interface CowHeader {
  version: 1 | 2 | 3;
  layout: HeaderLayout;
  /** Byte order of the numeric fields: V1 is in the writer's host order; V2 and V3 are big-endian. */
  littleEndian: boolean;
  backingFile: string;
  /** Backing file modification time, whole seconds (an unsigned 32-bit field on disk). */
  mtime: number;
  /** Virtual disk size in bytes. */
  size: number;
  sectorSize: number;
  /** V3 only on disk; V1 and V2 align to the sector size, as the kernel does. */
  alignment: number;
  /** 0 means "bitmap", the only format there is. */
  cowFormat: number;
}

/** A header as written: everything but what the version and layout imply. */
export interface HeaderFields {
  backingFile: string;
  mtime: number;
  size: number;
  sectorSize: number;
  alignment: number;
}

export interface ParsedHeader {
  header: CowHeader;
  /** Size of the header structure on disk (not rounded to alignment). */
  headerSize: number;
  /** Things the kernel accepts but that deserve a word, e.g. a sector size other than 512. */
  warnings: string[];
}

const headerSizeOf: Record<HeaderLayout, number> = {
  v1: V1_HEADER_SIZE,
  v2: V2_HEADER_SIZE,
  v3: V3_HEADER_SIZE,
  'v3-broken': V3_BROKEN_HEADER_SIZE,
};

export function headerSize(layout: HeaderLayout): number {
  return headerSizeOf[layout];
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function hex32(value: number): string {
  return `0x${(value >>> 0).toString(16).padStart(8, '0')}`;
}

/** Reads a NUL-terminated path from a fixed-size field; a field with no terminator is refused. */
function readPath(bytes: Uint8Array, offset: number, length: number): string {
  const field = bytes.subarray(offset, offset + length);
  const end = field.indexOf(0);
  if (end < 0) {
    throw new CowFormatError(
      'backing-unterminated',
      'backing_file',
      `${length} bytes with no NUL terminator`,
      `a NUL-terminated path of at most ${length - 1} bytes`,
    );
  }
  return Buffer.from(field.buffer, field.byteOffset, end).toString('utf8');
}

function writePath(bytes: Uint8Array, offset: number, length: number, path: string): void {
  const encoded = Buffer.from(path, 'utf8');
  if (encoded.length >= length) {
    throw new CowFormatError(
      'backing-too-long',
      'backing_file',
      `${encoded.length} bytes long`,
      `at most ${length - 1} bytes (the field holds ${length} with its terminator)`,
    );
  }
  if (encoded.includes(0)) {
    throw new CowFormatError('backing-nul', 'backing_file', JSON.stringify(path), 'a path without NUL bytes');
  }
  bytes.set(encoded, offset);
}

function requireLength(bytes: Uint8Array, needed: number, layout: HeaderLayout): void {
  if (bytes.length < needed) {
    throw new CowFormatError(
      'truncated-header',
      'header',
      `${bytes.length} bytes long`,
      `at least ${needed} bytes for a ${layout} header`,
    );
  }
}

function readU64(dv: DataView, offset: number, littleEndian: boolean, field: string): number {
  const value = dv.getBigUint64(offset, littleEndian);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CowFormatError('too-large', field, value.toString(), `at most ${Number.MAX_SAFE_INTEGER} bytes`);
  }
  return Number(value);
}

/** True when `bytes` start with the COW magic in either byte order (parseHeader decides the rest). */
export function hasCowMagic(bytes: Uint8Array): boolean {
  if (bytes.length < 4) return false;
  const dv = view(bytes);
  return dv.getUint32(0, false) === COW_MAGIC || dv.getUint32(0, true) === COW_MAGIC;
}

/** Works out version and byte order from the first 8 bytes, as the kernel does. */
function detectVersion(bytes: Uint8Array): { version: number; littleEndian: boolean } {
  if (bytes.length < 8) {
    throw new CowFormatError('truncated-header', 'header', `${bytes.length} bytes long`, 'at least 8 bytes');
  }
  const dv = view(bytes);
  if (dv.getUint32(0, false) === COW_MAGIC) return { version: dv.getUint32(4, false), littleEndian: false };
  if (dv.getUint32(0, true) === COW_MAGIC) return { version: dv.getUint32(4, true), littleEndian: true };
  throw new CowFormatError('bad-magic', 'magic', hex32(dv.getUint32(0, false)), `${hex32(COW_MAGIC)} ("MOOO"): not a UML COW file`);
}

function parseV1(bytes: Uint8Array, littleEndian: boolean): CowHeader {
  requireLength(bytes, V1_HEADER_SIZE, 'v1');
  const dv = view(bytes);
  const sectorSize = dv.getInt32(276, littleEndian);
  return {
    version: 1,
    layout: 'v1',
    littleEndian,
    backingFile: readPath(bytes, 8, V1_PATH_LENGTH),
    mtime: dv.getUint32(264, littleEndian),
    size: readU64(dv, 268, littleEndian, 'size'),
    sectorSize,
    alignment: sectorSize,
    cowFormat: 0,
  };
}

function parseV2(bytes: Uint8Array): CowHeader {
  requireLength(bytes, V2_HEADER_SIZE, 'v2');
  const dv = view(bytes);
  const sectorSize = dv.getInt32(4116, false);
  return {
    version: 2,
    layout: 'v2',
    littleEndian: false,
    backingFile: readPath(bytes, 8, V2_PATH_LENGTH),
    mtime: dv.getUint32(4104, false),
    size: readU64(dv, 4108, false, 'size'),
    sectorSize,
    alignment: sectorSize,
    cowFormat: 0,
  };
}

/** Field offsets after magic and version; the broken layout shifts everything after mtime by 4. */
function parseV3(bytes: Uint8Array): CowHeader {
  const broken = bytes.length >= 36 && view(bytes).getUint32(32, false) === 0;
  const layout: HeaderLayout = broken ? 'v3-broken' : 'v3';
  requireLength(bytes, headerSizeOf[layout], layout);
  const dv = view(bytes);
  const shift = broken ? 4 : 0;
  return {
    version: 3,
    layout,
    littleEndian: false,
    mtime: dv.getUint32(8, false),
    size: readU64(dv, 12 + shift, false, 'size'),
    sectorSize: dv.getUint32(20 + shift, false),
    alignment: dv.getUint32(24 + shift, false),
    cowFormat: dv.getUint32(28 + shift, false),
    backingFile: readPath(bytes, 32 + shift, V3_PATH_LENGTH),
  };
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Checks the fields every reader depends on; returns warnings for what is legal but unusual. */
export function validateHeader(header: CowHeader): string[] {
  const { sectorSize, alignment } = header;
  if (!isPowerOfTwo(sectorSize) || sectorSize < 512 || sectorSize > MAX_SECTOR_SIZE) {
    throw new CowFormatError('bad-sector-size', 'sectorsize', sectorSize, `a power of two from 512 to ${MAX_SECTOR_SIZE}`);
  }
  if (header.version === 3 && alignment === 0) {
    throw new CowFormatError('bad-alignment', 'alignment', 0, 'a non-zero byte count (uml_mkcow uses 4096)');
  }
  if (header.cowFormat !== 0) {
    throw new CowFormatError('bad-cow-format', 'cow_format', header.cowFormat, '0 (bitmap), the only format UML knows');
  }
  const warnings: string[] = [];
  if (sectorSize !== DEFAULT_SECTOR_SIZE) {
    warnings.push(`sector size is ${sectorSize}; the kernel's ubd driver assumes 512`);
  }
  if (header.backingFile === '') warnings.push('the header names no backing file');
  return warnings;
}

/**
 * Parses any known header (V1 in either byte order, V2, V3, broken V3) from the file's first bytes.
 * Pass at least MAX_HEADER_SIZE bytes when the file has them.
 */
export function parseHeader(bytes: Uint8Array): ParsedHeader {
  const { version, littleEndian } = detectVersion(bytes);
  let header: CowHeader;
  if (version === 1) header = parseV1(bytes, littleEndian);
  else if (version === 2) header = parseV2(bytes);
  else if (version === 3) header = parseV3(bytes);
  else throw new CowFormatError('bad-version', 'version', version, '1, 2 or 3');
  const warnings = validateHeader(header);
  return { header, headerSize: headerSizeOf[header.layout], warnings };
}

function checkU32(field: string, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new CowFormatError('out-of-range', field, value, 'an unsigned 32-bit integer');
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new CowFormatError('out-of-range', 'size', size, `a byte count from 0 to ${Number.MAX_SAFE_INTEGER}`);
  }
}

/** The header uml_mkcow writes: version 3, big-endian, packed, 4128 bytes. */
export function serializeV3(fields: HeaderFields): Uint8Array {
  if (fields.backingFile === '') {
    // Readers take four zero bytes at offset 32 to mean the broken layout, so this could not be read back.
    throw new CowFormatError('backing-empty', 'backing_file', '""', 'a non-empty path (an empty one reads back as the broken 64-bit layout)');
  }
  checkU32('mtime', fields.mtime);
  checkU32('sectorsize', fields.sectorSize);
  checkU32('alignment', fields.alignment);
  checkSize(fields.size);
  const bytes = new Uint8Array(V3_HEADER_SIZE);
  const dv = view(bytes);
  dv.setUint32(0, COW_MAGIC, false);
  dv.setUint32(4, 3, false);
  dv.setUint32(8, fields.mtime, false);
  dv.setBigUint64(12, BigInt(fields.size), false);
  dv.setUint32(20, fields.sectorSize, false);
  dv.setUint32(24, fields.alignment, false);
  dv.setUint32(28, 0, false);
  writePath(bytes, 32, V3_PATH_LENGTH, fields.backingFile);
  return bytes;
}

/** The 64-bit layout old kernels wrote by mistake; only for building test files. */
export function serializeV3Broken(fields: HeaderFields): Uint8Array {
  checkU32('mtime', fields.mtime);
  checkSize(fields.size);
  const bytes = new Uint8Array(V3_BROKEN_HEADER_SIZE);
  const dv = view(bytes);
  dv.setUint32(0, COW_MAGIC, false);
  dv.setUint32(4, 3, false);
  dv.setUint32(8, fields.mtime, false);
  dv.setBigUint64(16, BigInt(fields.size), false);
  dv.setUint32(24, fields.sectorSize, false);
  dv.setUint32(28, fields.alignment, false);
  dv.setUint32(32, 0, false);
  writePath(bytes, 36, V3_PATH_LENGTH, fields.backingFile);
  return bytes;
}

/** Version 2: big-endian; no alignment field (the sector size serves). */
export function serializeV2(fields: Omit<HeaderFields, 'alignment'>): Uint8Array {
  checkU32('mtime', fields.mtime);
  checkSize(fields.size);
  const bytes = new Uint8Array(V2_HEADER_SIZE);
  const dv = view(bytes);
  dv.setUint32(0, COW_MAGIC, false);
  dv.setUint32(4, 2, false);
  writePath(bytes, 8, V2_PATH_LENGTH, fields.backingFile);
  dv.setUint32(4104, fields.mtime, false);
  dv.setBigUint64(4108, BigInt(fields.size), false);
  dv.setInt32(4116, fields.sectorSize, false);
  return bytes;
}

/** Version 1: host byte order (little-endian on x86, which is what this writes unless told). */
export function serializeV1(fields: Omit<HeaderFields, 'alignment'>, littleEndian = true): Uint8Array {
  checkU32('mtime', fields.mtime);
  checkSize(fields.size);
  const bytes = new Uint8Array(V1_HEADER_SIZE);
  const dv = view(bytes);
  dv.setUint32(0, COW_MAGIC, littleEndian);
  dv.setUint32(4, 1, littleEndian);
  writePath(bytes, 8, V1_PATH_LENGTH, fields.backingFile);
  dv.setUint32(264, fields.mtime, littleEndian);
  dv.setBigUint64(268, BigInt(fields.size), littleEndian);
  dv.setInt32(276, fields.sectorSize, littleEndian);
  return bytes;
}

/** Header bytes in the given layout (V1 in the given byte order). */
export function serializeLayout(layout: HeaderLayout, fields: HeaderFields, littleEndian = true): Uint8Array {
  switch (layout) {
    case 'v1':
      return serializeV1(fields, littleEndian);
    case 'v2':
      return serializeV2(fields);
    case 'v3':
      return serializeV3(fields);
    case 'v3-broken':
      return serializeV3Broken(fields);
  }
}

/**
 * The bytes of `header` in its own version and layout. Rewriting a header in place must keep the
 * layout: the bitmap and data area positions follow from the header's size.
 */
export function serializeSameLayout(header: CowHeader): Uint8Array {
  return serializeLayout(header.layout, header, header.littleEndian);
}
