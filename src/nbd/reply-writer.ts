/**
 * The one writer of a connection's replies. Replies are buffers written through the socket, or
 * (READ replies of page-cached files) a header followed by file ranges sent with sendfile(2)
 * straight from the page cache to the socket: one copy of the data instead of two (pread into a
 * buffer, then write), no buffer to allocate, and no thread-pool round trip.
 *
 * Invariant: replies go out whole and in the order they were given. sendfile writes to the
 * socket behind libuv's back, so a file reply starts only when every earlier buffer write has
 * completed (libuv has nothing queued), and buffers given meanwhile wait behind it. The
 * descriptor used is a dup() of the socket's, so closing the socket can never let a sendfile or
 * poll on the thread pool reach a descriptor number reused by another file.
 */
import type * as net from 'node:net';
import * as fs from 'node:fs';
import type { OsCalls } from '../os/libc.js';

/** A run of bytes of an open file (see NbdBlockDevice.withFileRanges). */
export interface FileRange {
  fd: number;
  position: number;
  length: number;
}

type Item = { kind: 'buffer'; data: Buffer; onWritten?: () => void } | { kind: 'file'; header: Buffer; ranges: FileRange[]; done: (err?: Error) => void };

/** How long one poll for writability blocks a thread-pool thread before the socket is looked at again. */
const POLL_SLICE_MS = 250;

export class ReplyWriter {
  private readonly queue: Item[] = [];
  private pumping = false;
  /** Socket writes not yet completed by libuv. */
  private pendingWrites = 0;
  private idleWaiters: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private corked = false;
  private rawFd: number | undefined;
  private rawClosed = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly calls: OsCalls | undefined,
  ) {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (calls && typeof fd === 'number' && fd >= 0) {
      try {
        this.rawFd = calls.dup(fd);
      } catch {
        this.rawFd = undefined;
      }
    }
    const wakeWriters = () => {
      for (const wake of this.drainWaiters.splice(0)) wake();
    };
    socket.on('drain', wakeWriters);
    socket.on('close', wakeWriters);
  }

  /** True when file ranges can be sent without copying them through a buffer. */
  get zeroCopy(): boolean {
    return this.rawFd !== undefined && !this.rawClosed;
  }

  /** Queues `data`; resolves once the socket can take more. `onWritten`: the socket is done with it. */
  write(data: Buffer, onWritten?: () => void): Promise<void> {
    if (this.socket.destroyed || !this.socket.writable) {
      onWritten?.();
      return Promise.resolve();
    }
    if (this.queue.length > 0 || this.pumping) {
      this.queue.push({ kind: 'buffer', data, onWritten });
      return Promise.resolve();
    }
    return this.socketWrite(data, onWritten);
  }

  /** Sends `header` then the bytes of `ranges`; resolves once all are in the socket. */
  sendFile(header: Buffer, ranges: FileRange[]): Promise<void> {
    if (this.socket.destroyed || !this.socket.writable) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.queue.push({ kind: 'file', header, ranges, done: (err) => (err ? reject(err) : resolve()) });
      void this.pump();
    });
  }

  /** Closes the duplicate descriptor once no file reply uses it (call when the connection ends). */
  close(): void {
    this.rawClosed = true;
    if (!this.pumping) this.closeRaw();
  }

  private closeRaw(): void {
    if (this.rawFd === undefined) return;
    const fd = this.rawFd;
    this.rawFd = undefined;
    try {
      this.calls!.closeFd(fd);
    } catch {
      // Nothing to do: the descriptor is gone either way.
    }
  }

  private socketWrite(data: Buffer, onWritten?: () => void): Promise<void> {
    if (!this.corked) {
      // Replies finished in the same turn of the event loop go out in one writev.
      this.corked = true;
      this.socket.cork();
      setImmediate(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    this.pendingWrites++;
    const ok = this.socket.write(data, () => {
      onWritten?.();
      if (--this.pendingWrites === 0) for (const wake of this.idleWaiters.splice(0)) wake();
    });
    if (ok) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** Resolves once libuv has completed every write given to the socket. */
  private idle(): Promise<void> {
    if (this.pendingWrites === 0) return Promise.resolve();
    if (this.corked) {
      this.corked = false;
      this.socket.uncork();
    }
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length > 0) {
        const item = this.queue.shift()!;
        if (item.kind === 'buffer') {
          if (this.socket.destroyed) item.onWritten?.();
          else await this.socketWrite(item.data, item.onWritten);
          continue;
        }
        try {
          await this.idle();
          if (this.socket.destroyed || this.rawFd === undefined) throw new Error('the connection is closed');
          await this.sendRaw(item.header, item.ranges);
          item.done();
        } catch (err) {
          // Part of the reply may be out: the stream cannot be resynchronised.
          this.socket.destroy();
          item.done(err as Error);
        }
      }
    } finally {
      this.pumping = false;
      if (this.rawClosed) this.closeRaw();
    }
  }

  private async sendRaw(header: Buffer, ranges: FileRange[]): Promise<void> {
    const fd = this.rawFd!;
    for (let done = 0; done < header.length; ) {
      let wrote: number | undefined;
      try {
        wrote = fs.writeSync(fd, header, done, header.length - done);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      }
      if (wrote) done += wrote;
      else await this.writable(fd);
    }
    for (const range of ranges) {
      for (let done = 0; done < range.length; ) {
        const sent = this.calls!.sendFile(fd, range.fd, range.position + done, range.length - done);
        if (sent === 0) throw new Error(`the file ends at byte ${range.position + done}, inside the reply`);
        if (sent === undefined) await this.writable(fd);
        else done += sent;
      }
    }
  }

  private async writable(fd: number): Promise<void> {
    for (;;) {
      if (this.socket.destroyed) throw new Error('the connection is closed');
      if (await this.calls!.waitWritable(fd, POLL_SLICE_MS).catch(() => false)) return;
    }
  }
}
