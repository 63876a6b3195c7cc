import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli } from '../helpers/tools.js';

/*
 * Issue 15 item 3: every command that prints ends quietly when its reader has gone (`| true`,
 * `| head -1`): no stack trace, no EPIPE message, the usual exit status, and the work done. The
 * CLI runs with stdout on a pipe whose read end is closed before the process starts writing.
 */

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

function runWithClosedStdout(args: string[], cwd?: string): Promise<{ status: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    // The only read end is ours: closing it now makes the child's first write to stdout fail with EPIPE.
    child.stdout.destroy();
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (status, signal) => resolve({ status, signal, stderr }));
  });
}

function expectQuiet(result: { status: number | null; signal: NodeJS.Signals | null; stderr: string }, status: number): void {
  expect(result.signal).toBeNull();
  expect(result.stderr).not.toMatch(/EPIPE|^\s+at |internal error|Error:/m);
  expect(result.stderr).toBe('');
  expect(result.status).toBe(status);
}

describe('EPIPE on stdout ends every printing command quietly', () => {
  const tmp = useTempDir();

  async function setUp() {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(1 << 20, 0x5a));
    const cow = path.join(tmp.path, 'vm.cow');
    await createCow(cow, base);
    const dev = await openCow(cow);
    await dev.write(4096, Buffer.from('changed'));
    await dev.write(100_000, Buffer.from('changed too'));
    await dev.close();
    return { base, cow };
  }

  it('inspect, inspect --json, map, map --json, diff (exit 1: different), cat, read, --help', async () => {
    const { cow } = await setUp();
    expectQuiet(await runWithClosedStdout(['inspect', cow]), 0);
    expectQuiet(await runWithClosedStdout(['inspect', '--json', cow]), 0);
    expectQuiet(await runWithClosedStdout(['map', cow]), 0);
    expectQuiet(await runWithClosedStdout(['map', '--json', cow]), 0);
    expectQuiet(await runWithClosedStdout(['diff', cow]), 1);
    expectQuiet(await runWithClosedStdout(['diff', '--json', cow]), 1);
    expectQuiet(await runWithClosedStdout(['cat', cow]), 0);
    expectQuiet(await runWithClosedStdout(['read', cow]), 0);
    expectQuiet(await runWithClosedStdout(['--help']), 0);
  });

  it('check: clean exits 0; with problems exits 1 (the answer stands)', async () => {
    const { cow } = await setUp();
    expectQuiet(await runWithClosedStdout(['check', cow]), 0);
    expectQuiet(await runWithClosedStdout(['check', '--json', cow]), 0);
    fs.truncateSync(cow, fs.statSync(cow).size - 1);
    expectQuiet(await runWithClosedStdout(['check', cow]), 1);
  });

  it('check --repair finishes the repair before the broken pipe matters', async () => {
    const base = path.join(tmp.path, 'odd.img');
    fs.writeFileSync(base, Buffer.alloc(1_000_000, 1)); // 1954 sectors: bits 1954-1959 are padding
    const cow = path.join(tmp.path, 'odd.cow');
    const { geometry } = await createCow(cow, base);
    const fd = fs.openSync(cow, 'r+');
    fs.writeSync(fd, Uint8Array.of(0b1100_0000), 0, 1, geometry.bitmapOffset + geometry.bitmapLength - 1);
    fs.closeSync(fd);
    expectQuiet(await runWithClosedStdout(['check', '--repair', cow]), 0);
    const byte = Buffer.alloc(1);
    const again = fs.openSync(cow, 'r');
    fs.readSync(again, byte, 0, 1, geometry.bitmapOffset + geometry.bitmapLength - 1);
    fs.closeSync(again);
    expect(byte[0]).toBe(0);
  });

  it('create, write, rebase, commit to a file and in place: the work is done, exit 0', async () => {
    const { base, cow } = await setUp();
    const second = path.join(tmp.path, 'second.cow');
    expectQuiet(await runWithClosedStdout(['create', second, base]), 0);
    expect(fs.existsSync(second)).toBe(true);
    expectQuiet(await runWithClosedStdout(['create', '--json', path.join(tmp.path, 'third.cow'), base]), 0);
    fs.rmSync(second);
    fs.rmSync(path.join(tmp.path, 'third.cow'));

    const data = path.join(tmp.path, 'data.bin');
    fs.writeFileSync(data, 'via write');
    expectQuiet(await runWithClosedStdout(['write', cow, '--offset', '8192', '--file', data]), 0);

    const moved = path.join(tmp.path, 'moved.img');
    fs.copyFileSync(base, moved);
    const stat = fs.statSync(base);
    fs.utimesSync(moved, stat.atime, stat.mtime);
    expectQuiet(await runWithClosedStdout(['rebase', cow, moved]), 0);
    expect(fs.readFileSync(cow).toString('latin1')).toContain(moved);

    const out = path.join(tmp.path, 'merged.img');
    expectQuiet(await runWithClosedStdout(['commit', cow, out]), 0);
    const merged = fs.readFileSync(out);
    expect(merged.subarray(8192, 8201).toString()).toBe('via write');
    expectQuiet(await runWithClosedStdout(['commit', cow]), 0);
    expect(fs.readFileSync(moved).subarray(8192, 8201).toString()).toBe('via write');
  });

  it('stderr on the same closed pipe (2>&1 | true): a warning or an error goes nowhere, quietly', async () => {
    const base = path.join(tmp.path, 'tiny.img');
    fs.writeFileSync(base, Buffer.alloc(64 * 512)); // 64 sectors: create and inspect warn on stderr
    const cow = path.join(tmp.path, 'tiny.cow');
    const both = (args: string[]) =>
      new Promise<{ status: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
        const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
        child.stdout.destroy();
        child.stderr.destroy();
        child.on('error', reject);
        child.on('close', (status, signal) => resolve({ status, signal }));
      });
    expect(await both(['create', cow, base])).toEqual({ status: 0, signal: null });
    expect(fs.existsSync(cow)).toBe(true);
    expect(await both(['inspect', cow])).toEqual({ status: 0, signal: null });
    // An error's one line has nowhere to go either; the status still says what happened.
    expect(await both(['inspect', path.join(tmp.path, 'missing.cow')])).toEqual({ status: 1, signal: null });
  });

  it('demo', async () => {
    expectQuiet(await runWithClosedStdout(['demo']), 0);
  });
});
