/* The pure NBD codec: byte layouts from doc/proto.md, and decoders that refuse what does not fit. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import * as P from '../../src/nbd/protocol.js';
import { cowAllocationFromRuns, mergedAllocation } from '../../src/commands/serve.js';
import type { FileHandleLike } from '../../src/io/file/index.js';
import type { StatusDescriptor } from '../../src/nbd/protocol.js';

describe('NBD codec', () => {
  it('greeting: NBDMAGIC, IHAVEOPT, handshake flags', () => {
    const g = P.encodeGreeting();
    expect(g.toString('latin1', 0, 16)).toBe('NBDMAGICIHAVEOPT');
    expect(g.readUInt16BE(16)).toBe(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES);
    expect(g.length).toBe(18);
  });

  it('constants match the spec', () => {
    expect([P.OPT_EXPORT_NAME, P.OPT_ABORT, P.OPT_LIST, P.OPT_STARTTLS, P.OPT_INFO, P.OPT_GO, P.OPT_STRUCTURED_REPLY, P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT]).toEqual([1, 2, 3, 5, 6, 7, 8, 9, 10]);
    expect(P.REP_ERR_UNSUP).toBe(2 ** 31 + 1);
    expect(P.REP_ERR_UNKNOWN).toBe(2 ** 31 + 6);
    expect(P.REPLY_TYPE_ERROR).toBe(2 ** 15 + 1);
    expect([P.NBD_EPERM, P.NBD_EIO, P.NBD_EINVAL, P.NBD_ENOSPC, P.NBD_EOVERFLOW, P.NBD_ENOTSUP, P.NBD_ESHUTDOWN]).toEqual([1, 5, 22, 28, 75, 95, 108]);
    expect(P.FLAG_CAN_MULTI_CONN).toBe(256);
  });

  it('option header round trip, wrong magic refused', () => {
    const h = P.encodeOptionHeader(P.OPT_GO, 1234);
    expect(P.decodeOptionHeader(h)).toEqual({ option: P.OPT_GO, length: 1234 });
    h[0] ^= 1;
    expect(P.decodeOptionHeader(h)).toBeUndefined();
    expect(P.decodeOptionHeader(Buffer.alloc(10))).toBeUndefined();
  });

  it('option reply layout: magic, option, type, length, data', () => {
    const r = P.encodeOptionReply(P.OPT_LIST, P.REP_SERVER, P.encodeServerEntry('disk', 'desc'));
    expect(r.readBigUInt64BE(0)).toBe(0x3e889045565a9n);
    expect(r.readUInt32BE(8)).toBe(P.OPT_LIST);
    expect(r.readUInt32BE(12)).toBe(P.REP_SERVER);
    expect(r.readUInt32BE(16)).toBe(4 + 4 + 4);
    expect(r.readUInt32BE(20)).toBe(4);
    expect(r.toString('utf8', 24)).toBe('diskdesc');
    const decoded = P.decodeOptionReply(Buffer.concat([r, Buffer.from('trailing')]));
    expect(decoded?.bytes).toBe(r.length);
  });

  it('error messages are cut to 4096 bytes of valid UTF-8', () => {
    const r = P.encodeOptionError(1, P.REP_ERR_INVALID, 'é'.repeat(5000));
    const len = r.readUInt32BE(16);
    expect(len).toBeLessThanOrEqual(4096);
    expect(P.decodeString(r.subarray(20), 'x').ok).toBe(true);
  });

  it('NBD_INFO_EXPORT is 12 bytes, BLOCK_SIZE 14', () => {
    const e = P.encodeInfoExport(2 ** 40 + 3, P.FLAG_HAS_FLAGS | P.FLAG_READ_ONLY);
    expect(e.length).toBe(12);
    expect(e.readBigUInt64BE(2)).toBe(2n ** 40n + 3n);
    expect(e.readUInt16BE(10)).toBe(3);
    const b = P.encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: 32 << 20 });
    expect(b.length).toBe(14);
    expect([b.readUInt16BE(0), b.readUInt32BE(2), b.readUInt32BE(6), b.readUInt32BE(10)]).toEqual([3, 1, 4096, 32 << 20]);
  });

  it('block size rules', () => {
    expect(P.blockSizeProblem({ minimum: 1, preferred: 4096, maximum: 32 << 20 }, 1 << 30)).toBeUndefined();
    expect(P.blockSizeProblem({ minimum: 3, preferred: 4096, maximum: 32 << 20 }, 1 << 30)).toMatch(/minimum/);
    expect(P.blockSizeProblem({ minimum: 1, preferred: 256, maximum: 32 << 20 }, 1 << 30)).toMatch(/preferred/);
    expect(P.blockSizeProblem({ minimum: 512, preferred: 4096, maximum: 1000 }, 1 << 30)).toMatch(/maximum/);
  });

  it('export-name reply: 134 bytes, or 10 with NO_ZEROES', () => {
    expect(P.encodeExportNameReply(1024, 1, false).length).toBe(134);
    expect(P.encodeExportNameReply(1024, 1, true).length).toBe(10);
  });

  it('info request round trip and malformed inputs', () => {
    const data = P.encodeInfoRequest('vm', [P.INFO_BLOCK_SIZE, P.INFO_NAME]);
    expect(P.decodeInfoRequest(data)).toEqual({ ok: true, value: { name: 'vm', requests: [3, 1] } });
    expect(P.decodeInfoRequest(data.subarray(0, data.length - 1)).ok).toBe(false);
    expect(P.decodeInfoRequest(Buffer.concat([data, Buffer.alloc(2)])).ok).toBe(false);
    const huge = Buffer.from(data);
    huge.writeUInt32BE(0xffffffff, 0);
    expect(P.decodeInfoRequest(huge).ok).toBe(false);
    expect(P.decodeInfoRequest(Buffer.alloc(3)).ok).toBe(false);
    const nul = P.encodeInfoRequest('a\0b', []);
    expect(P.decodeInfoRequest(nul).ok).toBe(false);
  });

  it('meta context request round trip and malformed inputs', () => {
    const data = P.encodeMetaContextRequest('', ['base:allocation', 'qemu:dirty-bitmap:x']);
    expect(P.decodeMetaContextRequest(data)).toEqual({ ok: true, value: { name: '', queries: ['base:allocation', 'qemu:dirty-bitmap:x'] } });
    expect(P.decodeMetaContextRequest(data.subarray(0, data.length - 1)).ok).toBe(false);
    const lying = Buffer.from(data);
    lying.writeUInt32BE(1000, 4); // count of queries far above what follows
    expect(P.decodeMetaContextRequest(lying).ok).toBe(false);
  });

  it('meta context matching: base: is a LIST wildcard only; other namespaces select nothing', () => {
    expect(P.matchMetaContexts('base:allocation', false)).toEqual(['base:allocation']);
    expect(P.matchMetaContexts('base:', true)).toEqual(['base:allocation']);
    expect(P.matchMetaContexts('base:', false)).toEqual([]);
    expect(P.matchMetaContexts('qemu:allocation-depth', false)).toEqual([]);
    expect(P.matchMetaContexts('nocolon', true)).toEqual([]);
  });

  it('request round trip; offsets beyond 2^53 become Infinity', () => {
    const r = P.encodeRequest({ flags: P.CMD_FLAG_FUA, type: P.CMD_WRITE, handle: 0x0102030405060708n, offset: 4096, length: 512 });
    expect(r.length).toBe(28);
    const d = P.decodeRequest(r)!;
    expect(d).toMatchObject({ flags: 1, type: 1, offset: 4096, length: 512 });
    expect(d.handle.readBigUInt64BE(0)).toBe(0x0102030405060708n);
    const far = P.encodeRequest({ type: P.CMD_READ, handle: 1n, offset: 2n ** 63n, length: 1 });
    expect(P.decodeRequest(far)!.offset).toBe(Number.POSITIVE_INFINITY);
    r[0] = 0;
    expect(P.decodeRequest(r)).toBeUndefined();
  });

  it('structured chunks: data prefix, error, block status, none', () => {
    const handle = Buffer.from('handle!!');
    const data = Buffer.alloc(P.OFFSET_DATA_PREFIX_BYTES + 5);
    P.writeOffsetDataPrefix(data, P.REPLY_FLAG_DONE, handle, 77, 5);
    const chunk = P.decodeStructuredChunk(data)!.chunk;
    expect(chunk).toMatchObject({ flags: 1, type: P.REPLY_TYPE_OFFSET_DATA });
    expect(chunk.payload.length).toBe(13);
    expect(chunk.payload.readBigUInt64BE(0)).toBe(77n);
    const err = P.decodeStructuredChunk(P.encodeStructuredError(handle, P.NBD_EINVAL, 'bad'))!.chunk;
    expect(err.type).toBe(P.REPLY_TYPE_ERROR);
    expect(err.payload.readUInt32BE(0)).toBe(22);
    expect(err.payload.readUInt16BE(4)).toBe(3);
    const bs = P.decodeStructuredChunk(P.encodeBlockStatus(1, handle, 9, [{ length: 512, flags: 0 }, { length: 1024, flags: 1 }]))!.chunk;
    expect(bs.payload.length).toBe(4 + 16);
    expect([bs.payload.readUInt32BE(0), bs.payload.readUInt32BE(4), bs.payload.readUInt32BE(8), bs.payload.readUInt32BE(12), bs.payload.readUInt32BE(16)]).toEqual([9, 512, 0, 1024, 1]);
    expect(() => P.encodeBlockStatus(1, handle, 1, [])).toThrow();
    expect(() => P.encodeBlockStatus(1, handle, 1, [{ length: 0, flags: 0 }])).toThrow();
    expect(P.encodeStructuredNone(handle).readUInt16BE(4)).toBe(P.REPLY_FLAG_DONE);
  });

  it('host errors map to the protocol values', () => {
    expect(P.nbdErrorFor('ENOSPC')).toBe(P.NBD_ENOSPC);
    expect(P.nbdErrorFor('EDQUOT')).toBe(P.NBD_ENOSPC);
    expect(P.nbdErrorFor('EFBIG')).toBe(P.NBD_ENOSPC);
    expect(P.nbdErrorFor('EROFS')).toBe(P.NBD_EPERM);
    expect(P.nbdErrorFor('EIO')).toBe(P.NBD_EIO);
    expect(P.nbdErrorFor(undefined)).toBe(P.NBD_EIO);
  });

  it('decoders never throw on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        P.decodeOptionHeader(bytes);
        P.decodeRequest(bytes);
        P.decodeInfoRequest(bytes);
        P.decodeMetaContextRequest(bytes);
        P.decodeString(bytes, 'x');
        P.decodeOptionReply(bytes);
        P.decodeStructuredChunk(bytes);
      }),
    );
  });
});

/** Sectors examined per block-status request before answering with what was found (clients ask again). */
const MAX_SCANNED_SECTORS = 1 << 23;

/**
 * The reference for cowAllocationFromRuns, asking sector by sector. base:allocation over the COW bitmap: runs of sectors the COW holds (status 0) and runs that
 * read through to the backing (NBD_STATE_HOLE), clipped to [offset, offset + length).
 */
function cowAllocation(
  cow: { sectorSize: number; isAllocated(sector: number): boolean },
  offset: number,
  length: number,
  maxExtents: number,
): StatusDescriptor[] {
  const sectorSize = cow.sectorSize;
  const end = offset + length;
  const out: StatusDescriptor[] = [];
  let sector = Math.floor(offset / sectorSize);
  const lastSector = Math.ceil(end / sectorSize);
  let runStart = offset;
  let runAllocated = cow.isAllocated(sector);
  let scanned = 0;
  for (sector++; sector < lastSector; sector++) {
    const allocated = cow.isAllocated(sector);
    if (allocated !== runAllocated) {
      const boundary = sector * sectorSize;
      out.push({ length: boundary - runStart, flags: runAllocated ? 0 : P.STATE_HOLE });
      if (out.length >= maxExtents) return out;
      runStart = boundary;
      runAllocated = allocated;
    }
    if (++scanned >= MAX_SCANNED_SECTORS) {
      const boundary = (sector + 1) * sectorSize;
      if (boundary < end) {
        out.push({ length: boundary - runStart, flags: runAllocated ? 0 : P.STATE_HOLE });
        return out;
      }
    }
  }
  out.push({ length: end - runStart, flags: runAllocated ? 0 : P.STATE_HOLE });
  return out;
}


describe('base:allocation over a COW bitmap', () => {
  const bitmap = (set: number[]) => ({ sectorSize: 512, isAllocated: (s: number) => set.includes(s) });

  it('runs of held sectors are data, the rest holes; clipped to the request, unaligned ends too', () => {
    const cow = bitmap([2, 3, 7]);
    expect(cowAllocation(cow, 0, 8 * 512, 100)).toEqual([
      { length: 1024, flags: P.STATE_HOLE },
      { length: 1024, flags: 0 },
      { length: 1536, flags: P.STATE_HOLE },
      { length: 512, flags: 0 },
    ]);
    expect(cowAllocation(cow, 1100, 1000, 100)).toEqual([
      { length: 2048 - 1100, flags: 0 },
      { length: 2100 - 2048, flags: P.STATE_HOLE },
    ]);
    expect(cowAllocation(cow, 0, 8 * 512, 1)).toEqual([{ length: 1024, flags: P.STATE_HOLE }]);
  });

  it('the run query gives the same answer as the sector-by-sector scan (property)', async () => {
    const withRuns = (set: number[], coveredSectors: number) => ({
      ...bitmap(set),
      geometry: { coveredSectors },
      async *allocatedRuns(start = 0, end = coveredSectors) {
        for (let s = start; s < end; s++) {
          if (!set.includes(s)) continue;
          const runStart = s;
          while (s < end && set.includes(s)) s++;
          yield { start: runStart, end: s };
        }
      },
    });
    await fc.assert(
      fc.asyncProperty(fc.array(fc.nat(63)), fc.nat(64 * 512 - 1), fc.integer({ min: 1, max: 64 * 512 }), fc.integer({ min: 1, max: 10 }), async (set, offset, length, max) => {
        const len = Math.min(length, 64 * 512 - offset);
        expect(await cowAllocationFromRuns(withRuns(set, 64), offset, len, max)).toEqual(cowAllocation(bitmap(set), offset, len, max));
      }),
    );
    // Widened to a 2 KiB grain (convert -B asks for qcow2's 64 KiB clusters): a run grows
    // outwards to whole grains, and runs whose grains meet or overlap join; clipped to the request.
    expect(await cowAllocationFromRuns(withRuns([1, 9, 10, 13], 64), 0, 24 * 512, 10, 2048)).toEqual([
      { length: 2048, flags: 0 },
      { length: 2048, flags: P.STATE_HOLE },
      { length: 4096, flags: 0 },
      { length: 4096, flags: P.STATE_HOLE },
    ]);
    expect(await cowAllocationFromRuns(withRuns([1, 9, 10, 13], 64), 600, 2000, 10, 2048)).toEqual([
      { length: 1448, flags: 0 },
      { length: 552, flags: P.STATE_HOLE },
    ]);
    // Past the bitmap's cover (a V1/V2 rounding), sectors read from the backing: holes.
    expect(await cowAllocationFromRuns(withRuns([2, 3], 3), 0, 8 * 512, 10)).toEqual([
      { length: 1024, flags: P.STATE_HOLE },
      { length: 512, flags: 0 },
      { length: 5 * 512, flags: P.STATE_HOLE },
    ]);
  });

  it('merged allocation: data where the COW or the backing holds it, zero holes elsewhere, data past the backing; a one-descriptor answer spans COW runs and backing data alike (property)', async () => {
    const SECTORS = 64;
    const withRuns = (set: number[]) => ({
      sectorSize: 512,
      geometry: { coveredSectors: SECTORS },
      async *allocatedRuns(start = 0, end = SECTORS) {
        for (let s = start; s < end; s++) {
          if (!set.includes(s)) continue;
          const runStart = s;
          while (s < end && set.includes(s)) s++;
          yield { start: runStart, end: s };
        }
      },
    });
    // A sparse backing of `sizeSectors` whose data lies in the sectors of `data` (SEEK_DATA/SEEK_HOLE as Linux answers them).
    const backingOf = (data: number[], sizeSectors: number) => {
      const size = sizeSectors * 512;
      const isData = (byte: number) => data.includes(Math.floor(byte / 512));
      return {
        size,
        handle: {
          seekData: (from: number) => {
            for (let at = from; at < size; at += 512 - (at % 512)) if (isData(at)) return at;
            return undefined;
          },
          seekHole: (from: number) => {
            let at = from;
            while (at < size && isData(at)) at += 512 - (at % 512);
            return Math.min(at, size);
          },
        } as unknown as FileHandleLike,
      };
    };
    const reference = (set: number[], data: number[], sizeSectors: number, offset: number, length: number, max: number): StatusDescriptor[] => {
      const runs: StatusDescriptor[] = [];
      for (let at = offset; at < offset + length; ) {
        const sector = Math.floor(at / 512);
        const next = Math.min((sector + 1) * 512, offset + length);
        const flags = set.includes(sector) || data.includes(sector) || sector >= sizeSectors ? 0 : P.STATE_HOLE | P.STATE_ZERO;
        const last = runs[runs.length - 1];
        if (last && last.flags === flags) last.length += next - at;
        else runs.push({ length: next - at, flags });
        at = next;
      }
      return runs.slice(0, max);
    };
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.nat(SECTORS - 1)),
        fc.array(fc.nat(SECTORS - 1)),
        fc.integer({ min: 0, max: SECTORS }),
        fc.nat(SECTORS * 512 - 1),
        fc.integer({ min: 1, max: SECTORS * 512 }),
        fc.integer({ min: 1, max: 6 }),
        async (set, data, sizeSectors, offset, length, max) => {
          const len = Math.min(length, SECTORS * 512 - offset);
          const got = await mergedAllocation(withRuns(set), backingOf(data, sizeSectors), offset, len, max);
          expect(got).toEqual(reference(set, data, sizeSectors, offset, len, max));
        },
      ),
    );
    // One descriptor asked for: a COW page inside the backing's data does not cut the data short.
    expect(await mergedAllocation(withRuns([4]), backingOf([2, 3, 5, 6], SECTORS), 1024, 8 * 512, 1)).toEqual([{ length: 5 * 512, flags: 0 }]);
  });

  it('descriptors always cover a prefix of the request exactly (property)', () => {
    fc.assert(
      fc.property(fc.array(fc.nat(63)), fc.nat(64 * 512 - 1), fc.integer({ min: 1, max: 64 * 512 }), fc.integer({ min: 1, max: 10 }), (set, offset, length, max) => {
        const len = Math.min(length, 64 * 512 - offset);
        const out = cowAllocation(bitmap(set), offset, len, max);
        expect(out.length).toBeGreaterThan(0);
        expect(out.length).toBeLessThanOrEqual(max);
        const total = out.reduce((s, d) => s + d.length, 0);
        expect(total).toBeLessThanOrEqual(len);
        if (out.length < max) expect(total).toBe(len);
        let at = offset;
        for (const d of out) {
          expect(d.length).toBeGreaterThan(0);
          for (let s = Math.floor(at / 512); s < Math.ceil((at + d.length) / 512); s++) expect(set.includes(s) ? 0 : 1).toBe(d.flags);
          at += d.length;
        }
      }),
    );
  });
});
