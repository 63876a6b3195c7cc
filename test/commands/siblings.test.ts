import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { commitCow } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { findSiblingCows } from '../../src/commands/commit/siblings.js';
import { openCow } from '../../src/io/engine/engine.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import { UbdcowError } from '../../src/errors.js';

describe('in-place commit into a backing file other COWs use', () => {
  let dir: string;
  let base: string;
  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ubdcow-siblings-'));
    base = path.join(dir, 'base.img');
    await fsp.writeFile(base, Buffer.alloc(256 * 1024, 0x11));
    await createCow(path.join(dir, 'vm1.cow'), base);
    const dev = await openCow(path.join(dir, 'vm1.cow'));
    await dev.write(0, Buffer.from('changed by vm1'));
    await dev.close();
  });
  afterEach(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  async function snapshot(): Promise<string[]> {
    const names = (await fsp.readdir(dir, { recursive: true })).sort();
    return Promise.all(
      names.map(async (name) => {
        const full = path.join(dir, String(name));
        const stat = await fsp.stat(full);
        return stat.isFile() ? `${name} ${stat.mtimeMs} ${(await fsp.readFile(full)).toString('base64')}` : `${name}/`;
      }),
    );
  }

  it('is refused when a sibling COW sits in the same folder, and nothing changes', async () => {
    await createCow(path.join(dir, 'vm2.cow'), base);
    const before = await snapshot();
    const error = await commitCow(path.join(dir, 'vm1.cow')).catch((err: unknown) => err);
    expect(error).toBeInstanceOf(UbdcowError);
    expect((error as UbdcowError).code).toBe('shared-backing');
    expect((error as Error).message).toContain('vm2.cow');
    expect((error as Error).message).toContain('--force');
    expect(await snapshot()).toEqual(before);
  });

  it('finds siblings in a folder given with checkSiblings, and ignores files that are not COWs', async () => {
    const elsewhere = path.join(dir, 'elsewhere');
    await fsp.mkdir(elsewhere);
    await fsp.writeFile(path.join(elsewhere, 'notes.txt'), 'not a cow');
    await createCow(path.join(elsewhere, 'vm3.cow'), base);
    const otherBase = path.join(dir, 'other-base.img');
    await fsp.writeFile(otherBase, Buffer.alloc(4096));
    await createCow(path.join(elsewhere, 'unrelated.cow'), otherBase);
    expect(await findSiblingCows(nodeFileSystem, path.join(dir, 'vm1.cow'), base, [dir])).toEqual({ siblings: [], unreadable: [] });
    expect(await findSiblingCows(nodeFileSystem, path.join(dir, 'vm1.cow'), base, [dir, elsewhere])).toEqual({ siblings: [path.join(elsewhere, 'vm3.cow')], unreadable: [] });
    await expect(commitCow(path.join(dir, 'vm1.cow'), { checkSiblings: [elsewhere] })).rejects.toThrow(/vm3\.cow/);
  });

  it('goes ahead with force, warning about each sibling', async () => {
    await createCow(path.join(dir, 'vm2.cow'), base);
    const result = await commitCow(path.join(dir, 'vm1.cow'), { force: true });
    expect(result.warnings.join('\n')).toMatch(/vm2\.cow.*silently corrupts/);
    expect((await fsp.readFile(base)).subarray(0, 14).toString()).toBe('changed by vm1');
  });

  it('commits without a word when no other COW uses the backing file', async () => {
    const result = await commitCow(path.join(dir, 'vm1.cow'));
    expect(result.warnings).toEqual([]);
    expect(result.emptied).toBe(true);
  });

  it('refuses when a folder it was asked to search cannot be read, instead of assuming no siblings', async () => {
    const error = await commitCow(path.join(dir, 'vm1.cow'), { checkSiblings: [path.join(dir, 'no-such-folder')] }).catch((err: unknown) => err);
    expect((error as UbdcowError).code).toBe('shared-backing');
    expect((error as Error).message).toMatch(/could not tell.*no-such-folder/);
  });
});
