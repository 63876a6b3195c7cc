/**
 * The engine on disks whose bitmap would not fit in memory at once: a 15 TiB COW (a 3.75 GiB
 * sparse bitmap, past 2^32 sectors) and the 2^31-sector edge. The bitmap is loaded a slice at a
 * time, so these open in O(1) and round-trip writes anywhere; a cut-short bitmap names the file.
 */
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { UbdcowError } from '../../src/errors.js';
import { openCow } from '../../src/io/engine/engine.js';

const TIB = 1024 ** 4;

/** Whether the temp folder's file system takes a sparse file of `size` bytes (ext4 stops at 16 TiB). */
async function sparseFileFits(dir: string, size: number): Promise<boolean> {
  const probe = path.join(dir, 'probe');
  try {
    await fsp.truncate(await fsp.writeFile(probe, '').then(() => probe), size);
    return true;
  } catch {
    return false;
  } finally {
    await fsp.rm(probe, { force: true });
  }
}

let dir: string;
let fits = false;
beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-engine-large-'));
  fits = await sparseFileFits(dir, 15 * TIB + 2 ** 33);
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

describe('the engine on a 15 TiB COW (bitmap loaded on demand)', () => {
  it('writes and reads back at the 2^31-sector edge, past 2^32 sectors and at the last byte; reopened, the bits are there', async (context) => {
    if (!fits) context.skip('the temp folder cannot hold a 15 TiB sparse file (ext4 or XFS needed)');
    const base = path.join(dir, 'base.img');
    const cow = path.join(dir, 'big.cow');
    await fsp.writeFile(base, '');
    await fsp.truncate(base, 15 * TIB);
    await createCow(cow, base);
    const writes: Array<[number, Buffer]> = [
      [2 ** 31 * 512 - 3, Buffer.from('edge-of-2^31')],
      [2 ** 32 * 512 + 100, Buffer.from('past 2^32 sectors')],
      [15 * TIB - 4, Buffer.from('last')],
      [7, Buffer.from('first')],
    ];
    const dev = await openCow(cow, { maxBitmapCacheBytes: 64 * 1024 });
    await Promise.all(writes.map(([offset, data]) => dev.write(offset, data)));
    for (const [offset, data] of writes) expect(Buffer.from(await dev.read(offset, data.length)).toString()).toBe(data.toString());
    await dev.close();
    const again = await openCow(cow, { readOnly: true });
    for (const [offset, data] of writes) {
      // The backing's zero bytes on each side (none past the disk's end).
      const after = offset + data.length < again.size ? 1 : 0;
      const around = Buffer.from(await again.read(offset - 1, data.length + 1 + after));
      expect(around.subarray(1, 1 + data.length).toString()).toBe(data.toString());
      expect(around[0]).toBe(0);
      if (after) expect(around[around.length - 1]).toBe(0);
    }
    expect(again.isAllocated(2 ** 31 - 1)).toBe(true);
    expect(again.isAllocated(2 ** 32)).toBe(true);
    expect(again.isAllocated(2 ** 32 + 7)).toBe(true);
    expect(again.isAllocated(2 ** 32 + 8)).toBe(false);
    const runs = [];
    for await (const run of again.allocatedRuns()) runs.push(run);
    // Whole 4 KiB pages (allocationUnit), the last one ending with the disk.
    expect(runs).toEqual([
      { start: 0, end: 8 },
      { start: 2 ** 31 - 8, end: 2 ** 31 + 8 },
      { start: 2 ** 32, end: 2 ** 32 + 8 },
      { start: (15 * TIB) / 512 - 8, end: (15 * TIB) / 512 },
    ]);
    await again.close();
  });

  it('a bitmap cut short is refused with the file named, not ERR_OUT_OF_RANGE', async (context) => {
    if (!fits) context.skip('the temp folder cannot hold a 15 TiB sparse file (ext4 or XFS needed)');
    const base = path.join(dir, 'base2.img');
    const cow = path.join(dir, 'short.cow');
    await fsp.writeFile(base, '');
    await fsp.truncate(base, 15 * TIB);
    await createCow(cow, base);
    await fsp.truncate(cow, 2 * 1024 ** 3);
    const err = await openCow(cow, { readOnly: true }).then(
      async (dev) => {
        await dev.read(14 * TIB, 4).finally(() => dev.close());
        return undefined;
      },
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(UbdcowError);
    expect((err as Error).message).toContain(cow);
    expect((err as Error).message).not.toContain('ERR_OUT_OF_RANGE');
  });
});
