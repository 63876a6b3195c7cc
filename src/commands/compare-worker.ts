import { MessageChannel, type MessagePort, Worker } from 'node:worker_threads';
import { dataExtents } from '../io/file/index.js';
import type { OpenedFile } from '../io/image/index.js';

/*
 * The back part of a `rebase --rewrite` compare on a second thread. Copying the bases out of the
 * page cache is most of the command's work and one thread's worth; qemu-img reads its two bases on
 * two threads. So a worker compares windows [from, size) while the main thread compares (and
 * rewrites) [0, from); the worker sends back, per window, the offsets of the pages that differ and
 * the bytes of the chunks holding them (moved, not copied: about 5 % of the disk in the target
 * case), so every byte of every base is still read once.
 *
 * Invariant: the worker only reads (the descriptors the main thread holds open, which it keeps
 * open until the worker is terminated), and its answer is a hint the main thread can always
 * replace: if the worker fails (a read error, a short file, the thread dies), `take` answers
 * undefined from that window on and the main thread compares those windows itself, reporting
 * errors as it always does. The worker runs the same chunked compare as base-compare.ts (64 KiB
 * chunks, whole pages, hole against hole equal without reading).
 */

export interface RemoteCompareJob {
  fresh: OpenedFile;
  olds: OpenedFile[];
  from: number;
  size: number;
  windowBytes: number;
  chunkBytes: number;
  pageBytes: number;
}

interface WorkerFile {
  fd: number;
  /** Data extents of [from, size) as [start, end) pairs. */
  extents: Array<[number, number]>;
}

interface WorkerData {
  fresh: WorkerFile;
  olds: WorkerFile[];
  from: number;
  size: number;
  windowBytes: number;
  chunkBytes: number;
  pageBytes: number;
  /** Where the main thread returns the chunk buffers it is done with (read by the worker with receiveMessageOnPort). */
  recycled: MessagePort;
}

/** One window's answer: differing page offsets per old base, and the chunks holding them (offsets in the window). */
export interface WindowAnswer {
  start: number;
  differs: number[][];
  chunks: Array<{ at: number; fresh: Uint8Array; old: Array<Uint8Array | undefined> }>;
}

type WorkerMessage = { windows: WindowAnswer[] } | { failed: true };

/** Whether the files allow it: real descriptors read with blocking calls (not an injected file system). */
export function canCompareRemotely(files: OpenedFile[]): boolean {
  return files.every((file) => typeof file.handle.fd === 'number' && file.handle.readSync !== undefined);
}

export class RemoteCompare {
  private readonly results = new Map<number, WindowAnswer>();
  /** No more answers will come (the worker finished, failed or died): what is missing is done here. */
  private done = false;
  private waiting: (() => void) | undefined;

  private constructor(
    private readonly worker: Worker,
    private readonly recycled: MessagePort,
  ) {
    worker.on('message', (message: WorkerMessage) => {
      if ('failed' in message) this.done = true;
      else for (const window of message.windows) this.results.set(window.start, window);
      this.wake();
    });
    // Messages posted before the worker ended arrive before 'exit'.
    const stop = () => {
      this.done = true;
      this.wake();
    };
    worker.on('error', stop);
    worker.on('exit', stop);
  }

  static async start(job: RemoteCompareJob): Promise<RemoteCompare> {
    const extentsOf = async (file: OpenedFile): Promise<WorkerFile> => {
      const extents: Array<[number, number]> = [];
      for await (const extent of dataExtents(file.handle, job.from, job.size)) extents.push([extent.start, extent.end]);
      return { fd: file.handle.fd!, extents };
    };
    const { port1, port2 } = new MessageChannel();
    const workerData: WorkerData = {
      fresh: await extentsOf(job.fresh),
      olds: await Promise.all(job.olds.map(extentsOf)),
      from: job.from,
      size: job.size,
      windowBytes: job.windowBytes,
      chunkBytes: job.chunkBytes,
      pageBytes: job.pageBytes,
      recycled: port2,
    };
    const worker = new Worker(`(${compareInWorker.toString()})(require);`, { eval: true, workerData, transferList: [port2] });
    // The worker stays referenced: while the main thread waits in take() it is the only thing
    // that keeps the event loop alive (stop() ends it in every case). The return port need not.
    port1.unref();
    return new RemoteCompare(worker, port1);
  }

  /** Gives an answer's chunk buffers back to the worker (it reads into them again instead of new memory). */
  recycle(answer: WindowAnswer): void {
    const buffers: ArrayBuffer[] = [];
    for (const chunk of answer.chunks) for (const bytes of [chunk.fresh, ...chunk.old]) if (bytes) buffers.push(bytes.buffer as ArrayBuffer);
    if (buffers.length > 0) this.recycled.postMessage(buffers, buffers);
  }

  /** The answer for the window at `start`, or undefined: compare it here. */
  async take(start: number): Promise<WindowAnswer | undefined> {
    for (;;) {
      const answer = this.results.get(start);
      if (answer) {
        this.results.delete(start);
        return answer;
      }
      if (this.done) return undefined;
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
      });
    }
  }

  async stop(): Promise<void> {
    await this.worker.terminate();
    this.recycled.close();
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = undefined;
    waiting?.();
  }
}

/**
 * The worker's body, run from its source text (so it needs no file of its own beside the bundle):
 * only `require` and workerData from outside.
 */
function compareInWorker(require: NodeJS.Require): void {
  const { parentPort, workerData, receiveMessageOnPort } = require('node:worker_threads') as typeof import('node:worker_threads');
  const fs = require('node:fs') as typeof import('node:fs');
  const data = workerData as WorkerData;
  const { from, size, windowBytes, chunkBytes, pageBytes } = data;
  const cursors = [data.fresh, ...data.olds].map((file) => ({ ...file, at: 0, scratch: Buffer.allocUnsafeSlow(chunkBytes) as Buffer }));
  const zeros = Buffer.alloc(chunkBytes);
  const hasData = (cursor: (typeof cursors)[number], start: number, end: number) => {
    while (cursor.at < cursor.extents.length && cursor.extents[cursor.at]![1] <= start) cursor.at++;
    return cursor.at < cursor.extents.length && cursor.extents[cursor.at]![0] < end;
  };
  const load = (cursor: (typeof cursors)[number], start: number, end: number): Buffer => {
    if (!hasData(cursor, start, end)) return zeros;
    for (let got = 0; got < end - start; ) {
      const n = fs.readSync(cursor.fd, cursor.scratch, got, end - start - got, start + got);
      if (n === 0) throw new Error('short read');
      got += n;
    }
    return cursor.scratch;
  };
  const [freshCursor, ...oldCursors] = cursors;
  let batch: WindowAnswer[] = [];
  let moving: ArrayBuffer[] = [];
  // A differing chunk's buffer itself is handed over (moved with the next message) and the cursor
  // reads into a new one; the shared zeros of a hole are copied.
  const handOver = (cursor: (typeof cursors)[number], bytes: Buffer, length: number): Uint8Array => {
    if (bytes !== cursor.scratch) {
      const copy = new Uint8Array(length);
      copy.set(bytes.subarray(0, length));
      moving.push(copy.buffer);
      return copy;
    }
    moving.push(bytes.buffer as ArrayBuffer);
    cursor.scratch = nextBuffer();
    return new Uint8Array(bytes.buffer, 0, length);
  };
  const free: ArrayBuffer[] = [];
  const nextBuffer = (): Buffer => {
    for (let message; free.length === 0 && (message = receiveMessageOnPort(data.recycled)); ) {
      for (const buffer of message.message as ArrayBuffer[]) if (buffer.byteLength === chunkBytes) free.push(buffer);
    }
    const buffer = free.pop();
    return buffer ? Buffer.from(buffer) : Buffer.allocUnsafeSlow(chunkBytes);
  };
  const send = () => {
    parentPort!.postMessage({ windows: batch }, moving);
    batch = [];
    moving = [];
  };
  try {
    for (let start = from; start < size; start += windowBytes) {
      const end = Math.min(size, start + windowBytes);
      const differs = oldCursors.map((): number[] => []);
      const chunks: WindowAnswer['chunks'] = [];
      for (let at = start; at < end; at += chunkBytes) {
        const to = Math.min(end, at + chunkBytes);
        const length = to - at;
        const freshHasData = hasData(freshCursor!, at, to);
        const fresh = load(freshCursor!, at, to);
        let chunk: WindowAnswer['chunks'][number] | undefined;
        for (const [index, old] of oldCursors.entries()) {
          if (!freshHasData && !hasData(old, at, to)) continue;
          const bytes = load(old, at, to);
          if (fresh.compare(bytes, 0, length, 0, length) === 0) continue;
          for (let page = 0; page < length; page += pageBytes) {
            const pageEnd = Math.min(length, page + pageBytes);
            if (fresh.compare(bytes, page, pageEnd, page, pageEnd) !== 0) differs[index]!.push(at - start + page);
          }
          chunk ??= { at: at - start, fresh: handOver(freshCursor!, fresh, length), old: [] };
          chunk.old[index] = handOver(old, bytes, length);
        }
        if (chunk) chunks.push(chunk);
      }
      batch.push({ start, differs, chunks });
      if (batch.length >= 8) send();
    }
    send();
  } catch {
    // The main thread compares this window itself and reports the error properly.
    send();
    parentPort!.postMessage({ failed: true });
  }
}
