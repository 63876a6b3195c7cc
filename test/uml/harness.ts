/**
 * Boots real User-Mode Linux guests on ubd images for the tests in test/uml.
 *
 * The root file system is busybox-static in an ext2 image built with `mke2fs -d` (no mount, no
 * root). Each test file supplies the body of /init; the guest prints `@@ ...` marker lines on its
 * console (our stdout) and powers off. Per-boot variations go in as kernel command-line
 * parameters, which the kernel hands to /init as environment variables.
 *
 * Guests run one at a time across all test files (a POSIX lock on a file in os.tmpdir()), each
 * in its own process group that is killed whole on timeout, and again on exit in case a helper
 * process of the UML kernel outlives the main one.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { osCalls } from '../../src/os/libc.js';
import { makeTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, missingTools, titleWithSkipReason } from '../helpers/tools.js';

const execFileAsync = promisify(execFile);

export const umlTools = ['linux.uml', 'busybox', 'mke2fs', 'debugfs', 'e2fsck'];

/** The tools the UML tests need that are absent here (empty when the suite can run). */
export function missingUmlTools(...extra: string[]): string[] {
  return missingTools(...umlTools, ...extra);
}

/** Suite title carrying the skip reason, plus a console warning when something is missing. */
export function umlSuiteTitle(title: string, missing: string[]): string {
  return titleWithSkipReason(title, missing);
}

/** Generous: a guest waits for the guest lock while other test files boot theirs. */
export const umlTestTimeout = 170_000;

const guestLockPath = path.join(os.tmpdir(), 'ubdcow-uml-guests.lock');

/* ------------------------------------------------------------------------------------------ */
/* Root file system                                                                            */

/**
 * Shell functions every /init gets:
 *   mark WORDS...                 prints `@@ WORDS...`
 *   put MOUNT REL BS COUNT        writes COUNT*BS random bytes to MOUNT/REL, checksumming them
 *                                 as they are written, and prints `@@ file REL MD5 BYTES`
 *   sumfile MOUNT REL             prints `@@ read REL MD5 BYTES` for a file the guest reads back
 */
const initPrologue = `#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The kernel mounts devtmpfs on /dev itself when it is built with DEVTMPFS_MOUNT.
grep -q ' /dev devtmpfs' /proc/mounts || mount -t devtmpfs devtmpfs /dev
# Kernel messages would otherwise split marker lines on the shared console.
echo 1 > /proc/sys/kernel/printk
mark() { echo "@@ $*"; }
put() {
  case "$2" in */*) mkdir -p "$1/\${2%/*}" ;; esac
  sum=$(dd if=/dev/urandom bs="$3" count="$4" 2>/dev/null | tee "$1/$2" | md5sum)
  echo "@@ file $2 \${sum%% *} $(($3 * $4))"
}
sumfile() {
  sum=$(md5sum < "$1/$2")
  echo "@@ read $2 \${sum%% *} $(wc -c < "$1/$2")"
}
mark begin
`;

const initEpilogue = `
status=$?
sync
mark end $status
poweroff -f
`;

/** A complete /init: the body runs in a subshell with `set -e`; `@@ end STATUS` reports how it went. */
export function initScript(body: string): string {
  return `${initPrologue}(\nset -e\n${body}\n)${initEpilogue}`;
}

/** A folder with busybox and one symlink per applet (not for `busybox` itself). */
async function buildBusyboxTree(dir: string): Promise<void> {
  for (const sub of ['bin', 'proc', 'sys', 'dev', 'mnt', 'tmp', 'a', 'b', 'c']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  const busybox = fs.realpathSync(await which('busybox'));
  fs.copyFileSync(busybox, path.join(dir, 'bin', 'busybox'));
  fs.chmodSync(path.join(dir, 'bin', 'busybox'), 0o755);
  const { stdout } = await execFileAsync(busybox, ['--list']);
  for (const applet of stdout.split('\n').map((name) => name.trim())) {
    if (applet === '' || applet === 'busybox' || applet.includes('/')) continue;
    fs.symlinkSync('busybox', path.join(dir, 'bin', applet));
  }
}

async function which(name: string): Promise<string> {
  const { stdout } = await execFileAsync('which', [name]);
  return stdout.trim();
}

/* ------------------------------------------------------------------------------------------ */
/* Guests                                                                                       */

export interface BootOptions {
  /** ubd devices after the root one: { b: 'disk.cow,base.img', c: 'other.img' } -> ubdb=..., ubdc=... */
  disks: Record<string, string>;
  /** Kernel command-line parameters, visible to /init as environment variables. */
  env?: Record<string, string>;
  /** Kill the guest's process group after this long (default 60 s). */
  timeoutMs?: number;
  /** Give the guest console a pipe on stdin (see Guest.send) instead of /dev/null. */
  interactive?: boolean;
}

export interface GuestResult {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  /** Console output with carriage returns removed. */
  console: string;
  stderr: string;
  /** Each `@@` line split into words. */
  markers: string[][];
  /** The status `set -e` left for the /init body (undefined when it never got there). */
  bodyStatus: number | undefined;
}

/** A running guest. */
export interface Guest {
  readonly pid: number;
  /** Resolves with the first marker line whose first word is `name`. */
  waitForMarker(name: string): Promise<string[]>;
  /** Writes a line to the guest console (needs `interactive`). */
  send(line: string): void;
  readonly done: Promise<GuestResult>;
}

export class UmlLab {
  private readonly guests = new Set<ChildProcess>();
  private readonly rootImages = new Map<string, Promise<string>>();
  private treeReady: Promise<string> | undefined;
  /** Root images are built one after another: each build swaps /init in the shared tree. */
  private buildQueue: Promise<unknown> = Promise.resolve();
  private guestCount = 0;

  private constructor(readonly dir: string) {}

  /** A lab with its own temp folder; call `dispose` in afterAll. */
  static create(): UmlLab {
    return new UmlLab(makeTempDir('ubdcow-uml-'));
  }

  /** A fresh folder for one test's images. */
  scratch(name: string): string {
    const dir = path.join(this.dir, name);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    return dir;
  }

  /** The root image for an /init body, built once per body per lab. */
  rootImage(body: string): Promise<string> {
    let image = this.rootImages.get(body);
    if (!image) {
      image = this.buildQueue.then(() => this.buildRootImage(body));
      this.buildQueue = image.catch(() => undefined);
      this.rootImages.set(body, image);
    }
    return image;
  }

  private async buildRootImage(body: string): Promise<string> {
    this.treeReady ??= (async () => {
      const tree = path.join(this.dir, 'rootfs-tree');
      await buildBusyboxTree(tree);
      return tree;
    })();
    const tree = await this.treeReady;
    const id = createHash('sha1').update(body).digest('hex').slice(0, 12);
    // mke2fs -d copies the folder as it is, so /init is swapped in just before each build.
    fs.writeFileSync(path.join(tree, 'init'), initScript(body), { mode: 0o755 });
    const image = path.join(this.dir, `root-${id}.img`);
    await execFileAsync('mke2fs', ['-q', '-F', '-t', 'ext2', '-d', tree, image, '8M']);
    return image;
  }

  /** Boots a guest running `body` as /init and waits for it to power off. */
  async run(body: string, options: BootOptions): Promise<GuestResult> {
    const guest = await this.boot(body, options);
    return guest.done;
  }

  /**
   * Starts a guest. The guest lock is held from boot to exit, so only one guest of any test file
   * runs at a time.
   */
  async boot(body: string, options: BootOptions): Promise<Guest> {
    const root = await this.rootImage(body);
    const release = await takeGuestLock();
    try {
      return this.spawnGuest(root, options, release);
    } catch (err) {
      await release();
      throw err;
    }
  }

  private spawnGuest(root: string, options: BootOptions, release: () => Promise<void>): Guest {
    const args = ['mem=128M', `ubd0r=${root}`];
    for (const [letter, spec] of Object.entries(options.disks)) args.push(`ubd${letter}=${spec}`);
    args.push('root=/dev/ubda', 'init=/init', 'con=null', 'con0=fd:0,fd:1');
    for (const [key, value] of Object.entries(options.env ?? {})) args.push(`${key}=${value}`);
    const memoryDir = this.memoryDir();
    const timeoutMs = options.timeoutMs ?? 60_000;
    // linux.uml calls setsid() unless it already leads a session: started through a wrapper such as
    // timeout(1) it escapes the wrapper's process group. So it is started directly, as the leader
    // of a new session whose process group id is its pid, and that group is what gets killed.
    const child = spawn('linux.uml', args, {
      cwd: this.dir,
      detached: true, // its own process group, killed whole
      stdio: [options.interactive ? 'pipe' : 'ignore', 'pipe', 'pipe'],
      env: { ...process.env, TMPDIR: memoryDir },
    });
    this.guests.add(child);
    liveGroups.add(child);
    const pid = child.pid;
    if (pid === undefined) throw new Error('linux.uml did not start');

    let consoleText = '';
    let stderr = '';
    const markerWaiters: { name: string; resolve: (words: string[]) => void }[] = [];
    const markers: string[][] = [];
    let partialLine = '';
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (chunk: string) => {
      consoleText += chunk;
      partialLine += chunk;
      const lines = partialLine.split('\n');
      partialLine = lines.pop() ?? '';
      for (const line of lines) {
        const words = parseMarker(line);
        if (!words) continue;
        markers.push(words);
        for (const waiter of markerWaiters.filter((w) => w.name === words[0])) {
          waiter.resolve(words);
          markerWaiters.splice(markerWaiters.indexOf(waiter), 1);
        }
      }
    });
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (chunk: string) => {
      stderr += chunk;
    });

    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(pid);
    }, timeoutMs);

    const done = new Promise<GuestResult>((resolve, reject) => {
      child.on('error', reject);
      let closeGrace: NodeJS.Timeout | undefined;
      child.on('exit', () => {
        // Helper processes of the UML kernel share the group; none may outlive the guest.
        killGroup(pid);
        // Output is complete once every holder of the pipes is gone ('close'); should something
        // outside the group still hold them, stop waiting rather than hang the test.
        closeGrace = setTimeout(() => {
          child.stdout?.destroy();
          child.stderr?.destroy();
          child.stdin?.destroy();
        }, 5000);
      });
      child.on('close', (exitCode, signal) => {
        clearTimeout(closeGrace);
        clearTimeout(timer);
        this.guests.delete(child);
        liveGroups.delete(child);
        fs.rmSync(memoryDir, { recursive: true, force: true });
        const tail = parseMarker(partialLine);
        if (tail) markers.push(tail);
        const end = markers.find((words) => words[0] === 'end');
        const result: GuestResult = {
          exitCode,
          signal,
          timedOut,
          console: consoleText.replace(/\r/g, ''),
          stderr,
          markers,
          bodyStatus: end ? Number(end[1]) : undefined,
        };
        for (const waiter of markerWaiters.splice(0)) waiter.resolve([]);
        waitForGroupToEnd(pid)
          .finally(release)
          .then(() => resolve(result), reject);
      });
    });
    done.catch(() => undefined);

    return {
      pid,
      done,
      waitForMarker: (name) => {
        const seen = markers.find((words) => words[0] === name);
        if (seen) return Promise.resolve(seen);
        return new Promise((resolve) => markerWaiters.push({ name, resolve }));
      },
      send: (line) => {
        if (!child.stdin) throw new Error('guest was not booted with interactive: true');
        child.stdin.write(`${line}\n`);
      },
    };
  }

  /**
   * UML keeps guest memory in a file under $TMPDIR (else /dev/shm, else /tmp) and exits at once
   * with status 1 when $TMPDIR does not exist, so every guest gets a folder of its own, on tmpfs
   * when /dev/shm is usable (faster, and UML warns otherwise).
   */
  private memoryDir(): string {
    const name = `${path.basename(this.dir)}-guest-${++this.guestCount}`;
    for (const parent of ['/dev/shm', this.dir]) {
      try {
        const dir = path.join(parent, name);
        fs.mkdirSync(dir, { recursive: true });
        return dir;
      } catch {
        // Not writable here: try the next place.
      }
    }
    throw new Error(`no writable folder for the guest's memory file in /dev/shm or ${this.dir}`);
  }

  /** Kills every guest still running; safe to call from afterEach even when none are. */
  async killGuests(): Promise<void> {
    const running = [...this.guests];
    for (const child of running) if (child.pid !== undefined) killGroup(child.pid);
    await Promise.all(
      running.map((child) => new Promise<void>((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve() : child.once('close', () => resolve())))),
    );
  }

  /** Kills leftovers and removes the lab folder. */
  async dispose(): Promise<void> {
    await this.killGuests();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** `@@ a b c` -> ['a', 'b', 'c']; anything else -> undefined. */
export function parseMarker(line: string): string[] | undefined {
  const match = /@@ (.*)$/.exec(line.replace(/\r/g, ''));
  return match ? match[1]!.trim().split(/\s+/) : undefined;
}

/** Marker lines named `name`, without the name. */
export function markersNamed(result: GuestResult, name: string): string[][] {
  return result.markers.filter((words) => words[0] === name).map((words) => words.slice(1));
}

/** Files the guest wrote with `put`: path -> { md5, bytes }. */
export function filesWritten(result: GuestResult): Map<string, { md5: string; bytes: number }> {
  return new Map(markersNamed(result, 'file').map(([file, md5, bytes]) => [file!, { md5: md5!, bytes: Number(bytes) }]));
}

/** A failure message with the end of the guest's console, for assertions that a boot went well. */
export function describeGuest(result: GuestResult): string {
  const tail = result.console.split('\n').slice(-40).join('\n');
  return `guest exit ${result.exitCode} signal ${result.signal}${result.timedOut ? ' (TIMED OUT)' : ''}, body status ${result.bodyStatus}\n--- console tail ---\n${tail}\n--- stderr tail ---\n${result.stderr.split('\n').slice(-10).join('\n')}`;
}

/** Throws unless the guest ran its whole /init body successfully. */
export function expectGuestOk(result: GuestResult): GuestResult {
  if (result.timedOut || result.bodyStatus !== 0) throw new Error(`guest failed: ${describeGuest(result)}`);
  return result;
}

/**
 * SIGKILL reaches the other processes of a guest (ptrace-stopped helpers) a moment after the main
 * one has gone; the guest counts as finished once none is left.
 */
async function waitForGroupToEnd(pgid: number): Promise<void> {
  for (let waited = 0; processesInGroup(pgid).length > 0; waited += 50) {
    if (waited >= 10_000) throw new Error(`processes of guest group ${pgid} survive SIGKILL: ${processesInGroup(pgid).join(' ')}`);
    killGroup(pgid);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Every guest of this process, for the exit hook below. */
const liveGroups = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of liveGroups) if (child.pid !== undefined) killGroup(child.pid);
});

function killGroup(pid: number): void {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

/** Live processes still in the process group of a guest we started (should always be none). */
export function processesInGroup(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      // Fields after the parenthesised command name: state ppid pgrp ...
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // Zombies are dead already, only not yet reaped by their new parent.
      if (Number(fields[2]) === pgid && fields[0] !== 'Z' && fields[0] !== 'X') pids.push(Number(entry));
    } catch {
      // The process ended while we looked.
    }
  }
  return pids;
}

async function takeGuestLock(): Promise<() => Promise<void>> {
  const handle = await fs.promises.open(guestLockPath, 'a');
  const calls = osCalls();
  // F_SETLK polled rather than F_SETLKW, which would block a thread of the pool until granted.
  for (;;) {
    try {
      calls?.setLock(handle.fd, 'write');
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN' && (err as NodeJS.ErrnoException).code !== 'EACCES') {
        await handle.close();
        throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  let released: Promise<void> | undefined;
  return () =>
    (released ??= (async () => {
      try {
        calls?.setLock(handle.fd, 'unlock');
      } catch {
        // Closing drops it anyway.
      }
      await handle.close();
    })());
}

/* ------------------------------------------------------------------------------------------ */
/* Host-side checks                                                                            */

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `node bin/ubdcow ARGS` (building dist/ first when it is stale). */
export async function ubdcow(args: string[], cwd?: string): Promise<RunResult> {
  const cli = ensureBuiltCli();
  return runProgram(process.execPath, [cli, ...args], cwd);
}

/** Runs `node bin/ubdcow ARGS` with its standard output going to `outFile` (for `cat`). */
export async function ubdcowToFile(args: string[], outFile: string): Promise<{ status: number | null; stderr: string }> {
  const cli = ensureBuiltCli();
  const out = fs.openSync(outFile, 'w');
  try {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', out, 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const status = await new Promise<number | null>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code) => resolve(code));
    });
    return { status, stderr };
  } finally {
    fs.closeSync(out);
  }
}

/** `ubdcow ARGS --json`, failing with its stderr unless it exits with one of `okCodes`. */
export async function ubdcowJson<T = any>(args: string[], okCodes: number[] = [0]): Promise<{ status: number; value: T }> {
  const result = await ubdcow([...args, '--json']);
  if (result.status === null || !okCodes.includes(result.status)) {
    throw new Error(`ubdcow ${args.join(' ')} --json exited ${result.status}: ${result.stderr.trim()}`);
  }
  return { status: result.status, value: JSON.parse(result.stdout) as T };
}

export async function runProgram(program: string, args: string[], cwd?: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(program, args, { cwd, encoding: 'utf8', maxBuffer: 256 << 20 }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === 'string') return reject(err);
      const status = err ? ((err as { code?: number }).code ?? null) : 0;
      resolve({ status: typeof status === 'number' ? status : null, stdout, stderr });
    });
  });
}

/** A file's contents inside an ext2 image, read by debugfs (no mount). */
export async function debugfsCat(image: string, file: string): Promise<Buffer> {
  const { stdout } = await execFileAsync('debugfs', ['-R', `cat /${file.replace(/^\//, '')}`, image], {
    encoding: 'buffer',
    maxBuffer: 256 << 20,
  });
  return stdout;
}

/** `e2fsck -fn IMAGE`: exit status and output (0 means clean). */
export async function e2fsckReadOnly(image: string): Promise<RunResult> {
  return runProgram('e2fsck', ['-fn', image]);
}

export function md5(data: Uint8Array): string {
  return createHash('md5').update(data).digest('hex');
}

export function md5OfFile(file: string): string {
  return md5(fs.readFileSync(file));
}

export interface SectorRun {
  /** First sector. */
  start: number;
  /** One past the last sector. */
  end: number;
}

/**
 * The bitmap of a version 3 COW file (what the kernel writes), decoded independently of src/:
 * runs of set bits, UML bit order (bit N is byte N>>3, mask 1 << (N & 7)).
 */
export function kernelBitmapRuns(cowPath: string): { sectors: number; sectorSize: number; runs: SectorRun[] } {
  const file = fs.readFileSync(cowPath);
  if (file.readUInt32BE(0) !== 0x4f4f4f4d || file.readUInt32BE(4) !== 3) throw new Error(`${cowPath}: not a version 3 COW file`);
  const size = Number(file.readBigUInt64BE(12));
  const sectorSize = file.readUInt32BE(20);
  const alignment = file.readUInt32BE(24);
  const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;
  const sectors = Math.ceil(size / sectorSize);
  const bitmapOffset = roundUp(4128, alignment);
  const runs: SectorRun[] = [];
  let open: number | undefined;
  for (let sector = 0; sector < sectors; sector++) {
    const set = (file[bitmapOffset + (sector >> 3)]! & (1 << (sector & 7))) !== 0;
    if (set && open === undefined) open = sector;
    if (!set && open !== undefined) {
      runs.push({ start: open, end: sector });
      open = undefined;
    }
  }
  if (open !== undefined) runs.push({ start: open, end: sectors });
  return { sectors, sectorSize, runs };
}

/** Runs of 512-byte sectors whose contents differ between two equally long files (byte compare). */
export function differingSectorRuns(a: string, b: string, sectorSize = 512): SectorRun[] {
  const bufferA = fs.readFileSync(a);
  const bufferB = fs.readFileSync(b);
  if (bufferA.length !== bufferB.length) throw new Error(`${a} and ${b} differ in length`);
  const runs: SectorRun[] = [];
  let open: number | undefined;
  const sectors = Math.ceil(bufferA.length / sectorSize);
  for (let sector = 0; sector < sectors; sector++) {
    const from = sector * sectorSize;
    const to = Math.min(from + sectorSize, bufferA.length);
    const differs = bufferA.compare(bufferB, from, to, from, to) !== 0;
    if (differs && open === undefined) open = sector;
    if (!differs && open !== undefined) {
      runs.push({ start: open, end: sector });
      open = undefined;
    }
  }
  if (open !== undefined) runs.push({ start: open, end: sectors });
  return runs;
}

/** Byte ranges of a file that occupy disk space (not holes), from `filefrag -v -b512` (FIEMAP). */
export async function allocatedFileRanges(file: string): Promise<{ offset: number; length: number }[]> {
  const { stdout } = await execFileAsync('filefrag', ['-v', '-b512', file]);
  const ranges: { offset: number; length: number }[] = [];
  for (const match of stdout.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*(\d+):/gm)) {
    const first = Number(match[1]);
    ranges.push({ offset: first * 512, length: (Number(match[2]) - first + 1) * 512 });
  }
  return ranges;
}

/** A sparse all-zero file of `bytes` bytes. */
export function sparseFile(file: string, bytes: number): string {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes);
  return file;
}
