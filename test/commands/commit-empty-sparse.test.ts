import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { commitCow } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { nonZeroRuns } from '../../src/io/bitmap/bitmap-clear.js';
import { openCow } from '../../src/io/engine/engine.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * Issue 15 item 5: emptying a COW after an in-place commit rewrote its whole bitmap with zeros,
 * so a 1 TiB COW holding one sector grew from 16 KiB to 256 MiB on disk. It must stay small.
 */
describe('in-place commit keeps an emptied COW sparse', () => {
  const tmp = useTempDir();

  it('a 1 TiB COW with one sector stays under 1 MiB on disk after commit, and is empty', async () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, '');
    fs.truncateSync(base, 2 ** 40);
    const cow = path.join(tmp.path, 'big.cow');
    await createCow(cow, base);
    const dev = await openCow(cow);
    // A sector in the middle, so its bitmap byte sits deep inside the 256 MiB bitmap.
    await dev.write(2 ** 39, Buffer.from('one sector'));
    await dev.close();
    expect(fs.statSync(cow).blocks * 512).toBeLessThan(1 << 20);

    const result = await commitCow(cow);
    expect(result.emptied).toBe(true);
    const usage = fs.statSync(cow).blocks * 512;
    expect(usage).toBeLessThan(1 << 20);
    const report = await inspectCow(cow);
    expect(report.allocated.sectors).toBe(0);
    expect(report.backing.state).toBe('ok');
    const fd = fs.openSync(base, 'r');
    const got = Buffer.alloc(10);
    fs.readSync(fd, got, 0, 10, 2 ** 39);
    fs.closeSync(fd);
    expect(got.toString()).toBe('one sector');
  });

  it('finds every non-zero byte, joining only short gaps', () => {
    const bytes = new Uint8Array(3 * 4096 + 100);
    bytes[5] = 1;
    bytes[300] = 0x80; // 294 zero bytes after 5: joined
    bytes[5000] = 2; // far: its own run
    bytes[12_300] = 4;
    expect(nonZeroRuns(bytes)).toEqual([
      { start: 5, end: 301 },
      { start: 5000, end: 5001 },
      { start: 12_300, end: 12_301 },
    ]);
    expect(nonZeroRuns(new Uint8Array(10_000))).toEqual([]);
  });
});
