import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { CowFormatError, UbdcowError } from '../../src/errors.js';
import {
  COW_MAGIC,
  type CowHeader,
  MAX_HEADER_SIZE,
  V1_HEADER_SIZE,
  V2_HEADER_SIZE,
  V3_BROKEN_HEADER_SIZE,
  V3_HEADER_SIZE,
  headerSize,
  parseHeader,
  serializeV1,
  serializeV2,
  serializeV3,
  serializeV3Broken,
  validateHeader,
} from '../../src/format/header.js';

/** The error a call throws, so tests can check its code, field and message together. */
function thrown(fn: () => unknown): CowFormatError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(CowFormatError);
    return err as CowFormatError;
  }
  throw new Error('expected an error, none was thrown');
}

function dataView(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const sample = {
  backingFile: '/var/lib/uml/base.img',
  mtime: 1_700_000_123,
  size: 8 * 1024 * 1024 + 512,
  sectorSize: 512,
  alignment: 4096,
};

/** A V3 header with some fields overwritten at their packed offsets. */
function v3With(patch: (dv: DataView) => void): Uint8Array {
  const bytes = serializeV3(sample);
  patch(dataView(bytes));
  return bytes;
}

// Fields a reader depends on, written where the notes' table says they live.
describe('field offsets on disk', () => {
  it('V3 is packed big-endian: mtime 8, size 12, sectorsize 20, alignment 24, cow_format 28, path 32', () => {
    const bytes = serializeV3(sample);
    const dv = dataView(bytes);
    expect(bytes.length).toBe(4128);
    expect(Buffer.from(bytes.subarray(0, 4)).toString('latin1')).toBe('OOOM');
    expect(dv.getUint32(0, false)).toBe(COW_MAGIC);
    expect(dv.getUint32(4, false)).toBe(3);
    expect(dv.getUint32(8, false)).toBe(sample.mtime);
    expect(dv.getBigUint64(12, false)).toBe(BigInt(sample.size));
    expect(dv.getUint32(20, false)).toBe(512);
    expect(dv.getUint32(24, false)).toBe(4096);
    expect(dv.getUint32(28, false)).toBe(0);
    expect(Buffer.from(bytes.subarray(32, 32 + sample.backingFile.length)).toString()).toBe(sample.backingFile);
    expect(bytes.subarray(32 + sample.backingFile.length).every((b) => b === 0)).toBe(true);
  });

  it('broken V3 shifts everything after mtime by 4 and is 4136 bytes', () => {
    const bytes = serializeV3Broken(sample);
    const dv = dataView(bytes);
    expect(bytes.length).toBe(4136);
    expect(dv.getUint32(8, false)).toBe(sample.mtime);
    expect(dv.getUint32(12, false)).toBe(0);
    expect(dv.getBigUint64(16, false)).toBe(BigInt(sample.size));
    expect(dv.getUint32(24, false)).toBe(512);
    expect(dv.getUint32(28, false)).toBe(4096);
    expect(dv.getUint32(32, false)).toBe(0);
    expect(Buffer.from(bytes.subarray(36, 36 + sample.backingFile.length)).toString()).toBe(sample.backingFile);
  });

  it('V2 is big-endian: path 8, mtime 4104, size 4108, sectorsize 4116', () => {
    const bytes = serializeV2(sample);
    const dv = dataView(bytes);
    expect(bytes.length).toBe(4120);
    expect(dv.getUint32(0, false)).toBe(COW_MAGIC);
    expect(dv.getUint32(4, false)).toBe(2);
    expect(Buffer.from(bytes.subarray(8, 8 + sample.backingFile.length)).toString()).toBe(sample.backingFile);
    expect(dv.getUint32(4104, false)).toBe(sample.mtime);
    expect(dv.getBigUint64(4108, false)).toBe(BigInt(sample.size));
    expect(dv.getInt32(4116, false)).toBe(512);
  });

  it.each([true, false])('V1 (littleEndian=%s) is in the given byte order: path 8, mtime 264, size 268, sectorsize 276', (le) => {
    const bytes = serializeV1(sample, le);
    const dv = dataView(bytes);
    expect(bytes.length).toBe(280);
    expect(dv.getUint32(0, le)).toBe(COW_MAGIC);
    expect(dv.getUint32(4, le)).toBe(1);
    expect(dv.getUint32(264, le)).toBe(sample.mtime);
    expect(dv.getBigUint64(268, le)).toBe(BigInt(sample.size));
    expect(dv.getInt32(276, le)).toBe(512);
    // Little-endian V1 spells the magic backwards on disk.
    expect(Buffer.from(bytes.subarray(0, 4)).toString('latin1')).toBe(le ? 'MOOO' : 'OOOM');
  });

  it('header sizes match the layouts', () => {
    expect([headerSize('v1'), headerSize('v2'), headerSize('v3'), headerSize('v3-broken')]).toEqual([
      V1_HEADER_SIZE,
      V2_HEADER_SIZE,
      V3_HEADER_SIZE,
      V3_BROKEN_HEADER_SIZE,
    ]);
    expect([V1_HEADER_SIZE, V2_HEADER_SIZE, V3_HEADER_SIZE, V3_BROKEN_HEADER_SIZE]).toEqual([280, 4120, 4128, 4136]);
    expect(MAX_HEADER_SIZE).toBe(4136);
  });
});

describe('round trips: serialize then parseHeader', () => {
  const pathArb = (maxBytes: number) =>
    fc
      .string({ unit: 'grapheme', minLength: 1, maxLength: 64 })
      .filter((s) => !s.includes('\0') && Buffer.byteLength(s) < maxBytes);
  const fieldsArb = (maxPathBytes: number) =>
    fc.record({
      backingFile: pathArb(maxPathBytes),
      mtime: fc.integer({ min: 0, max: 0xffffffff }),
      // Data area end must stay below 2^53, so leave room for header and bitmap.
      size: fc.oneof(fc.integer({ min: 0, max: 1 << 20 }), fc.integer({ min: 0, max: 2 ** 52 })),
      sectorSize: fc.constantFrom(512, 1024, 2048, 4096, 65536),
      alignment: fc.constantFrom(512, 4096, 65536, 1 << 20),
    });

  function expectedHeader(fields: typeof sample, version: 1 | 2 | 3, layout: CowHeader['layout'], littleEndian: boolean): CowHeader {
    return {
      version,
      layout,
      littleEndian,
      backingFile: fields.backingFile,
      mtime: fields.mtime,
      size: fields.size,
      sectorSize: fields.sectorSize,
      alignment: version === 3 ? fields.alignment : fields.sectorSize,
      cowFormat: 0,
    };
  }

  it('V3', () => {
    fc.assert(
      fc.property(fieldsArb(4096), (fields) => {
        const parsed = parseHeader(serializeV3(fields));
        expect(parsed.header).toEqual(expectedHeader(fields, 3, 'v3', false));
        expect(parsed.headerSize).toBe(4128);
      }),
    );
  });

  it('broken V3', () => {
    fc.assert(
      fc.property(fieldsArb(4096), (fields) => {
        const parsed = parseHeader(serializeV3Broken(fields));
        expect(parsed.header).toEqual(expectedHeader(fields, 3, 'v3-broken', false));
        expect(parsed.headerSize).toBe(4136);
      }),
    );
  });

  it('V2', () => {
    fc.assert(
      fc.property(fieldsArb(4096), (fields) => {
        const parsed = parseHeader(serializeV2(fields));
        expect(parsed.header).toEqual(expectedHeader(fields, 2, 'v2', false));
        expect(parsed.headerSize).toBe(4120);
      }),
    );
  });

  it.each([true, false])('V1, littleEndian=%s', (le) => {
    fc.assert(
      fc.property(fieldsArb(256), (fields) => {
        const parsed = parseHeader(serializeV1(fields, le));
        expect(parsed.header).toEqual(expectedHeader(fields, 1, 'v1', le));
        expect(parsed.headerSize).toBe(280);
      }),
    );
  });

  it('parses from a longer buffer (the first MAX_HEADER_SIZE bytes of a file)', () => {
    for (const bytes of [serializeV1(sample), serializeV2(sample), serializeV3(sample), serializeV3Broken(sample)]) {
      const fileStart = new Uint8Array(MAX_HEADER_SIZE + 100).fill(0xaa);
      fileStart.set(bytes);
      expect(parseHeader(fileStart).header.size).toBe(sample.size);
    }
  });

  it('parses from a subarray with a non-zero byteOffset', () => {
    const bytes = serializeV2(sample);
    const outer = new Uint8Array(bytes.length + 3);
    outer.set(bytes, 3);
    expect(parseHeader(outer.subarray(3)).header.backingFile).toBe(sample.backingFile);
  });

  it('keeps the largest values: mtime 2^32-1, path of 4095 bytes, size 2^53 - 2^20', () => {
    const fields = { ...sample, mtime: 0xffffffff, backingFile: '/' + 'p'.repeat(4094), size: 2 ** 53 - 2 ** 20 };
    expect(parseHeader(serializeV3(fields)).header).toMatchObject({ mtime: 0xffffffff, backingFile: fields.backingFile, size: fields.size });
    const v1Path = '/' + 'q'.repeat(254);
    expect(parseHeader(serializeV1({ ...fields, backingFile: v1Path })).header.backingFile).toBe(v1Path);
  });
});

describe('layout detection', () => {
  it('tells packed V3 from broken V3 by the four bytes at offset 32', () => {
    expect(parseHeader(serializeV3(sample)).header.layout).toBe('v3');
    expect(parseHeader(serializeV3Broken(sample)).header.layout).toBe('v3-broken');
  });

  it('a one-byte backing path still reads as packed V3', () => {
    expect(parseHeader(serializeV3({ ...sample, backingFile: 'b' })).header).toMatchObject({ layout: 'v3', backingFile: 'b' });
  });

  it('detects V1 byte order from the magic', () => {
    expect(parseHeader(serializeV1(sample, true)).header.littleEndian).toBe(true);
    expect(parseHeader(serializeV1(sample, false)).header.littleEndian).toBe(false);
  });

  it('reports no warnings for an ordinary header', () => {
    expect(parseHeader(serializeV3(sample)).warnings).toEqual([]);
  });
});

describe('validation errors', () => {
  it('bad magic: names the field, the value found and the expected magic', () => {
    const bytes = serializeV3(sample);
    bytes.set([0x7f, 0x45, 0x4c, 0x46]);
    const err = thrown(() => parseHeader(bytes));
    expect(err.code).toBe('bad-magic');
    expect(err.field).toBe('magic');
    expect(err.value).toBe('0x7f454c46');
    expect(err.message).toContain('0x4f4f4f4d');
    expect(err.message).toContain('MOOO');
    expect(err.message).toContain('not a UML COW file');
  });

  it('bad magic on an all-zero buffer', () => {
    expect(thrown(() => parseHeader(new Uint8Array(4136))).code).toBe('bad-magic');
  });

  it.each([0, 4, 0x01000000, 0xffffffff])('unknown version %d', (version) => {
    const bytes = v3With((dv) => dv.setUint32(4, version, false));
    const err = thrown(() => parseHeader(bytes));
    expect(err.code).toBe('bad-version');
    expect(err.field).toBe('version');
    expect(err.value).toBe(String(version));
    expect(err.message).toBe(`version is ${version}, expected 1, 2 or 3`);
  });

  it('a little-endian version is read little-endian when the magic is little-endian', () => {
    const bytes = serializeV1(sample, true);
    dataView(bytes).setUint32(4, 7, true);
    expect(thrown(() => parseHeader(bytes)).value).toBe('7');
  });

  it('fewer than 8 bytes', () => {
    for (const length of [0, 1, 4, 7]) {
      const err = thrown(() => parseHeader(serializeV3(sample).subarray(0, length)));
      expect(err.code).toBe('truncated-header');
      expect(err.message).toBe(`header is ${length} bytes long, expected at least 8 bytes`);
    }
  });

  it.each([
    ['v1', () => serializeV1(sample), 280],
    ['v2', () => serializeV2(sample), 4120],
    ['v3', () => serializeV3(sample), 4128],
    ['v3-broken', () => serializeV3Broken(sample), 4136],
  ] as const)('truncated %s header: one byte short of %d', (layout, make, size) => {
    const bytes = make();
    expect(bytes.length).toBe(size);
    const err = thrown(() => parseHeader(bytes.subarray(0, size - 1)));
    expect(err.code).toBe('truncated-header');
    expect(err.field).toBe('header');
    expect(err.message).toBe(`header is ${size - 1} bytes long, expected at least ${size} bytes for a ${layout} header`);
  });

  it('a V3 header cut before offset 36 is reported against the packed size', () => {
    const err = thrown(() => parseHeader(serializeV3(sample).subarray(0, 20)));
    expect(err.code).toBe('truncated-header');
    expect(err.message).toContain('4128');
  });

  describe('sector size', () => {
    it.each([0, 3, 256, 511, 1000, 131072, 0x80000000, 0xffffffff])('%d is refused', (sectorSize) => {
      const err = thrown(() => parseHeader(v3With((dv) => dv.setUint32(20, sectorSize, false))));
      expect(err.code).toBe('bad-sector-size');
      expect(err.field).toBe('sectorsize');
      expect(err.value).toBe(String(sectorSize));
      expect(err.message).toBe(`sectorsize is ${sectorSize}, expected a power of two from 512 to 65536`);
    });

    it('a negative V1/V2 sector size (signed on disk) is refused', () => {
      const v2 = serializeV2(sample);
      dataView(v2).setInt32(4116, -512, false);
      expect(thrown(() => parseHeader(v2)).value).toBe('-512');
      const v1 = serializeV1(sample);
      dataView(v1).setInt32(276, 0, true);
      expect(thrown(() => parseHeader(v1)).code).toBe('bad-sector-size');
    });

    it.each([1024, 4096, 65536])('%d is accepted with a warning that the kernel assumes 512', (sectorSize) => {
      const parsed = parseHeader(serializeV3({ ...sample, sectorSize }));
      expect(parsed.header.sectorSize).toBe(sectorSize);
      expect(parsed.warnings).toEqual([`sector size is ${sectorSize}; the kernel's ubd driver assumes 512`]);
    });
  });

  it('alignment 0 is refused in V3 (the C readers would divide by zero)', () => {
    for (const bytes of [serializeV3({ ...sample, alignment: 0 }), serializeV3Broken({ ...sample, alignment: 0 })]) {
      const err = thrown(() => parseHeader(bytes));
      expect(err.code).toBe('bad-alignment');
      expect(err.field).toBe('alignment');
      expect(err.message).toBe('alignment is 0, expected a non-zero byte count (uml_mkcow uses 4096)');
    }
  });

  it.each([1, 2, 0xffffffff])('cow_format %d is refused', (format) => {
    const err = thrown(() => parseHeader(v3With((dv) => dv.setUint32(28, format, false))));
    expect(err.code).toBe('bad-cow-format');
    expect(err.field).toBe('cow_format');
    expect(err.value).toBe(String(format));
    expect(err.message).toContain('expected 0 (bitmap)');
  });

  describe('size beyond 2^53', () => {
    it.each([
      ['2^53', 2n ** 53n],
      ['2^63', 2n ** 63n],
      ['2^64 - 1', 2n ** 64n - 1n],
    ])('%s in V3', (_name, size) => {
      const err = thrown(() => parseHeader(v3With((dv) => dv.setBigUint64(12, size, false))));
      expect(err.code).toBe('too-large');
      expect(err.field).toBe('size');
      expect(err.value).toBe(size.toString());
      expect(err.message).toBe(`size is ${size}, expected at most ${Number.MAX_SAFE_INTEGER} bytes`);
    });

    it('in V1 little-endian, V2 and broken V3', () => {
      const v1 = serializeV1(sample, true);
      dataView(v1).setBigUint64(268, 2n ** 64n - 1n, true);
      const v2 = serializeV2(sample);
      dataView(v2).setBigUint64(4108, 2n ** 60n, false);
      const v3b = serializeV3Broken(sample);
      dataView(v3b).setBigUint64(16, 2n ** 53n, false);
      for (const bytes of [v1, v2, v3b]) expect(thrown(() => parseHeader(bytes)).code).toBe('too-large');
    });

    it('2^53 - 1 itself parses (the geometry refuses it later)', () => {
      const bytes = v3With((dv) => dv.setBigUint64(12, BigInt(Number.MAX_SAFE_INTEGER), false));
      expect(parseHeader(bytes).header.size).toBe(Number.MAX_SAFE_INTEGER);
    });
  });

  describe('backing path without a terminator', () => {
    it.each([
      ['v3', () => serializeV3(sample), 32, 4096],
      ['v3-broken', () => serializeV3Broken(sample), 36, 4096],
      ['v2', () => serializeV2(sample), 8, 4096],
      ['v1', () => serializeV1(sample), 8, 256],
    ] as const)('%s: a full path field is refused', (_layout, make, offset, length) => {
      const bytes = make();
      bytes.fill(0x61, offset, offset + length);
      const err = thrown(() => parseHeader(bytes));
      expect(err.code).toBe('backing-unterminated');
      expect(err.field).toBe('backing_file');
      expect(err.message).toBe(
        `backing_file is ${length} bytes with no NUL terminator, expected a NUL-terminated path of at most ${length - 1} bytes`,
      );
    });
  });

  it('an empty backing path in V1/V2 is accepted with a warning', () => {
    expect(parseHeader(serializeV2({ ...sample, backingFile: '' })).warnings).toContain('the header names no backing file');
    expect(parseHeader(serializeV1({ ...sample, backingFile: '' })).warnings).toContain('the header names no backing file');
  });

  it('inFile puts the file name in front and keeps code, field and value', () => {
    const err = thrown(() => parseHeader(new Uint8Array(10))).inFile('/tmp/x.cow');
    expect(err.message).toBe('/tmp/x.cow: magic is 0x00000000, expected 0x4f4f4f4d ("MOOO"): not a UML COW file');
    expect(err.code).toBe('bad-magic');
    expect(err.file).toBe('/tmp/x.cow');
  });
});

describe('serialize refuses what cannot be written', () => {
  it('a 4096-byte backing path (4097 with its terminator) in V3, broken V3 and V2', () => {
    const path = '/' + 'x'.repeat(4095);
    for (const serialize of [serializeV3, serializeV3Broken, serializeV2]) {
      const err = thrown(() => serialize({ ...sample, backingFile: path }));
      expect(err.code).toBe('backing-too-long');
      expect(err.message).toBe('backing_file is 4096 bytes long, expected at most 4095 bytes (the field holds 4096 with its terminator)');
    }
  });

  it('counts bytes, not characters: 2048 two-byte characters are too long', () => {
    expect(thrown(() => serializeV3({ ...sample, backingFile: 'é'.repeat(2048) })).value).toBe('4096 bytes long');
    expect(parseHeader(serializeV3({ ...sample, backingFile: 'é'.repeat(2047) })).header.backingFile).toBe('é'.repeat(2047));
  });

  it('a 256-byte path in V1', () => {
    const err = thrown(() => serializeV1({ ...sample, backingFile: 'y'.repeat(256) }));
    expect(err.code).toBe('backing-too-long');
    expect(err.message).toContain('at most 255 bytes');
  });

  it('a path with a NUL byte', () => {
    const err = thrown(() => serializeV3({ ...sample, backingFile: '/a\0b' }));
    expect(err.code).toBe('backing-nul');
  });

  it('an empty V3 path (it would read back as the broken layout, in the kernel too)', () => {
    expect(thrown(() => serializeV3({ ...sample, backingFile: '' })).code).toBe('backing-empty');
  });

  it.each([
    ['mtime', { mtime: -1 }],
    ['mtime', { mtime: 2 ** 32 }],
    ['mtime', { mtime: 1.5 }],
    ['size', { size: -1 }],
    ['size', { size: 2 ** 53 }],
    ['size', { size: Number.NaN }],
    ['sectorsize', { sectorSize: 2 ** 32 }],
    ['alignment', { alignment: -4096 }],
  ] as const)('out-of-range %s', (field, patch) => {
    const err = thrown(() => serializeV3({ ...sample, ...patch }));
    expect(err.code).toBe('out-of-range');
    expect(err.field).toBe(field);
  });

  it('out-of-range size and mtime in V1, V2 and broken V3', () => {
    for (const serialize of [serializeV1, serializeV2, serializeV3Broken]) {
      expect(thrown(() => serialize({ ...sample, size: 2 ** 53 })).field).toBe('size');
      expect(thrown(() => serialize({ ...sample, mtime: 2 ** 32 })).field).toBe('mtime');
    }
  });
});

describe('validateHeader on its own', () => {
  const header: CowHeader = { version: 3, layout: 'v3', littleEndian: false, cowFormat: 0, ...sample };

  it('accepts a V1/V2 header whose alignment is 0 (they align to the sector size, not a field)', () => {
    expect(validateHeader({ ...header, version: 2, layout: 'v2', alignment: 0 })).toEqual([]);
  });

  it('refuses sector size 0 before anything else', () => {
    expect(thrown(() => validateHeader({ ...header, sectorSize: 0, alignment: 0 })).code).toBe('bad-sector-size');
  });
});

describe('error messages stay on one line', () => {
  it('escapes control characters a damaged backing path brings into a message', () => {
    const err = new UbdcowError('backing-missing', '/t\nmp/base\timg\x01: cannot open backing file');
    expect(err.message).toBe('/t\\nmp/base\\timg\\x01: cannot open backing file');
    expect(new CowFormatError('backing-nul', 'backing_file', 'a\nb', 'c').message).not.toContain('\n');
  });
});
