/*
 * A COW held by a running `ubdcow serve`: a writer that is refused names that holder ("held by
 * ubdcow serve (pid N)"), not "a running UML", which used to be said of every holder.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, run, titleWithSkipReason } from '../helpers/tools.js';
import { type ServeProcess, missingNbdTools, patternedBacking, socketIn, startServe } from './serve-harness.js';

const missing = missingNbdTools();

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

describe.skipIf(missing.length > 0)(titleWithSkipReason('a COW that ubdcow serve holds: refusals name the holder', missing), () => {
  const tmp = useTempDir();
  let server: ServeProcess | undefined;

  afterEach(async () => {
    await server?.stop('SIGKILL');
    server = undefined;
  });

  it('commit (to a new file and in place) and a second serve are refused with "held by ubdcow serve (pid N)"', async () => {
    const base = path.join(tmp.path, 'base.img');
    patternedBacking(base, 1 << 20);
    const cow = path.join(tmp.path, 'vm.cow');
    expect(run(process.execPath, [cli, 'create', cow, base]).status).toBe(0);
    server = await startServe([cow, '--socket', socketIn(tmp.path)]);
    const pid = server.child.pid!;
    const before = fs.readFileSync(cow);
    const baseBefore = fs.readFileSync(base);
    const held = `held by ubdcow serve (pid ${pid})`;
    for (const args of [['commit', cow, path.join(tmp.path, 'out.img')], ['commit', cow], ['serve', cow, '--socket', socketIn(tmp.path, 'second.sock')]]) {
      const refused = run(process.execPath, [cli, ...args]);
      expect(refused.status, refused.stderr).toBe(1);
      const lines = refused.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toContain(`${cow}: in use by another process: ${held}; stop it or wait until it ends, then retry; see /proc/locks`);
      expect(lines[0]).not.toContain('UML');
    }
    expect(fs.existsSync(path.join(tmp.path, 'out.img'))).toBe(false);
    expect(fs.readFileSync(cow).equals(before)).toBe(true);
    expect(fs.readFileSync(base).equals(baseBefore)).toBe(true);
    expect(await server.stop('SIGTERM')).toBe(0);
  }, 60_000);
});
