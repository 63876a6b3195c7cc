/**
 * Running qemu-img (and qemu-io) for convert and import: one place that finds the tool, turns
 * "not installed" into one clear line, and keeps stderr for the error message. Runs are async:
 * the NBD server they talk to lives in this same process and must keep serving meanwhile. A
 * SIGINT/SIGTERM/SIGHUP that ends ubdcow kills the running tool too (killOnSignal): an orphaned
 * qemu-img would go on writing a multi-GiB file nobody removes.
 */
import { spawn } from 'node:child_process';
import { UbdcowError, oneLine } from '../errors.js';
import { killOnSignal } from '../io/file/index.js';

export interface ToolRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function missingToolError(tool: string, command: string): UbdcowError {
  return new UbdcowError('missing-tool', `${tool} is not installed; ubdcow ${command} needs it (Debian: apt-get install qemu-utils)`);
}

/** Runs `tool`; with `inheritStdout` its output (e.g. qemu-img -p progress) goes to ours. */
export function runTool(tool: string, args: string[], command: string, options: { inheritStdout?: boolean } = {}): Promise<ToolRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['ignore', options.inheritStdout ? 'inherit' : 'pipe', 'pipe'] });
    const forget = killOnSignal(child);
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (c) => (stdout += c));
    child.stderr?.on('data', (c) => (stderr += c));
    child.on('error', (err: NodeJS.ErrnoException) => {
      forget();
      reject(err.code === 'ENOENT' ? missingToolError(tool, command) : new UbdcowError('tool-failed', `${tool}: could not start: ${err.message}`));
    });
    child.on('close', (status) => {
      forget();
      resolve({ status, stdout, stderr });
    });
  });
}

/** Like runTool, but a non-zero exit becomes an error naming the tool and its last message. */
export async function runToolOk(tool: string, args: string[], command: string, what: string, options: { inheritStdout?: boolean } = {}): Promise<ToolRun> {
  const result = await runTool(tool, args, command, options);
  if (result.status !== 0) {
    const message = result.stderr.trim().split('\n').filter(Boolean).pop() ?? `exit status ${result.status}`;
    throw new UbdcowError('tool-failed', `${what}: ${tool} failed: ${oneLine(message)}`);
  }
  return result;
}

export interface QemuImageInfo {
  format: string;
  virtualSize: number;
}

export async function qemuImageInfo(file: string, command: string): Promise<QemuImageInfo> {
  const result = await runToolOk('qemu-img', ['info', '--output=json', file], command, file);
  const info = JSON.parse(result.stdout) as { format: string; 'virtual-size': number };
  return { format: info.format, virtualSize: info['virtual-size'] };
}

/**
 * The virtual size qemu gives a disk of `bytes` bytes: qemu-img 7.2 counts whole 512-byte sectors,
 * so a raw file or NBD export of 64 MiB + 1234 bytes is 64 MiB + 1536 to it (its images of such a
 * disk end in up to 511 zero bytes past the disk).
 */
export function qemuVirtualSize(bytes: number): number {
  return Math.ceil(bytes / 512) * 512;
}

/** Whether a size qemu-img reports stands for a disk of exactly `bytes` bytes (the same, or it rounded up to 512). */
export function qemuSizeFits(reported: number, bytes: number): boolean {
  return reported === bytes || reported === qemuVirtualSize(bytes);
}
