import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import { missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { randomBytes, seededRandom } from '../io/engine-setup.js';

const missing = missingTools('uml_moo');

describe.skipIf(missing.length > 0)(titleWithSkipReason('a COW written through the engine, merged by the real uml_moo', missing), () => {
  let dir: string;
  beforeAll(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-engine-moo-'));
  });
  afterAll(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('uml_moo merges it to exactly the image the engine shows, before and after reopening', async () => {
    const random = seededRandom(42);
    const size = 3 * 1024 * 1024 + 1000; // a partial last sector
    const baseBytes = randomBytes(random, size);
    const base = path.join(dir, 'base.img');
    const cow = path.join(dir, 'disk.cow');
    await fsp.writeFile(base, baseBytes);
    await createCow(cow, base);
    const expected = Buffer.from(baseBytes);
    const dev = await openCow(cow);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 300; i++) {
      const length = 1 + Math.floor(random() * 20000);
      const offset = i % 50 === 0 ? size - length : Math.floor(random() * (size - length));
      const data = randomBytes(random, length);
      // Overlapping writes are applied in issue order by the engine.
      expected.set(data, offset);
      writes.push(dev.write(offset, data));
    }
    await Promise.all(writes);
    expect(Buffer.from(await dev.read(0, size)).equals(expected)).toBe(true);
    await dev.close();

    const reopened = await openCow(cow, { readOnly: true });
    expect(Buffer.from(await reopened.read(0, size)).equals(expected)).toBe(true);
    await reopened.close();

    const merged = path.join(dir, 'merged.img');
    const moo = run('uml_moo', [cow, merged]);
    expect(moo.status, moo.stderr).toBe(0);
    const mergedBytes = await fsp.readFile(merged);
    // uml_moo works in whole sectors and drops a partial last sector; everything else must match.
    const wholeSectors = Math.floor(size / 512) * 512;
    expect(mergedBytes.length).toBe(wholeSectors);
    expect(mergedBytes.equals(expected.subarray(0, wholeSectors))).toBe(true);
  });
});
