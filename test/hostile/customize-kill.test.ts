/**
 * Sudden death of a real `ubdcow customize` process (an 80 MB upload plus small changes), killed
 * with SIGKILL at moments spread over its whole run: staging, journal sync, applying. After each
 * kill `ubdcow customize COW` (no operations) finishes or discards the journal, and then the disk
 * the COW stands for (`ubdcow cat`) is exactly the disk before (same hash), or fully customized:
 * e2fsck clean, every operation's effect there byte for byte, and `diff --files` naming exactly
 * the operations' paths. Never anything between.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { debugfsCat, ubdcow, ubdcowToFile } from '../uml/harness.js';
import { ensureBuiltCli, missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';
import { baseAndCow, fsConfigs, fsckClean } from '../helpers/customize-fixtures.js';

const missing = missingTools('mke2fs', 'debugfs', 'e2fsck');
const KILLS = process.env.UBDCOW_HEAVY ? 30 : 9;

function hashOf(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

type Trigger = { journal: string; bytes: number } | { cow: string; mtimeMs: number };

/**
 * Runs customize and kills it with SIGKILL `delayMs` after it starts, or `delayMs` after a
 * trigger: the journal file grew past `bytes` (it is being completed), or the COW's mtime changed
 * (the journal is complete and being applied).
 */
async function runAndKill(args: string[], delayMs: number, trigger?: Trigger): Promise<'killed' | 'finished'> {
  const child = spawn(process.execPath, [ensureBuiltCli(), ...args], { stdio: 'ignore' });
  let timer: NodeJS.Timeout | undefined;
  const fired = (): boolean => {
    if (!trigger) return true;
    if ('journal' in trigger) return (fs.statSync(trigger.journal, { throwIfNoEntry: false })?.size ?? 0) >= trigger.bytes;
    return fs.statSync(trigger.cow).mtimeMs !== trigger.mtimeMs;
  };
  const poll = setInterval(() => {
    if (!timer && fired()) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
  }, 1);
  if (!trigger) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
  const result = await new Promise<'killed' | 'finished'>((resolve) => child.on('exit', (_code, signal) => resolve(signal === 'SIGKILL' ? 'killed' : 'finished')));
  clearTimeout(timer);
  clearInterval(poll);
  return result;
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('customize killed with SIGKILL: before or after, never between', missing), () => {
  const tmp = useTempDir();

  it(`${KILLS} kills over the whole run`, { timeout: 600_000 }, async () => {
    const { cow } = await baseAndCow(tmp.path, fsConfigs[2]!, '256M');
    const pristine = `${cow}.pristine`;
    fs.copyFileSync(cow, pristine);
    const payload = Buffer.alloc(80 << 20);
    for (let i = 0; i < payload.length; i += 4096) payload.writeUInt32LE(i, i);
    const upload = path.join(tmp.path, 'payload.bin');
    fs.writeFileSync(upload, payload);
    const args = ['customize', cow, '--mkdir', '/srv/data', '--upload', `${upload}:/srv/data/payload.bin`, '--hostname', 'after', '--delete', '/etc/gone.txt'];
    const expectedChanges = ['added /srv', 'added /srv/data', 'added /srv/data/payload.bin', 'modified /', 'modified /etc', 'modified /etc/hostname', 'removed /etc/gone.txt'];

    const flat = path.join(tmp.path, 'flat.img');
    expect((await ubdcowToFile(['cat', cow], flat)).status).toBe(0);
    const beforeHash = hashOf(flat);

    // How long a whole run takes here, to spread the kills over it.
    const started = Date.now();
    expect(await runAndKill(args, 600_000)).toBe('finished');
    const duration = Date.now() - started;

    const outcomes = { before: 0, after: 0, replayed: 0 };
    for (let k = 0; k < KILLS; k++) {
      fs.copyFileSync(pristine, cow);
      fs.rmSync(`${cow}.ubdcow-customize`, { force: true });
      // A third of the kills at moments spread over the run; a third once the journal holds the
      // upload (it is being completed and synced); a third once the COW changes (applying).
      const mode = k % 3;
      const share = Math.floor(k / 3) / Math.max(1, Math.ceil(KILLS / 3) - 1);
      const delay = mode === 0 ? Math.round(duration * (0.1 + 0.8 * share)) : Math.round(share * 150);
      const trigger: Trigger | undefined = mode === 1 ? { journal: `${cow}.ubdcow-customize`, bytes: 60 << 20 } : mode === 2 ? { cow, mtimeMs: fs.statSync(cow).mtimeMs } : undefined;
      await runAndKill(args, delay, trigger);
      const recovered = await ubdcow(['customize', cow]);
      expect(recovered.status, recovered.stderr).toBe(0);
      if ((recovered.stdout + recovered.stderr).includes('journal was replayed')) outcomes.replayed++;
      expect(fs.existsSync(`${cow}.ubdcow-customize`)).toBe(false);
      expect((await ubdcowToFile(['cat', cow], flat)).status).toBe(0);
      if (hashOf(flat) === beforeHash) {
        outcomes.before++;
        continue;
      }
      outcomes.after++;
      await fsckClean(flat);
      expect(Buffer.compare(await debugfsCat(flat, '/srv/data/payload.bin'), payload), `kill after ${delay} ms`).toBe(0);
      expect((await debugfsCat(flat, '/etc/hostname')).toString()).toBe('after\n');
      const diff = await ubdcow(['diff', '--files', cow, '--json']);
      expect(JSON.parse(diff.stdout).changes.map((c: { change: string; path: string }) => `${c.change} ${c.path}`).sort()).toEqual(expectedChanges);
    }
    console.log(`customize kill test: run ${duration} ms, ${KILLS} kills -> before ${outcomes.before}, after ${outcomes.after} (${outcomes.replayed} by replaying the journal)`);
    expect(outcomes.before + outcomes.after).toBe(KILLS);
  });
});
