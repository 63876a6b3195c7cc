import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { buildCow } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * Issue 15 item 2: a COW file cut short part-way into its last allocated sector has lost that
 * sector (cat and commit refuse it); check must say so, not "no allocated sector lies past the end".
 */
describe('check on a file cut inside the last allocated sector', () => {
  const tmp = useTempDir();
  // 8 MiB disk, sectors 0-2047 allocated: the last allocated sector's data starts at 12288 + 2047 * 512.
  const size = 8 << 20;

  for (const into of [0, 1, 100, 511]) {
    it(`counts the sector as lost when the file ends ${into} bytes into it`, async () => {
      const built = buildCow(tmp.path, { size, extents: [{ start: 0, end: 2048 }], cowName: `cut-${into}.cow` });
      const lastSectorStart = built.geometry.dataOffset + 2047 * 512;
      expect(lastSectorStart).toBe(12288 + 2047 * 512);
      fs.truncateSync(built.cowPath, lastSectorStart + into);
      const result = await checkCow(built.cowPath);
      expect(result.clean).toBe(false);
      const truncated = result.problems.find((problem) => problem.code === 'truncated');
      expect(truncated?.message).toContain('1 allocated sectors lie past the end and their data is lost');
      expect(truncated?.message).not.toContain('no allocated sector');
    });
  }

  it('still says no sector is lost when the cut falls after the last allocated sector', async () => {
    const built = buildCow(tmp.path, { size, extents: [{ start: 0, end: 2048 }], cowName: 'after.cow' });
    fs.truncateSync(built.cowPath, built.geometry.dataOffset + 2048 * 512 + 1);
    const result = await checkCow(built.cowPath);
    expect(result.problems.find((problem) => problem.code === 'truncated')?.message).toContain('no allocated sector lies past the end');
  });
});
