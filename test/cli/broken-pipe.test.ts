import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine/engine.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, runOk, titleWithSkipReason } from '../helpers/tools.js';

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

/** What the CLI prints on stdout, as bytes (the check that a command works when someone reads). */
function cliBytes(args: string[]): Buffer {
  return execFileSync(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
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

/*
 * The commands merged after item 3 was fixed print too: ls, get (streamed like cat), diff --files
 * (exit 1: changed), convert and import (a line after qemu-img is done), serve (a "listening"
 * line, after which it keeps serving). The listener main() installs covers them all; these tests
 * fail with an unhandled `write EPIPE` when it is not installed.
 */
const missingExt = missingTools('mke2fs', 'debugfs');
describe.skipIf(missingExt.length > 0)(titleWithSkipReason('EPIPE on stdout: ls, get, diff --files over an ext4 guest', missingExt), () => {
  const tmp = useTempDir();

  /** An ext4 base, and a COW over it holding the sectors debugfs changed on a copy (written through the engine). */
  async function guestCow(): Promise<{ cow: string; big: Buffer }> {
    const tree = path.join(tmp.path, 'tree');
    fs.mkdirSync(tree);
    fs.writeFileSync(path.join(tree, 'hello.txt'), 'hello\n');
    const big = Buffer.alloc(600_000); // more than a pipe holds
    for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
    fs.writeFileSync(path.join(tree, 'big.bin'), big);
    const base = path.join(tmp.path, 'base.img');
    runOk('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', tree, base, '8M']);
    const changed = path.join(tmp.path, 'changed.img');
    fs.copyFileSync(base, changed);
    const host = path.join(tmp.path, 'new.txt');
    fs.writeFileSync(host, 'a new file\n');
    runOk('debugfs', ['-w', '-R', `write ${host} /new.txt`, changed]);
    const cow = path.join(tmp.path, 'vm.cow');
    await createCow(cow, base);
    const a = fs.readFileSync(base);
    const b = fs.readFileSync(changed);
    const dev = await openCow(cow);
    try {
      for (let at = 0; at < a.length; at += 512) {
        if (a.compare(b, at, at + 512, at, at + 512) !== 0) await dev.write(at, b.subarray(at, at + 512));
      }
    } finally {
      await dev.close();
    }
    return { cow, big };
  }

  it('ls, ls -l -R --json, get to stdout (a file larger than a pipe), diff --files and --json (exit 1: changed)', async () => {
    const { cow, big } = await guestCow();
    // The guest really is readable (so the quiet runs below are not quiet failures).
    expect(runOk(process.execPath, [cli, 'ls', cow]).split('\n')).toContain('new.txt');
    expect(Buffer.compare(cliBytes(['get', cow, '/big.bin']), big)).toBe(0);
    expectQuiet(await runWithClosedStdout(['ls', cow]), 0);
    expectQuiet(await runWithClosedStdout(['ls', '-l', '-R', '--json', cow]), 0);
    expectQuiet(await runWithClosedStdout(['get', cow, '/big.bin']), 0);
    expectQuiet(await runWithClosedStdout(['get', cow, '/hello.txt']), 0);
    expectQuiet(await runWithClosedStdout(['diff', '--files', cow]), 1);
    expectQuiet(await runWithClosedStdout(['diff', '--files', '--json', cow]), 1);
  });
});

const missingQemuImg = missingTools('qemu-img');
describe.skipIf(missingQemuImg.length > 0)(titleWithSkipReason('EPIPE on stdout: convert and import finish their file', missingQemuImg), () => {
  const tmp = useTempDir();

  it('convert (text, --json, -p) and import (text, --json): exit 0, the output complete', async () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(1 << 20, 0x5a));
    const cow = path.join(tmp.path, 'vm.cow');
    await createCow(cow, base);
    const dev = await openCow(cow);
    await dev.write(4096, Buffer.from('changed'));
    await dev.close();
    const expected = fs.readFileSync(base);
    expected.write('changed', 4096, 'latin1');

    const raw = path.join(tmp.path, 'out.raw');
    expectQuiet(await runWithClosedStdout(['convert', cow, raw, '-O', 'raw']), 0);
    expect(Buffer.compare(fs.readFileSync(raw), expected)).toBe(0);
    const qcow2 = path.join(tmp.path, 'out.qcow2');
    expectQuiet(await runWithClosedStdout(['convert', '--json', cow, qcow2, '-O', 'qcow2']), 0);
    const progress = path.join(tmp.path, 'progress.qcow2');
    expectQuiet(await runWithClosedStdout(['convert', '-p', cow, progress, '-O', 'qcow2']), 0);
    for (const image of [qcow2, progress]) expect(runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, raw])).toContain('identical');

    const imported = path.join(tmp.path, 'imported.cow');
    expectQuiet(await runWithClosedStdout(['import', qcow2, imported, base]), 0);
    const importedJson = path.join(tmp.path, 'imported-json.cow');
    expectQuiet(await runWithClosedStdout(['import', '--json', qcow2, importedJson, base]), 0);
    for (const file of [imported, importedJson]) {
      expect(cliBytes(['cat', file]).equals(expected)).toBe(true);
    }
  });
});

const missingNbdinfo = missingTools('nbdinfo');
describe.skipIf(missingNbdinfo.length > 0)(titleWithSkipReason('EPIPE on stdout: serve keeps serving after its "listening" line found no reader', missingNbdinfo), () => {
  const tmp = useTempDir();

  for (const json of [false, true]) {
    it(`serve${json ? ' --json' : ''}: answers a client, then SIGTERM ends it with status 0 and nothing on stderr`, async () => {
      const base = path.join(tmp.path, 'base.img');
      fs.writeFileSync(base, Buffer.alloc(1 << 20, 0x5a));
      const cow = path.join(tmp.path, 'vm.cow');
      await createCow(cow, base);
      const socket = path.join(tmp.path, 'nbd.sock');
      const pidFile = path.join(tmp.path, 'serve.pid');
      const child = spawn(process.execPath, [cli, 'serve', cow, '--socket', socket, '--pid-file', pidFile, ...(json ? ['--json'] : [])], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      child.stdout.destroy();
      let stderr = '';
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (chunk: string) => (stderr += chunk));
      const closed = new Promise<{ status: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (status, signal) => resolve({ status, signal })));
      try {
        // The pid file is written once listening, just before the line that finds no reader.
        for (let i = 0; i < 200 && !fs.existsSync(pidFile); i++) await new Promise((resolve) => setTimeout(resolve, 50));
        expect(fs.existsSync(pidFile), stderr).toBe(true);
        await new Promise((resolve) => setTimeout(resolve, 200)); // let the EPIPE arrive
        for (let i = 0; i < 2; i++) expect(runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`]).trim()).toBe(String(1 << 20));
      } finally {
        child.kill('SIGTERM');
      }
      const result = await closed;
      expectQuiet({ ...result, stderr }, 0);
    });
  }
});
