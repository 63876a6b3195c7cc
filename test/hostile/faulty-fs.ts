/**
 * A FileSystem that passes every call to another one (normally the real one) and makes exactly
 * one of them fail: the Nth read step or the Nth write step, with the errno asked for. Read steps
 * are everything that only looks (read, stat, realpath, readdir, open for reading or updating);
 * write steps are everything that changes the disk (write, truncate, sync, datasync, create,
 * rename, link, unlink, directory sync, utimes). Blocking reads and writes (readSync, writeSync)
 * are steps too, so the copy real files take is faulted like the async one. With `kill` the
 * process dies on the spot (SIGKILL: no cleanup code runs) instead. Without a plan it only counts
 * and logs.
 */
import * as path from 'node:path';
import type { FileHandleLike, FileSystem, OpenMode } from '../../src/io/file/file.js';

export type StepKind = 'read' | 'write';

export interface FaultPlan {
  kind: StepKind;
  /** 1-based number of the step of that kind that fails. */
  at: number;
  code: 'ENOSPC' | 'EIO';
  /** Kill the process (SIGKILL) at that step instead of failing it: a crash, not an error. */
  kill?: boolean;
}

/** What an injected failure looks like: a Node system error with an errno code. */
export function systemError(code: string, call: string): NodeJS.ErrnoException {
  const message = code === 'ENOSPC' ? 'no space left on device' : 'i/o error';
  return Object.assign(new Error(`${code}: ${message}, ${call} (injected)`), { code, syscall: call.split(' ')[0] });
}

export class FaultyFileSystem implements FileSystem {
  reads = 0;
  writes = 0;
  /** Steps taken through readSync/writeSync (counted in reads and writes too). */
  blockingSteps = 0;
  /** Every step, in order: "read stat base.img", "write write vm.cow @8192+17", ... */
  readonly log: string[] = [];
  /** The write steps alone, in order (entry N - 1 is write step N): "write vm.cow @0+4128", "sync base.img", ... */
  readonly writeLog: string[] = [];
  /** The step that failed, when the plan's step was reached. */
  injected: string | undefined;

  constructor(
    private readonly inner: FileSystem,
    private readonly plan?: FaultPlan,
  ) {}

  /** Counts a step and throws the planned failure when it is the one. */
  private step(kind: StepKind, call: string): void {
    const count = kind === 'read' ? ++this.reads : ++this.writes;
    this.log.push(`${kind} ${call}`);
    if (kind === 'write') this.writeLog.push(call);
    if (this.plan && this.plan.kind === kind && this.plan.at === count) {
      if (this.plan.kill) process.kill(process.pid, 'SIGKILL');
      this.injected = `${kind} #${count}: ${call}`;
      throw systemError(this.plan.code, call);
    }
  }

  private async counted<T>(kind: StepKind, call: string, run: () => Promise<T>): Promise<T> {
    this.step(kind, call);
    return run();
  }

  private wrap(handle: FileHandleLike, file: string): FileHandleLike {
    const name = path.basename(file);
    const counted = <T>(kind: StepKind, call: string, run: () => Promise<T>) => this.counted(kind, call, run);
    const step = (kind: StepKind, call: string) => this.step(kind, call);
    const blocking: Pick<FileHandleLike, 'readSync' | 'writeSync'> = {};
    if (handle.readSync && handle.writeSync) {
      const { readSync, writeSync } = { readSync: handle.readSync.bind(handle), writeSync: handle.writeSync.bind(handle) };
      blocking.readSync = (buffer, offset, length, position) => {
        this.blockingSteps++;
        step('read', `read ${name} @${position}+${length}`);
        return readSync(buffer, offset, length, position);
      };
      blocking.writeSync = (buffer, offset, length, position) => {
        this.blockingSteps++;
        step('write', `write ${name} @${position}+${length}`);
        writeSync(buffer, offset, length, position);
      };
    }
    return {
      ...blocking,
      get fd() {
        return handle.fd;
      },
      read: (buffer, offset, length, position) => counted('read', `read ${name} @${position}+${length}`, () => handle.read(buffer, offset, length, position)),
      write: (buffer, offset, length, position) => counted('write', `write ${name} @${position}+${length}`, () => handle.write(buffer, offset, length, position)),
      datasync: () => counted('write', `datasync ${name}`, () => handle.datasync()),
      sync: () => counted('write', `sync ${name}`, () => handle.sync()),
      truncate: (length) => counted('write', `truncate ${name} ${length}`, () => handle.truncate(length)),
      stat: () => counted('read', `fstat ${name}`, () => handle.stat()),
      close: () => handle.close(),
    };
  }

  async open(file: string, mode: OpenMode): Promise<FileHandleLike> {
    this.step(mode === 'wx' ? 'write' : 'read', `open ${path.basename(file)} ${mode}`);
    return this.wrap(await this.inner.open(file, mode), file);
  }

  stat(file: string) {
    return this.counted('read', `stat ${path.basename(file)}`, () => this.inner.stat(file));
  }

  realpath(file: string) {
    return this.counted('read', `realpath ${path.basename(file)}`, () => this.inner.realpath(file));
  }

  readdir(dir: string) {
    return this.counted('read', `readdir ${path.basename(dir)}`, () => this.inner.readdir(dir));
  }

  rename(from: string, to: string) {
    return this.counted('write', `rename ${path.basename(from)} ${path.basename(to)}`, () => this.inner.rename(from, to));
  }

  link(existing: string, newPath: string) {
    return this.counted('write', `link ${path.basename(existing)} ${path.basename(newPath)}`, () => this.inner.link(existing, newPath));
  }

  unlink(file: string) {
    return this.counted('write', `unlink ${path.basename(file)}`, () => this.inner.unlink(file));
  }

  syncDirectory(dir: string) {
    return this.counted('write', `fsync-dir ${path.basename(dir)}`, () => this.inner.syncDirectory(dir));
  }

  utimes(file: string, atime: number, mtime: number) {
    return this.counted('write', `utimes ${path.basename(file)}`, () => this.inner.utimes(file, atime, mtime));
  }

  chmod(file: string, mode: number) {
    return this.counted('write', `chmod ${path.basename(file)}`, () => this.inner.chmod(file, mode));
  }

  makeTempFolder(prefix: string) {
    return this.counted('write', `mkdtemp ${path.basename(prefix)}`, () => this.inner.makeTempFolder(prefix));
  }

  removeTree(folder: string) {
    return this.counted('write', `rm -r ${path.basename(folder)}`, () => this.inner.removeTree(folder));
  }
}

/** Words a message uses for an errno: its code or the plain-English reason. */
export function mentionsErrno(message: string, code: string): boolean {
  const reason = code === 'ENOSPC' ? 'no space left on device' : 'input/output error';
  return message.includes(code) || message.toLowerCase().includes(reason);
}
