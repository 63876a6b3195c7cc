import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createCow } from '../../src/commands/create.js';
import { serveImage } from '../../src/commands/serve.js';
import { openCow } from '../../src/io/engine/engine.js';
import { openImage } from '../../src/io/image/image.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, titleWithSkipReason } from '../helpers/tools.js';

/*
 * Issue 15 item 4: SIGINT or SIGTERM while `commit COW OUT` builds OUT removes the hidden
 * temporary `.OUT.ubdcow-PID-*.tmp`, leaves no OUT, and the process ends by that signal (shell
 * status 130 / 143). The disk is a 4 TiB sparse file, so the merge (a million 4 MiB windows, each
 * asked for its data with SEEK_DATA) takes seconds: the signal is sent 100 ms after the temporary
 * appears, well inside the copy. The same for `convert`: its partial image and the folder of its
 * private NBD socket go. And for `import` (issue 18 item 13): its raw copy and its partial COW go,
 * and the qemu-img it runs is killed, whether the signal lands while qemu-img copies SRC or while
 * the copy is compared with the backing; a later import sweeps what a killed one left.
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

/** Pids of the running (not zombie) processes named `name` whose parent is `parent`, from /proc. */
function childrenNamed(parent: number, name: string): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = processStat(Number(entry));
    if (stat && stat.ppid === parent && stat.comm === name && stat.state !== 'Z') found.push(Number(entry));
  }
  return found;
}

/** /proc/PID/stat's name, state and parent; undefined once the process is gone. */
function processStat(pid: number): { comm: string; state: string; ppid: number } | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  const close = text.lastIndexOf(')');
  const [state, ppid] = text.slice(close + 2).split(' ');
  return { comm: text.slice(text.indexOf('(') + 1, close), state, ppid: Number(ppid) };
}

/** Whether `pid` still runs (a zombie waiting for its parent to reap it has ended). */
function running(pid: number): boolean {
  const stat = processStat(pid);
  return stat !== undefined && stat.state !== 'Z';
}

/** A 64 GiB sparse base.img and an empty vm.cow over it: qemu-img reads all of such an export (its holes are not zeros), which takes many seconds. */
async function bigEmptyCow(dir: string): Promise<{ base: string; cow: string }> {
  const base = path.join(dir, 'base.img');
  fs.writeFileSync(base, '');
  fs.truncateSync(base, 64 * 2 ** 30);
  const cow = path.join(dir, 'vm.cow');
  await createCow(cow, base);
  return { base, cow };
}

/**
 * A 64 GiB COW that holds every sector (its bitmap all ones) in a data area that is one hole:
 * every byte reads as zero but is data, so a whole-disk copy (convert) must read it all through
 * the export and runs for many seconds. (An empty COW over a sparse base converts in a blink now
 * that the export reports the base's holes as zeros.)
 */
async function bigFullCow(dir: string): Promise<{ base: string; cow: string }> {
  const made = await bigEmptyCow(dir);
  const image = await openImage(made.cow, { mode: 'r+' });
  try {
    const { bitmapOffset, bitmapLength } = image.geometry;
    const ones = Buffer.alloc(1 << 20, 0xff);
    for (let at = 0; at < bitmapLength; at += ones.length) {
      const length = Math.min(ones.length, bitmapLength - at);
      await image.handle.write(ones, 0, length, bitmapOffset + at);
    }
  } finally {
    await image.handle.close();
  }
  return made;
}

/**
 * Probes for interruptMidway around the qemu-img that ubdcow runs: `started` once a file matching
 * `pattern` is in `dir` and ubdcow has a qemu-img child, `beforeSignal` checks that it still runs,
 * `ended` waits until it is gone.
 */
function watchQemuImg(dir: string, pattern: RegExp) {
  let qemuImg: number | undefined;
  return {
    started: (pid: number) => {
      [qemuImg] = childrenNamed(pid, 'qemu-img');
      return qemuImg === undefined ? undefined : fs.readdirSync(dir).find((name) => pattern.test(name));
    },
    beforeSignal: () => expect(qemuImg !== undefined && running(qemuImg), 'qemu-img still running when the signal is sent').toBe(true),
    ended: (timeoutMs: number) => waitFor(() => (qemuImg !== undefined && running(qemuImg) ? undefined : true), timeoutMs),
  };
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
  started: (pid: number) => string | undefined,
  options: { settleMs: number; env?: NodeJS.ProcessEnv; whileRunning?: () => void; beforeSignal?: () => void },
): Promise<string> {
  const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (code, sig) => resolve({ code, signal: sig })),
  );
  const found = await waitFor(() => started(child.pid ?? 0), 20_000);
  options.whileRunning?.();
  await new Promise((resolve) => setTimeout(resolve, options.settleMs));
  expect(child.exitCode).toBeNull();
  options.beforeSignal?.();
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
    it(`${signal} mid-convert removes the partial image and the socket's folder, kills qemu-img, and leaves no OUT`, async () => {
      const { cow } = await bigFullCow(tmp.path);
      const scratch = path.join(tmp.path, 'scratch');
      fs.mkdirSync(scratch);
      const out = path.join(tmp.path, 'out.qcow2');

      const qemuImg = watchQemuImg(tmp.path, /^\.out\.qcow2\.ubdcow-\d+-[a-z0-9]+\.tmp$/);
      await interruptMidway(['convert', cow, out, '-O', 'qcow2'], signal, qemuImg.started, {
        settleMs: 200,
        env: { ...process.env, TMPDIR: scratch },
        whileRunning: () => expect(fs.readdirSync(scratch)).toHaveLength(1),
        beforeSignal: qemuImg.beforeSignal,
      });
      await qemuImg.ended(5_000);
      expect(fs.readdirSync(scratch)).toEqual([]);
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'scratch', 'vm.cow']);
    });
  }
});

describe.skipIf(missingTools('qemu-img').length > 0)(titleWithSkipReason('signals during import', missingTools('qemu-img')), () => {
  const tmp = useTempDir();

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    it(`${signal} while qemu-img copies SRC kills qemu-img and leaves no raw copy, no partial COW, no COW`, async () => {
      // SRC is an NBD export of a 64 GiB COW, served by this test process: qemu-img reads every
      // byte (holes without the zero flag), which takes many seconds, and an orphaned qemu-img
      // would go on reading it long after ubdcow is gone.
      const { base, cow } = await bigEmptyCow(tmp.path);
      const socket = path.join(tmp.path, 'nbd.sock');
      const served = await serveImage(cow, { socket, readOnly: true });
      const qemuImg = watchQemuImg(tmp.path, /^\.imported\.cow\.raw\.ubdcow-\d+-[a-z0-9]+\.tmp$/);
      try {
        await interruptMidway(['import', `nbd+unix:///?socket=${socket}`, path.join(tmp.path, 'imported.cow'), base], signal, qemuImg.started, {
          settleMs: 100,
          beforeSignal: qemuImg.beforeSignal,
        });
        await qemuImg.ended(2_000);
      } finally {
        await served.close();
      }
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'vm.cow']);
    });

    it(`${signal} while the copy is compared with the backing leaves no raw copy, no partial COW, no COW`, async () => {
      // 64 GiB of holes on both sides: the comparison reads for many seconds.
      const src = path.join(tmp.path, 'src.raw');
      fs.writeFileSync(src, '');
      fs.truncateSync(src, 64 * 2 ** 30);
      const fd = fs.openSync(src, 'r+');
      fs.writeSync(fd, Buffer.from('late in the disk'), 0, 16, 60 * 2 ** 30);
      fs.closeSync(fd);
      const base = path.join(tmp.path, 'base.img');
      fs.writeFileSync(base, '');
      fs.truncateSync(base, 64 * 2 ** 30);
      await interruptMidway(['import', src, path.join(tmp.path, 'imported.cow'), base], signal, () => fs.readdirSync(tmp.path).find((name) => /^\.imported\.cow\.ubdcow-\d+-[a-z0-9]+\.tmp$/.test(name)), {
        settleMs: 200,
        whileRunning: () => expect(fs.readdirSync(tmp.path).filter((name) => name.includes('.raw.ubdcow-'))).toHaveLength(1),
      });
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'src.raw']);
    });
  }

  it('a later import removes the raw copy and partial COW a killed import left (a dead pid; old names too), not those of a running one', () => {
    const src = path.join(tmp.path, 'src.raw');
    fs.writeFileSync(src, Buffer.alloc(1 << 20, 0x42));
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(1 << 20));
    const dead = spawnSync('sh', ['-c', 'echo $$'], { encoding: 'utf8' }).stdout.trim();
    const leftovers = [
      `.imported.cow.raw.ubdcow-${dead}-k1ll3d.tmp`,
      `.imported.cow.ubdcow-${dead}-k1ll3d.tmp`,
      // The names imports used before.
      `.imported.cow.ubdcow-import-${dead}.raw`,
      `.imported.cow.ubdcow-import-${dead}`,
    ];
    const live = `.imported.cow.raw.ubdcow-${process.pid}-l1v3.tmp`;
    for (const name of [...leftovers, live]) fs.writeFileSync(path.join(tmp.path, name), 'left');
    const r = spawnSync(process.execPath, [cli, 'import', src, path.join(tmp.path, 'imported.cow'), base], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(fs.readdirSync(tmp.path).sort()).toEqual([live, 'base.img', 'imported.cow', 'src.raw']);
  });
});
