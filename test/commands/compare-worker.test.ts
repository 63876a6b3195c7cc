import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { RemoteCompare } from '../../src/commands/compare-worker.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import type { OpenedFile } from '../../src/io/image/backing.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * The worker half of `rebase --rewrite`'s compare: its answers name exactly the pages that differ,
 * and when it cannot read (here: a descriptor of a folder) it says it failed, so `take` answers
 * undefined and the main thread compares those windows itself instead of waiting forever or
 * taking a missing answer for "no difference".
 */
describe('RemoteCompare', () => {
  const tmp = useTempDir();
  const MiB = 1 << 20;
  const job = { from: 0, size: MiB, windowBytes: 256 * 1024, chunkBytes: 64 * 1024, pageBytes: 4096 };

  async function opened(file: string): Promise<OpenedFile> {
    const handle = await nodeFileSystem.open(file, 'r');
    const stat = await handle.stat();
    return { path: file, handle, size: stat.size, mtime: stat.mtime };
  }

  it('answers every window with the pages where the old base differs from the new one', async () => {
    const fresh = path.join(tmp.path, 'fresh.img');
    const old = path.join(tmp.path, 'old.img');
    fs.writeFileSync(fresh, Buffer.alloc(MiB, 0x11));
    const changed = Buffer.alloc(MiB, 0x11);
    changed.fill(0x22, 69632, 69632 + 10); // page 17, in the first window
    changed.fill(0x33, 700 * 1024, 700 * 1024 + 4096); // one whole page in the third window
    fs.writeFileSync(old, changed);
    const files = [await opened(fresh), await opened(old)];
    const remote = await RemoteCompare.start({ ...job, fresh: files[0]!, olds: [files[1]!] });
    try {
      const differs: number[] = [];
      for (let start = 0; start < MiB; start += job.windowBytes) {
        const answer = await remote.take(start);
        expect(answer, `window at ${start}`).toBeDefined();
        differs.push(...answer!.differs[0]!.map((offset) => start + offset));
        for (const chunk of answer!.chunks) expect(Buffer.from(chunk.old[0]!).equals(changed.subarray(start + chunk.at, start + chunk.at + chunk.old[0]!.length))).toBe(true);
      }
      expect(differs).toEqual([69632, 700 * 1024]);
    } finally {
      await remote.stop();
      for (const file of files) await file.handle.close();
    }
  });

  it('a worker that cannot read says so: take answers undefined for every window, at once', async () => {
    const fresh = path.join(tmp.path, 'fresh.img');
    fs.writeFileSync(fresh, Buffer.alloc(MiB, 0x11));
    const folder = path.join(tmp.path, 'a-folder');
    fs.mkdirSync(folder);
    const files = [await opened(fresh), { ...(await opened(folder)), size: MiB }];
    const remote = await RemoteCompare.start({ ...job, fresh: files[0]!, olds: [files[1]!] });
    try {
      for (let start = 0; start < MiB; start += job.windowBytes) expect(await remote.take(start)).toBeUndefined();
    } finally {
      await remote.stop();
      for (const file of files) await file.handle.close();
    }
  });
});
