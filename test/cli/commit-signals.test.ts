import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { openCow } from '../../src/io/engine.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, titleWithSkipReason } from '../helpers/tools.js';

/*
 * Issue 15 item 4: SIGINT or SIGTERM while `commit COW OUT` builds OUT removes the hidden
 * temporary `.OUT.ubdcow-PID-*.tmp`, leaves no OUT, and the process ends by that signal (shell
 * status 130 / 143). The disk is a 4 TiB sparse file, so the merge (a million 4 MiB windows, each
 * asked for its data with SEEK_DATA) takes seconds: the signal is sent 100 ms after the temporary
 * appears, well inside the copy. The same for `convert`: its partial image and the folder of its
 * private NBD socket go.
 */

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

async function waitFor<T>(probe: () => T | undefined, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Runs `ubdcow ARGS`, waits until `started` finds what the command is building, checks
 * `whileRunning`, lets it work `settleMs` more, then sends `signal`. Checks that the process ended
 * by that signal (or exited 128 + its number, as a shell reports it) without a stack trace, and
 * returns what `started` found.
 */
async function interruptMidway(
  args: string[],
  signal: 'SIGINT' | 'SIGTERM',
  started: () => string | undefined,
  options: { settleMs: number; env?: NodeJS.ProcessEnv; whileRunning?: () => void },
): Promise<string> {
  const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (code, sig) => resolve({ code, signal: sig })),
  );
  const found = await waitFor(started, 20_000);
  options.whileRunning?.();
  await new Promise((resolve) => setTimeout(resolve, options.settleMs));
  expect(child.exitCode).toBeNull();
  child.kill(signal);
  const { code, signal: endedBy } = await exited;
  const number = signal === 'SIGINT' ? 2 : 15;
  expect(endedBy === signal || code === 128 + number, `code ${code} signal ${endedBy}`).toBe(true);
  expect(stderr).not.toMatch(/^\s+at /m);
  return found;
}

describe('signals during commit to a new file', () => {
  const tmp = useTempDir();

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    it(`${signal} mid-copy removes the temporary file and leaves no OUT`, async () => {
      const base = path.join(tmp.path, 'base.img');
      fs.writeFileSync(base, '');
      fs.truncateSync(base, 4 * 2 ** 40);
      const cow = path.join(tmp.path, 'vm.cow');
      await createCow(cow, base);
      const dev = await openCow(cow);
      await dev.write(3 * 2 ** 40, Buffer.from('late in the disk'));
      await dev.close();
      const out = path.join(tmp.path, 'out.img');

      // Let it get into the copy, then interrupt.
      const temporary = await interruptMidway(['commit', cow, out], signal, () => fs.readdirSync(tmp.path).find((name) => /^\.out\.img\.ubdcow-\d+-[a-z0-9]+\.tmp$/.test(name)), {
        settleMs: 100,
      });
      expect(fs.existsSync(path.join(tmp.path, temporary))).toBe(false);
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'vm.cow']);
      expect(fs.existsSync(out)).toBe(false);
    });
  }
});

describe.skipIf(missingTools('qemu-img').length > 0)(titleWithSkipReason('signals during convert', missingTools('qemu-img')), () => {
  const tmp = useTempDir();

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    it(`${signal} mid-convert removes the partial image and the socket's folder, and leaves no OUT`, async () => {
      const base = path.join(tmp.path, 'base.img');
      fs.writeFileSync(base, '');
      // qemu-img reads every byte the export serves (its holes are not zeros): 64 GiB takes many seconds.
      fs.truncateSync(base, 64 * 2 ** 30);
      const cow = path.join(tmp.path, 'vm.cow');
      await createCow(cow, base);
      const scratch = path.join(tmp.path, 'scratch');
      fs.mkdirSync(scratch);
      const out = path.join(tmp.path, 'out.qcow2');

      await interruptMidway(['convert', cow, out, '-O', 'qcow2'], signal, () => fs.readdirSync(tmp.path).find((name) => /^\.out\.qcow2\.ubdcow-partial-\d+$/.test(name)), {
        settleMs: 200,
        env: { ...process.env, TMPDIR: scratch },
        whileRunning: () => expect(fs.readdirSync(scratch)).toHaveLength(1),
      });
      expect(fs.readdirSync(scratch)).toEqual([]);
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'scratch', 'vm.cow']);
    });
  }
});
