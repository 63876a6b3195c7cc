import { createHash } from 'node:crypto';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openCow } from '../io/engine/index.js';
import { type FileSystem, nodeFileSystem, readWholeFile } from '../io/file/index.js';
import { createCow } from './create.js';
import { inspectCow } from './inspect.js';
import { diffImages } from './diff.js';
import { commitCow } from './commit/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface DemoStep {
  title: string;
  detail: string;
  ok: boolean;
}

export interface DemoOptions {
  /** Keep the temporary folder and its files (a folder the caller names is always kept). */
  keep?: boolean;
}

export interface DemoResult {
  backing: string;
  folder: string;
  /** Whether `folder` still exists: asked for, named by the caller, or kept because a step failed. */
  kept: boolean;
  steps: DemoStep[];
  ok: boolean;
}

/** The small image bundled with the package. */
export function bundledImage(): string {
  return fileURLToPath(new URL('../../fixtures/base.img', import.meta.url));
}

async function sha256(fs: FileSystem, file: string): Promise<string> {
  return createHash('sha256').update(await readWholeFile(fs, file)).digest('hex');
}

const runDemoOptionKeys: OptionKeys<DemoOptions> = { keep: true };

/**
 * The whole workflow on the bundled image, in a new temporary folder: create a COW, write through
 * the engine, read back, inspect, diff, commit to a new image, and check that the backing file
 * was never touched.
 */
export async function runDemo(backing = bundledImage(), folder?: string, options: DemoOptions = {}): Promise<DemoResult> {
  checkOptions('runDemo', options, runDemoOptionKeys);
  const fs = nodeFileSystem;
  const dir = folder ?? (await fs.makeTempFolder(path.join(os.tmpdir(), 'ubdcow-demo-')));
  let result: DemoResult | undefined;
  try {
    result = await demoSteps(fs, backing, dir);
    // A failed step's files are kept, so what went wrong can be looked at.
    result.kept = folder !== undefined || options.keep === true || !result.ok;
    return result;
  } finally {
    if (folder === undefined && !result?.kept) await fs.removeTree(dir);
  }
}

async function demoSteps(fs: FileSystem, backing: string, dir: string): Promise<DemoResult> {
  const cow = path.join(dir, 'demo.cow');
  const merged = path.join(dir, 'merged.img');
  const steps: DemoStep[] = [];
  const step = (title: string, detail: string, ok = true) => steps.push({ title, detail, ok });
  const backingHash = await sha256(fs, backing);

  const created = await createCow(cow, backing);
  step('create', `${cow}: ${created.header.size} bytes over ${created.header.backingFile}, data at offset ${created.geometry.dataOffset}`);

  const message = new TextEncoder().encode('Hello from ubdcow: this sentence lives only in the COW file.\n');
  const block = new Uint8Array(64 * 1024).map((_, i) => (i * 31 + 7) & 0xff);
  const messageOffset = 1 << 20;
  const dev = await openCow(cow);
  try {
    await Promise.all([dev.write(messageOffset + 100, message), dev.write(4096, block)]);
    await dev.flush();
    step('write', `${message.length} bytes at offset ${messageOffset + 100} (a partial sector: copy-up) and 64 KiB at 4096, through the engine`);
    const back = await dev.read(messageOffset + 100, message.length);
    const same = Buffer.from(back).equals(Buffer.from(message));
    step('read back', same ? `"${new TextDecoder().decode(back).trim()}"` : 'MISMATCH', same);
  } finally {
    await dev.close();
  }

  const report = await inspectCow(cow);
  step(
    'inspect',
    `${report.allocated.sectors} sectors allocated (${report.allocated.percent}% of the disk) in ${report.extents} extents; backing ${report.backing.state}`,
    report.backing.state === 'ok' && report.extents === 2,
  );

  const diff = await diffImages(cow);
  // A summary, not every range: random data differs from its backing in hundreds of short runs.
  const shownRanges = diff.ranges.slice(0, 3).map((r) => `${r.length} bytes at ${r.offset}`);
  const more = diff.ranges.length > shownRanges.length ? `, … (${diff.ranges.length - shownRanges.length} more)` : '';
  step('diff', `${diff.extents} ranges, ${diff.differingBytes} bytes, differ from the backing: ${shownRanges.join(', ')}${more}`, !diff.identical);

  const commit = await commitCow(cow, { output: merged });
  const mergedBytes = Buffer.from(await readWholeFile(fs, merged));
  const expected = Buffer.from(await readWholeFile(fs, backing));
  expected.set(block, 4096);
  expected.set(message, messageOffset + 100);
  const mergedOk = mergedBytes.equals(expected);
  step('commit', `${merged}: ${commit.size} bytes, ${commit.allocatedBytes} taken from the COW; contents ${mergedOk ? 'as expected' : 'WRONG'}`, mergedOk);

  const untouched = (await sha256(fs, backing)) === backingHash;
  step('backing untouched', untouched ? `${backing} has the same SHA-256 as before` : `${backing} CHANGED`, untouched);

  return { backing, folder: dir, kept: true, steps, ok: steps.every((s) => s.ok) };
}
