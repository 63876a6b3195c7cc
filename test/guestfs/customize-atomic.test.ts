/**
 * All or nothing: an operation failing late in a run (a missing path, a full guest file system)
 * leaves the COW byte-identical (hash and mtime); refused inputs (a COW a process holds, a file
 * system that needs recovery or has errors, features customize does not write, a raw image
 * without --in-place) change nothing; a journal left complete by a failure while applying is
 * replayed by the next run, an incomplete one discarded; --dry-run changes nothing.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { customize } from '../../src/commands/customize.js';
import { commitCow } from '../../src/commands/commit/index.js';
import { writeThroughEngine } from '../../src/commands/engine-io.js';
import { parseOperation } from '../../src/guestfs/customize-spec.js';
import { nodeFileSystem } from '../../src/io/file/node-fs.js';
import type { FileSystem } from '../../src/io/file/file.js';
import { UbdcowError } from '../../src/errors.js';
import { debugfsCat, runProgram } from '../uml/harness.js';
import { holdLockInChild, sha256 } from '../helpers/cow-fixtures.js';
import { wrapHandle } from '../helpers/wrap-handle.js';
import { missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { baseAndCow, flatten, fsConfigs, fsckClean, mkfs } from '../helpers/customize-fixtures.js';

const missing = missingTools('mke2fs', 'debugfs', 'e2fsck', 'python3');
const ext4 = fsConfigs[2]!;

function state(file: string): { hash: string; mtimeMs: number; size: number } {
  const stat = fs.statSync(file);
  return { hash: sha256(file), mtimeMs: stat.mtimeMs, size: stat.size };
}

const op = (name: string, value: string) => parseOperation(name, value);

async function failsWith(promise: Promise<unknown>, code: string, text?: RegExp): Promise<UbdcowError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'expected an error').toBeInstanceOf(UbdcowError);
  expect((err as UbdcowError).code, (err as Error).message).toBe(code);
  if (text) expect((err as Error).message).toMatch(text);
  expect((err as Error).message).not.toContain('\n');
  return err as UbdcowError;
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('customize: all or nothing', missing), () => {
  const tmp = useTempDir();

  it('an error in the 7th operation leaves the COW byte-identical (hash and mtime), no journal left', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    await customize(cow, [op('write', '/etc/first:1')]); // the COW already holds data: "before" is not empty
    const before = state(cow);
    const ops = [
      op('mkdir', '/a/b/c'),
      op('write', '/a/b/c/file:x'.repeat(1)),
      op('upload', `${path.join(tmp.path, 'tree', 'etc', 'passwd')}:/a/passwd`),
      op('delete', '/etc/many'),
      op('move', '/etc/old.conf:/a/b'),
      op('chmod', '0700:/a'),
      op('chmod', '0700:/does/not/exist'),
      op('write', '/never:x'),
    ];
    await failsWith(customize(cow, ops), 'guest-op-failed', /^operation 7 \(--chmod 0700:\/does\/not\/exist\): .*no such file.*nothing was changed$/);
    expect(state(cow)).toEqual(before);
    expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);
  });

  it('a guest file system that fills up fails the run and changes nothing', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4, '8M');
    const before = state(cow);
    const big = path.join(tmp.path, 'big.bin');
    fs.writeFileSync(big, Buffer.alloc(12 << 20, 1));
    await failsWith(customize(cow, [op('write', '/small:x'), op('upload', `${big}:/big.bin`)]), 'guest-op-failed', /operation 2 .*no space left in the guest file system \(ENOSPC\).*nothing was changed/);
    expect(state(cow)).toEqual(before);
  });

  it('refuses a COW another process holds (as a running UML does), changing nothing', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const before = state(cow);
    const holder = await holdLockInChild(cow);
    try {
      await failsWith(customize(cow, [op('write', '/x:y')]), 'locked');
    } finally {
      await holder.release();
    }
    expect(state(cow)).toEqual(before);
    expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);
  });

  it('refuses file systems that need recovery, have errors, were not unmounted, or use features it does not write', async () => {
    const cases: Array<[string, string[], RegExp, string]> = [
      ['needs-recovery', ['feature needs_recovery'], /journal needs recovery/, 'unclean-fs'],
      ['errors', ['ssv state 3'], /errors recorded/, 'unclean-fs'],
      ['not-clean', ['ssv state 0'], /not unmounted cleanly/, 'unclean-fs'],
      ['error-count', ['ssv error_count 2'], /errors recorded \(2/, 'unclean-fs'],
    ];
    for (const [name, commands, message, code] of cases) {
      const dir = path.join(tmp.path, name);
      fs.mkdirSync(dir);
      const { base, cow } = await baseAndCow(dir, ext4);
      for (const command of commands) expect((await runProgram('debugfs', ['-w', '-R', command, base])).status).toBe(0);
      // The base's mtime changed: a fresh COW over it.
      fs.rmSync(cow);
      await (await import('../../src/commands/create.js')).createCow(cow, base);
      const before = state(cow);
      await failsWith(customize(cow, [op('write', '/x:y')]), code, message);
      expect(state(cow), name).toEqual(before);
    }
    const quota = path.join(tmp.path, 'quota');
    fs.mkdirSync(quota);
    const raw = path.join(quota, 'q.img');
    await mkfs(path.join(tmp.path, 'needs-recovery', 'tree'), raw, { ...ext4, features: 'metadata_csum,64bit,quota' });
    await failsWith(customize(raw, [op('write', '/x:y')], { inPlace: true }), 'unsupported-fs', /uses quota, which ubdcow customize does not write/);
  });

  it('a raw image needs --in-place; with it the same run changes the image, e2fsck clean', async () => {
    const { base } = await baseAndCow(tmp.path, ext4);
    const before = state(base);
    await failsWith(customize(base, [op('write', '/x:y')]), 'not-a-cow', /--in-place/);
    expect(state(base)).toEqual(before);
    await customize(base, [op('write', '/x:raw'), op('hostname', 'rawhost')], { inPlace: true });
    await fsckClean(base);
    expect((await debugfsCat(base, '/x')).toString()).toBe('raw');
    expect((await debugfsCat(base, '/etc/hostname')).toString()).toBe('rawhost\n');
  });

  it('--dry-run reports the changes and changes nothing', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    const before = state(cow);
    const result = await customize(cow, [op('mkdir', '/srv/x'), op('write', '/srv/x/y:z'), op('delete', '/etc/gone.txt'), op('delete', '/no/such')], { dryRun: true });
    expect(result.dryRun).toBe(true);
    expect(result.steps.map((s) => s.paths)).toEqual([['/srv/x'], ['/srv/x/y'], ['/etc/gone.txt'], []]);
    expect(result.pagesChanged).toBeGreaterThan(0);
    expect(state(cow)).toEqual(before);
    expect(fs.readdirSync(tmp.path).filter((name) => name.includes('ubdcow'))).toEqual([]);
  });

  it('a failure while applying leaves a complete journal; the next run replays it, an incomplete one is discarded', async () => {
    const { cow } = await baseAndCow(tmp.path, ext4);
    // The COW's writes fail (EIO) once the journal is complete: the run stops half way through applying.
    let writes = 0;
    const failing: FileSystem = {
      ...nodeFileSystem,
      open: async (file, mode) => {
        const handle = await nodeFileSystem.open(file, mode);
        if (file !== cow) return handle;
        return wrapHandle(handle, {
          write: async (buffer, offset, length, position) => {
            if (++writes > 3) throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
            return handle.write(buffer, offset, length, position);
          },
        });
      },
    };
    const payload = Buffer.alloc(2 << 20, 7);
    const host = path.join(tmp.path, 'payload');
    fs.writeFileSync(host, payload);
    await failsWith(customize(cow, [op('upload', `${host}:/payload`), op('hostname', 'replayed')], { fs: failing }), 'EIO');
    expect(writes).toBeGreaterThan(3);
    expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(true);
    // Other writers refuse while the journal is there (commit to a new file, and in place).
    await failsWith(commitCow(cow, { output: path.join(tmp.path, 'merged.img') }), 'customize-interrupted', /run `ubdcow customize .*` \(no operations\)/);
    await failsWith(commitCow(cow), 'customize-interrupted');
    await failsWith(writeThroughEngine(cow, (async function* () { yield new Uint8Array(512); })(), { offset: 0 }), 'customize-interrupted');
    const recovered = await customize(cow, []);
    expect(recovered.recovery).toBe('replayed');
    expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);
    const flat = await flatten(cow, path.join(tmp.path, 'flat.img'));
    await fsckClean(flat);
    expect(Buffer.compare(await debugfsCat(flat, '/payload'), payload)).toBe(0);
    expect((await debugfsCat(flat, '/etc/hostname')).toString()).toBe('replayed\n');

    // An incomplete journal (its end cut off) is discarded and the COW left alone.
    const before = state(cow);
    fs.writeFileSync(`${cow}.ubdcow-customize`, Buffer.alloc(9000, 1));
    const discarded = await customize(cow, []);
    expect(discarded.recovery).toBe('discarded');
    expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);
    expect(state(cow)).toEqual(before);
  });
});
