import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createCow } from '../../src/commands/create.js';
import { type MappedExtent, mapCow } from '../../src/commands/map.js';
import { parseHeader } from '../../src/format/header.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { writeCowSectors } from '../helpers/cow-writes.js';
import { ensureBuiltCli, run } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

/**
 * The reference: read the bitmap bytes straight from the file and turn each run of set bits
 * (bit N = byte N>>3, mask 1<<(N&7)) into an extent, with no library code involved but the header parser.
 */
function extentsFromBitmap(cowFile: string): { extents: MappedExtent[]; size: number } {
  const bytes = fs.readFileSync(cowFile);
  const { header } = parseHeader(bytes);
  const { bitmapOffset, dataOffset, coveredSectors } = computeGeometry(header);
  const extents: MappedExtent[] = [];
  for (let sector = 0; sector < coveredSectors; sector++) {
    if (!(bytes[bitmapOffset + (sector >> 3)] & (1 << (sector & 7)))) continue;
    const offset = sector * header.sectorSize;
    const length = Math.min(header.sectorSize, header.size - offset);
    const last = extents[extents.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else extents.push({ offset, length, cowOffset: dataOffset + offset });
  }
  return { extents, size: header.size };
}

describe('mapCow', () => {
  const tmp = useTempDir('file');
  let caseNumber = 0;

  it('agrees with the bitmap, and each extent\'s cowOffset holds the data written there', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 6000 * 512 }),
        fc.array(fc.record({ at: fc.nat(), count: fc.integer({ min: 1, max: 500 }) }), { maxLength: 12 }),
        fc.constantFrom(512, 4096),
        async (size, picks, sectorSize) => {
          const dir = path.join(tmp.path, `case-${caseNumber++}`);
          fs.mkdirSync(dir);
          try {
            const backingFile = path.join(dir, 'base.img');
            fs.closeSync(fs.openSync(backingFile, 'w'));
            fs.truncateSync(backingFile, size);
            const cowFile = path.join(dir, 'disk.cow');
            await createCow(cowFile, backingFile, { sectorSize });
            const sectors = Math.ceil(size / sectorSize);
            const writes = picks.map(({ at, count }) => {
              const sector = at % sectors;
              const end = Math.min(size, (sector + count) * sectorSize);
              return { sector, data: randomBytes(end - sector * sectorSize) };
            });
            await writeCowSectors(cowFile, writes);
            const result = await mapCow(cowFile);
            const reference = extentsFromBitmap(cowFile);
            expect(result.extents).toEqual(reference.extents);
            expect(result.size).toBe(size);
            expect(result.allocatedBytes).toBe(reference.extents.reduce((sum, extent) => sum + extent.length, 0));
            const cow = fs.openSync(cowFile, 'r');
            try {
              // The last write to a sector wins, so check the writes' bytes in order of writing.
              const expected = new Map<number, Buffer>();
              for (const { sector, data } of writes) {
                for (let s = 0; s * sectorSize < data.length; s++) {
                  expected.set(sector + s, Buffer.from(data.subarray(s * sectorSize, (s + 1) * sectorSize)));
                }
              }
              for (const [sector, bytes] of expected) {
                const extent = result.extents.find((e) => e.offset <= sector * sectorSize && sector * sectorSize < e.offset + e.length);
                expect(extent).toBeDefined();
                const got = Buffer.alloc(bytes.length);
                fs.readSync(cow, got, 0, bytes.length, extent!.cowOffset + sector * sectorSize - extent!.offset);
                expect(got.equals(bytes)).toBe(true);
              }
            } finally {
              fs.closeSync(cow);
            }
          } finally {
            fs.rmSync(dir, { recursive: true, force: true });
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it('needs no backing file, and refuses a raw image', async () => {
    const backingFile = path.join(tmp.path, 'gone.img');
    fs.writeFileSync(backingFile, randomBytes(32 * 512));
    const cowFile = path.join(tmp.path, 'orphan.cow');
    await createCow(cowFile, backingFile);
    await writeCowSectors(cowFile, [{ sector: 5, data: randomBytes(1024) }]);
    const { dataOffset } = computeGeometry(parseHeader(fs.readFileSync(cowFile)).header);
    fs.rmSync(backingFile);
    expect(await mapCow(cowFile)).toEqual({
      file: cowFile,
      size: 32 * 512,
      allocatedBytes: 1024,
      extents: [{ offset: 2560, length: 1024, cowOffset: dataOffset + 2560 }],
    });
    const raw = path.join(tmp.path, 'raw.img');
    fs.writeFileSync(raw, randomBytes(512));
    await expect(mapCow(raw)).rejects.toThrow(/raw\.img: is not a UML COW file \(no COW magic\); a raw image has no map/);
  });
});

describe('ubdcow map (CLI)', () => {
  const tmp = useTempDir();
  const cli = ensureBuiltCli();

  async function fixture() {
    const backingFile = path.join(tmp.path, 'base.img');
    fs.writeFileSync(backingFile, randomBytes(256 * 512));
    const cowFile = path.join(tmp.path, 'vm.cow');
    await createCow(cowFile, backingFile);
    await writeCowSectors(cowFile, [
      { sector: 0, data: randomBytes(8 * 512) },
      { sector: 128, data: randomBytes(512) },
    ]);
    return cowFile;
  }

  it('prints a qemu-img style table: Offset, Length, Mapped to, File (hex)', async () => {
    const cowFile = await fixture();
    const result = run('node', [cli, 'map', cowFile]);
    expect(result.status).toBe(0);
    // The data area of a 128 KiB disk starts at 12288 (0x3000): header 4 KiB, bitmap 4 KiB aligned.
    expect(result.stdout).toBe(
      [
        `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`,
        `${'0'.padEnd(16)}${'0x1000'.padEnd(16)}${'0x3000'.padEnd(16)}${cowFile}`,
        `${'0x10000'.padEnd(16)}${'0x200'.padEnd(16)}${'0x13000'.padEnd(16)}${cowFile}`,
        '',
      ].join('\n'),
    );
  });

  it('prints one JSON object with --json', async () => {
    const cowFile = await fixture();
    const result = run('node', [cli, 'map', cowFile, '--json']);
    expect(result.status).toBe(0);
    expect(JSON.parse(result.stdout)).toEqual({
      file: cowFile,
      size: 256 * 512,
      allocatedBytes: 9 * 512,
      extents: [
        { offset: 0, length: 4096, cowOffset: 0x3000 },
        { offset: 0x10000, length: 512, cowOffset: 0x13000 },
      ],
    });
  });

  it('fails with one line for a file that is not a COW', async () => {
    const raw = path.join(tmp.path, 'raw.img');
    fs.writeFileSync(raw, Buffer.alloc(4096));
    const result = run('node', [cli, 'map', raw]);
    expect(result.status).toBe(1);
    expect(result.stderr).toBe(`ubdcow map: ${raw}: is not a UML COW file (no COW magic); a raw image has no map\n`);
  });
});
