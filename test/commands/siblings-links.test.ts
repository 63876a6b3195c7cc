import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkCow } from '../../src/commands/check.js';
import { commitCow } from '../../src/commands/commit/index.js';
import { createCow } from '../../src/commands/create.js';
import { UbdcowError } from '../../src/errors.js';
import { serializeV3 } from '../../src/format/header.js';
import { computeGeometry } from '../../src/format/geometry.js';
import { openCow } from '../../src/io/engine/engine.js';
import { useTempDir } from '../helpers/tmp.js';

/*
 * Issue 15 item 1: the shared-base guard must find other COWs over the same base file however
 * they or we name it (symlink, hard link, symlinked folder), as the kernel does: by (dev, ino).
 * Every refusal is checked to leave the base and the sibling exactly as they were.
 */

const BASE_BYTES = 256 * 1024;

async function writeByte(cowPath: string, offset: number, value: number): Promise<void> {
  const dev = await openCow(cowPath);
  try {
    await dev.write(offset, Uint8Array.of(value));
  } finally {
    await dev.close();
  }
}

/** A V3 COW whose header names `backingFile` exactly as given (what a kernel-made COW may hold). */
function writeCowNaming(cowPath: string, backingFile: string): void {
  const stat = fs.statSync(backingFile);
  const fields = { backingFile, mtime: Math.floor(stat.mtimeMs / 1000), size: stat.size, sectorSize: 512, alignment: 4096 };
  const header = serializeV3(fields);
  const geometry = computeGeometry({ ...fields, version: 3, layout: 'v3', littleEndian: false, cowFormat: 0 });
  fs.writeFileSync(cowPath, header);
  fs.truncateSync(cowPath, geometry.fileLength);
}

function fingerprint(...files: string[]): string[] {
  return files.map((file) => `${file} ${fs.statSync(file).mtimeMs} ${fs.readFileSync(file).toString('base64')}`);
}

async function expectRefused(cowPath: string, sibling: string, untouched: string[]): Promise<void> {
  const before = fingerprint(...untouched);
  const error = await commitCow(cowPath).catch((err: unknown) => err);
  expect(error).toBeInstanceOf(UbdcowError);
  expect((error as UbdcowError).code).toBe('shared-backing');
  expect((error as Error).message).toContain(path.basename(sibling));
  expect(fingerprint(...untouched)).toEqual(before);
}

describe('shared-base guard across links', () => {
  const tmp = useTempDir();

  function layout() {
    const root = tmp.path;
    const real = path.join(root, 'realdir');
    const vms = path.join(root, 'vms');
    fs.mkdirSync(real);
    fs.mkdirSync(vms);
    const base = path.join(real, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(BASE_BYTES, 0));
    fs.utimesSync(base, 1_600_000_000, 1_600_000_000);
    return { root, real, vms, base };
  }

  it('finds a sibling over the real file when we reach the base through a symlink (the issue repro)', async () => {
    const { real, vms, base } = layout();
    fs.symlinkSync('../realdir/base.img', path.join(vms, 'link.img'));
    const sibling = path.join(real, 'sib.cow');
    await createCow(sibling, base);
    const ours = path.join(vms, 'b.cow');
    await createCow(ours, path.join(vms, 'link.img'));
    await writeByte(ours, 0, 0x42);
    await expectRefused(ours, sibling, [base, sibling, ours]);
    // The other VM's disk is what it was: first byte 00, and check still sees a sound pair.
    expect(fs.readFileSync(base)[0]).toBe(0);
    expect((await checkCow(sibling)).clean).toBe(true);
  });

  it('finds a sibling over a hard link to the base in the same folder', async () => {
    const { real, base } = layout();
    const hard = path.join(real, 'hard.img');
    fs.linkSync(base, hard);
    const sibling = path.join(real, 'sib.cow');
    await createCow(sibling, hard);
    const ours = path.join(real, 'b.cow');
    await createCow(ours, base);
    await writeByte(ours, 0, 0x42);
    await expectRefused(ours, sibling, [base, sibling, ours]);
  });

  it('finds a sibling whose own backing path goes through a symlinked folder', async () => {
    const { root, real, vms, base } = layout();
    fs.symlinkSync('realdir', path.join(root, 'alias'));
    fs.symlinkSync('../realdir/base.img', path.join(vms, 'link.img'));
    const sibling = path.join(real, 'sib.cow');
    writeCowNaming(sibling, path.join(root, 'alias', 'base.img'));
    const ours = path.join(vms, 'b.cow');
    await createCow(ours, path.join(vms, 'link.img'));
    await writeByte(ours, 0, 0x42);
    await expectRefused(ours, sibling, [base, sibling, ours]);
  });

  it('does not take another name of the COW itself (a hard link to it) for a sibling', async () => {
    const { real, base } = layout();
    const ours = path.join(real, 'b.cow');
    await createCow(ours, base);
    fs.linkSync(ours, path.join(real, 'b-again.cow'));
    await writeByte(ours, 0, 0x42);
    const result = await commitCow(ours);
    expect(result.warnings).toEqual([]);
    expect(fs.readFileSync(base)[0]).toBe(0x42);
  });

  it('lists a sibling seen through two names of one folder once', async () => {
    const { root, real, base } = layout();
    fs.symlinkSync('realdir', path.join(root, 'alias'));
    const sibling = path.join(real, 'sib.cow');
    await createCow(sibling, base);
    const ours = path.join(real, 'b.cow');
    await createCow(ours, base);
    await writeByte(ours, 0, 0x42);
    const result = await commitCow(ours, { force: true, checkSiblings: [path.join(root, 'alias')] });
    expect(result.warnings).toHaveLength(1);
    expect(result.warnings[0]).toContain('1 other COW file (');
  });
});
