/* Starting `ubdcow serve` as a real process and talking to it with real NBD clients. */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureBuiltCli, missingTools } from '../helpers/tools.js';

export const nbdTools = ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy'];
export const missingNbdTools = (...extra: string[]) => missingTools(...nbdTools, ...extra);

export interface ServeProcess {
  child: ChildProcess;
  /** The "listening on ..." line. */
  listening: string;
  stdout(): string;
  stderr(): string;
  /** Sends `signal` and resolves with the exit code (or signal name). */
  stop(signal?: NodeJS.Signals): Promise<number | string | null>;
  exited: Promise<number | string | null>;
}

/** `ubdcow serve ARGS`, resolved once it prints its "listening on" line (or rejected if it exits first). */
export function startServe(args: string[], options: { cwd?: string } = {}): Promise<ServeProcess> {
  const cli = ensureBuiltCli();
  const child = spawn(process.execPath, [cli, 'serve', ...args], { cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const exited = new Promise<number | string | null>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`serve did not start within 20 s: ${stderr}`));
    }, 20_000);
    child.stdout!.on('data', () => {
      const line = stdout.split('\n').find((l) => l.startsWith('listening on') || l.startsWith('{'));
      if (line === undefined) return;
      clearTimeout(timer);
      resolve({
        child,
        listening: line,
        stdout: () => stdout,
        stderr: () => stderr,
        exited,
        stop: async (signal = 'SIGTERM') => {
          if (child.exitCode === null && child.signalCode === null) child.kill(signal);
          return exited;
        },
      });
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(Object.assign(new Error(`serve exited (${code}) before listening: ${stderr.trim()}`), { code, stderr }));
    });
  });
}

export function nbdUri(socket: string, name = ''): string {
  return `nbd+unix:///${name}?socket=${socket}`;
}

/** A backing file with a recognisable pattern: byte i of sector s is (s * 7 + i) & 0xff, never all zero. */
export function patternedBacking(file: string, bytes: number): Buffer {
  const data = Buffer.alloc(bytes);
  for (let s = 0; s < bytes / 512; s++) for (let i = 0; i < 512; i++) data[s * 512 + i] = ((s * 7 + i) & 0xff) | 1;
  fs.writeFileSync(file, data);
  return data;
}

export function socketIn(dir: string, name = 'nbd.sock'): string {
  return path.join(dir, name);
}

/** Resolves once `done()` holds, checking every 2 ms (for watching a client's progress). */
export function pollUntil(done: () => boolean): Promise<void> {
  return new Promise<void>((resolve) => {
    const poll = setInterval(() => {
      if (done()) {
        clearInterval(poll);
        resolve();
      }
    }, 2);
  });
}
