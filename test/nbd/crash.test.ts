/*
 * kill -9 of `ubdcow serve` in the middle of a qemu-io write stream. Afterwards: every write
 * qemu-io saw acknowledged before a FLUSH that completed is there, no bitmap bit points at data
 * that was never written (the engine writes data before the bit), and the COW opens and checks.
 * Each write goes to its own 4 KiB slot with its own pattern over a zero backing, so a sector's
 * bytes tell which write (if any) put them there.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openCow } from '../../src/io/engine/engine.js';
import { seededRandom } from '../helpers/cow-fixtures.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, run, titleWithSkipReason } from '../helpers/tools.js';
import { nbdUri, pollUntil, startServe } from './serve-harness.js';

const missing = missingTools('qemu-io');
const SIZE = 16 << 20;
const SLOT = 4096;
const WRITES = 1500;
const FLUSH_EVERY = 5;

interface Write {
  slot: number;
  pattern: number;
}

function plan(seed: number): Write[] {
  const random = seededRandom(seed);
  const slots = Array.from({ length: SIZE / SLOT }, (_, i) => i);
  for (let i = slots.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [slots[i], slots[j]] = [slots[j], slots[i]];
  }
  return slots.slice(0, WRITES).map((slot, i) => ({ slot, pattern: (i % 254) + 1 }));
}

describe.skipIf(missing.length > 0)(titleWithSkipReason('kill -9 of ubdcow serve during a qemu-io write stream', missing), () => {
  const tmp = useTempDir();

  for (const [round, sync] of [
    [1, false],
    [2, false],
    [3, true],
  ] as const) {
    it(`round ${round}${sync ? ' (--sync)' : ''}: flushed writes survive, no bit without its data, the COW opens`, async () => {
      const cli = ensureBuiltCli();
      const dir = tmp.path;
      const base = path.join(dir, 'base.img');
      fs.writeFileSync(base, '');
      fs.truncateSync(base, SIZE);
      const cow = path.join(dir, 'vm.cow');
      expect(run(process.execPath, [cli, 'create', cow, base]).status).toBe(0);
      const sock = path.join(dir, 'nbd.sock');
      const server = await startServe([cow, '--socket', sock, ...(sync ? ['--sync'] : [])]);
      const writes = plan(round);
      const commands: string[] = [];
      writes.forEach((w, i) => {
        commands.push('-c', `write -P ${w.pattern} ${w.slot * SLOT} ${SLOT}`);
        if ((i + 1) % FLUSH_EVERY === 0) commands.push('-c', 'flush');
      });
      const client = spawn('qemu-io', ['-f', 'raw', ...commands, nbdUri(sock)], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      client.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
      client.stderr.resume();
      const clientDone = new Promise((resolve) => client.on('close', resolve));
      // Kill once a good part of the stream went through, but well before its end.
      const killAfter = 50 + round * 40;
      await pollUntil(() => (stdout.match(/^wrote /gm) ?? []).length >= killAfter || client.exitCode !== null);
      server.child.kill('SIGKILL');
      await server.exited;
      await clientDone;
      const acknowledged = (stdout.match(/^wrote /gm) ?? []).length;
      expect(acknowledged).toBeGreaterThanOrEqual(killAfter);
      expect(acknowledged, 'the kill came after the whole stream').toBeLessThan(WRITES);
      // qemu-io runs its commands in order: a flush completed when a later write was acknowledged.
      const flushedUpTo = Math.floor((acknowledged - 1) / FLUSH_EVERY) * FLUSH_EVERY;

      const device = await openCow(cow);
      try {
        const check = run(process.execPath, [cli, 'check', cow]);
        expect(check.status, check.stdout + check.stderr).toBe(0);
        const map = JSON.parse(run(process.execPath, [cli, 'map', cow, '--json']).stdout) as { extents: { offset: number; length: number; cowOffset: number }[] };
        const file = fs.openSync(cow, 'r');
        const sector = Buffer.alloc(512);
        const patternAt = new Map(writes.map((w) => [w.slot, w.pattern]));
        let bitsChecked = 0;
        for (const extent of map.extents) {
          for (let at = 0; at < extent.length; at += 512) {
            fs.readSync(file, sector, 0, 512, extent.cowOffset + at);
            const pattern = patternAt.get(Math.floor((extent.offset + at) / SLOT));
            expect(pattern, `bit set for sector at ${extent.offset + at}, which no write touched`).toBeDefined();
            expect(sector.every((b) => b === pattern), `bit set for sector at ${extent.offset + at} but its data is not the write's`).toBe(true);
            bitsChecked++;
          }
        }
        fs.closeSync(file);
        expect(bitsChecked).toBeGreaterThanOrEqual(flushedUpTo * (SLOT / 512));
        for (const w of writes.slice(0, flushedUpTo)) {
          const got = await device.read(w.slot * SLOT, SLOT);
          expect(Buffer.from(got).every((b) => b === w.pattern), `flushed write ${w.slot} lost`).toBe(true);
        }
      } finally {
        await device.close();
      }
    }, 60_000);
  }
});
