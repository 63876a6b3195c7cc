/**
 * An in-memory FileSystem for engine tests. Every read, write and datasync is an operation that
 * completes when the test's scheduler says so (in random order, or at once), its effect applied
 * at completion. It records a log of completed operations (for crash tests), checks invariants
 * as I/O happens, and can inject failures.
 */
import type { FileHandleLike, FileStat, FileSystem, OpenMode } from '../../src/io/file/file.js';

export interface MemoryFile {
  data: Uint8Array;
  length: number;
  mtime: number;
}

export interface LoggedWrite {
  kind: 'write';
  path: string;
  position: number;
  bytes: Uint8Array;
  /** Sequence number when issued and when completed. */
  issued: number;
  completed: number;
  /** Done with writeSync (see MemoryFileSystem.blockingWrites). */
  blocking?: boolean;
}

export interface LoggedSync {
  kind: 'sync';
  path: string;
  issued: number;
  completed: number;
}

export type LoggedOp = LoggedWrite | LoggedSync;

interface QueuedOp {
  run: () => void;
  fail: (err: Error) => void;
}

export interface WriteObserver {
  /** Called when a write is issued (before it completes); throw to flag an invariant violation. */
  onWriteIssued?(path: string, position: number, bytes: Uint8Array, inFlight: InFlightWrite[]): void;
  /** Called when a write completes, with the bytes as they were at issue. */
  onWriteCompleted?(path: string, position: number, bytesAtIssue: Uint8Array, bytesNow: Uint8Array): void;
}

export interface InFlightWrite {
  path: string;
  position: number;
  length: number;
}

export type FailRule = (op: { kind: 'read' | 'write' | 'sync'; path: string; position: number; length: number }) => string | undefined;

export class MemoryFileSystem implements FileSystem {
  readonly files = new Map<string, MemoryFile>();
  readonly log: LoggedOp[] = [];
  readonly inFlightWrites = new Set<InFlightWrite>();
  sequence = 0;
  private readonly queue: QueuedOp[] = [];
  /** 'immediate' completes each op on the next microtask; 'random' waits for `step()`. */
  mode: 'immediate' | 'random' = 'immediate';
  random: () => number = Math.random;
  observer: WriteObserver = {};
  failRule: FailRule | undefined;
  /**
   * Handles opened while this is true also have writeSync, as real files do: a blocking write
   * that is issued and completes at once, before any queued op (the engine's blocking paths).
   */
  blockingWrites = false;

  addFile(path: string, data: Uint8Array, mtime = 1_700_000_000): void {
    const copy = new Uint8Array(data.length);
    copy.set(data);
    this.files.set(path, { data: copy, length: data.length, mtime });
  }

  /** A zero-filled file of `length` bytes without allocating them all up front. */
  addEmptyFile(path: string, length: number, mtime = 1_700_000_000): void {
    this.files.set(path, { data: new Uint8Array(0), length, mtime });
  }

  contents(path: string): Uint8Array {
    const file = this.get(path);
    const out = new Uint8Array(file.length);
    out.set(file.data.subarray(0, Math.min(file.length, file.data.length)));
    return out;
  }

  get pendingCount(): number {
    return this.queue.length;
  }

  /** Completes one queued operation chosen at random; returns false when none is queued. */
  step(): boolean {
    if (this.queue.length === 0) return false;
    const index = Math.floor(this.random() * this.queue.length);
    const [op] = this.queue.splice(index, 1);
    op.run();
    return true;
  }

  /** Runs the scheduler until `until` settles, completing ops in random order. */
  async drive<T>(until: Promise<T>): Promise<T> {
    let settled = false;
    const result = until.finally(() => {
      settled = true;
    });
    result.catch(() => undefined);
    let idle = 0;
    while (!settled) {
      if (!this.step()) {
        idle++;
        if (idle > 10_000) throw new Error('scheduler idle: some request never completes');
      } else idle = 0;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    return result;
  }

  private get(path: string): MemoryFile {
    const file = this.files.get(path);
    if (!file) throw Object.assign(new Error(`ENOENT: ${path}`), { code: 'ENOENT' });
    return file;
  }

  private schedule<T>(run: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const op: QueuedOp = {
        run: () => {
          try {
            resolve(run());
          } catch (err) {
            reject(err);
          }
        },
        fail: reject,
      };
      if (this.mode === 'immediate') queueMicrotask(op.run);
      else this.queue.push(op);
    });
  }

  private injected(kind: 'read' | 'write' | 'sync', path: string, position: number, length: number): Error | undefined {
    const code = this.failRule?.({ kind, path, position, length });
    return code ? Object.assign(new Error(`${code}: injected on ${kind} of ${path}`), { code }) : undefined;
  }

  readAt(path: string, buffer: Uint8Array, offset: number, length: number, position: number): number {
    const file = this.get(path);
    const available = Math.max(0, Math.min(length, file.length - position));
    const fromData = Math.max(0, Math.min(available, file.data.length - position));
    if (fromData > 0) buffer.set(file.data.subarray(position, position + fromData), offset);
    buffer.fill(0, offset + fromData, offset + available);
    return available;
  }

  writeAt(path: string, bytes: Uint8Array, position: number): void {
    const file = this.get(path);
    const end = position + bytes.length;
    if (end > file.data.length) {
      const grown = new Uint8Array(Math.max(end, Math.min(file.length, end * 2)));
      grown.set(file.data);
      file.data = grown;
    }
    file.data.set(bytes, position);
    file.length = Math.max(file.length, end);
  }

  /** A blocking write: issued, checked against the fail rule and completed in one step. */
  private writeSyncAt(path: string, writable: boolean, buffer: Uint8Array, offset: number, length: number, position: number): void {
    if (!writable) throw Object.assign(new Error('EBADF: read-only'), { code: 'EBADF' });
    const bytes = buffer.slice(offset, offset + length);
    this.observer.onWriteIssued?.(path, position, bytes, [...this.inFlightWrites]);
    const issued = this.sequence++;
    const err = this.injected('write', path, position, length);
    if (err) throw err;
    this.observer.onWriteCompleted?.(path, position, bytes, buffer.subarray(offset, offset + length));
    this.writeAt(path, bytes, position);
    this.log.push({ kind: 'write', path, position, bytes, issued, completed: this.sequence++, blocking: true });
  }

  handle(path: string, writable: boolean): FileHandleLike {
    const fsys = this;
    let closed = false;
    const check = () => {
      if (closed) throw Object.assign(new Error('EBADF: closed'), { code: 'EBADF' });
    };
    return {
      read(buffer, offset, length, position) {
        check();
        const err = fsys.injected('read', path, position, length);
        return fsys.schedule(() => {
          if (err) throw err;
          return fsys.readAt(path, buffer, offset, length, position);
        });
      },
      write(buffer, offset, length, position) {
        check();
        if (!writable) return Promise.reject(Object.assign(new Error('EBADF: read-only'), { code: 'EBADF' }));
        const bytesAtIssue = buffer.slice(offset, offset + length);
        const live = buffer.subarray(offset, offset + length);
        const entry: InFlightWrite = { path, position, length };
        fsys.observer.onWriteIssued?.(path, position, bytesAtIssue, [...fsys.inFlightWrites]);
        fsys.inFlightWrites.add(entry);
        const issued = fsys.sequence++;
        const err = fsys.injected('write', path, position, length);
        return fsys.schedule(() => {
          fsys.inFlightWrites.delete(entry);
          if (err) throw err;
          fsys.observer.onWriteCompleted?.(path, position, bytesAtIssue, live);
          fsys.writeAt(path, bytesAtIssue, position);
          fsys.log.push({ kind: 'write', path, position, bytes: bytesAtIssue, issued, completed: fsys.sequence++ });
        });
      },
      ...(fsys.blockingWrites ? { writeSync: (buffer: Uint8Array, offset: number, length: number, position: number) => {
              check();
              fsys.writeSyncAt(path, writable, buffer, offset, length, position);
            },
          } : {}),
      datasync() {
        check();
        const issued = fsys.sequence++;
        const err = fsys.injected('sync', path, 0, 0);
        return fsys.schedule(() => {
          if (err) throw err;
          fsys.log.push({ kind: 'sync', path, issued, completed: fsys.sequence++ });
        });
      },
      sync() {
        return this.datasync();
      },
      async truncate(length) {
        check();
        const file = fsys.get(path);
        file.length = length;
        if (file.data.length > length) file.data = file.data.slice(0, length);
      },
      async stat() {
        return fsys.statOf(path);
      },
      async close() {
        closed = true;
      },
    };
  }

  statOf(path: string): FileStat {
    const file = this.get(path);
    return { size: file.length, mtime: file.mtime, allocated: file.data.length, kind: 'file', rdev: 0 };
  }

  async open(path: string, mode: OpenMode): Promise<FileHandleLike> {
    if (mode === 'wx') {
      if (this.files.has(path)) throw Object.assign(new Error(`EEXIST: ${path}`), { code: 'EEXIST' });
      this.addFile(path, new Uint8Array(0));
    } else this.get(path);
    return this.handle(path, mode !== 'r');
  }

  async stat(path: string): Promise<FileStat> {
    return this.statOf(path);
  }

  async rename(from: string, to: string): Promise<void> {
    this.files.set(to, this.get(from));
    this.files.delete(from);
  }

  async link(existing: string, newPath: string): Promise<void> {
    if (this.files.has(newPath)) throw Object.assign(new Error(`EEXIST: ${newPath}`), { code: 'EEXIST' });
    this.files.set(newPath, this.get(existing));
  }

  async unlink(path: string): Promise<void> {
    this.get(path);
    this.files.delete(path);
  }

  async realpath(path: string): Promise<string> {
    return path;
  }

  async readdir(): Promise<string[]> {
    return [...this.files.keys()];
  }

  async syncDirectory(): Promise<void> {}

  async utimes(path: string, _atime: number, mtime: number): Promise<void> {
    this.get(path).mtime = mtime;
  }

  async chmod(path: string): Promise<void> {
    this.get(path);
  }

  private folders = 0;

  async makeTempFolder(prefix: string): Promise<string> {
    return `${prefix}${++this.folders}`;
  }

  async removeTree(folder: string): Promise<void> {
    for (const path of [...this.files.keys()]) if (path.startsWith(`${folder}/`)) this.files.delete(path);
  }

  /** A new file system holding a copy of the given files' contents (e.g. a crash state). */
  static fromContents(files: Map<string, { data: Uint8Array; mtime: number }>): MemoryFileSystem {
    const fsys = new MemoryFileSystem();
    for (const [path, { data, mtime }] of files) fsys.addFile(path, data, mtime);
    return fsys;
  }
}

/** Files as they were before a workload, plus the writes that completed before `cut`, in completion order. */
export function stateAt(
  initial: Map<string, Uint8Array>,
  log: LoggedOp[],
  include: (write: LoggedWrite) => boolean,
): Map<string, Uint8Array> {
  const state = new Map<string, Uint8Array>();
  for (const [path, data] of initial) state.set(path, data.slice());
  const writes = log.filter((op): op is LoggedWrite => op.kind === 'write' && include(op)).sort((a, b) => a.completed - b.completed);
  for (const write of writes) {
    const current = state.get(write.path) ?? new Uint8Array(0);
    const end = write.position + write.bytes.length;
    const next = end > current.length ? new Uint8Array(end) : current;
    if (next !== current) next.set(current);
    next.set(write.bytes, write.position);
    state.set(write.path, next);
  }
  return state;
}
