/**
 * The one writer of a connection's replies. Replies are buffers written through the socket, or
 * (READ replies of page-cached files) a header followed by file ranges sent with sendfile(2)
 * straight from the page cache to the socket: one copy of the data instead of two (pread into a
 * buffer, then write), no buffer to allocate, and no thread-pool round trip.
 *
 * Invariant: replies go out whole and in the order they were given. sendfile writes to the
 * socket behind libuv's back, so it runs only while libuv has nothing queued: a file reply's
 * header goes through libuv, whose writes complete in order, so when the header's write completes
 * every earlier reply is out; buffers given meanwhile wait behind the file reply. When the socket
 * is full, the next byte of the reply goes through libuv too, which waits for room on the event
 * loop; its completion says the socket takes data again. sendfile runs on the event loop, so it
 * is used only for ranges whose first and last bytes are in the page cache (a cold range is read
 * on the thread pool and written like any buffer, so one client's disk reads never stall the
 * others). The descriptor used is a dup() of the socket's, closed once no reply uses it.
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

export class ReplyWriter {
  private readonly queue: Item[] = [];
  private pumping = false;
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
    const ok = onWritten ? this.socket.write(data, () => onWritten()) : this.socket.write(data);
    if (ok) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
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
    const calls = this.calls!;
    await this.writeAndWait(header);
    for (const range of ranges) {
      if (!this.cached(range)) {
        await this.writeAndWait(await readRange(range));
        continue;
      }
      for (let done = 0; done < range.length; ) {
        if (this.socket.destroyed) throw new Error('the connection is closed');
        const sent = calls.sendFile(fd, range.fd, range.position + done, range.length - done);
        if (sent === 0) throw endsInside(range.position + done);
        if (sent !== undefined) {
          done += sent;
          continue;
        }
        // The socket is full: its next byte goes through libuv, which waits for room.
        const next = Buffer.allocUnsafe(1);
        if (fs.readSync(range.fd, next, 0, 1, range.position + done) !== 1) throw endsInside(range.position + done);
        await this.writeAndWait(next);
        done += 1;
      }
    }
  }

  /** Whether the first and last bytes of `range` are in the page cache (sendfile will not wait for the disk). */
  private cached(range: FileRange): boolean {
    const probe = this.probe;
    const calls = this.calls!;
    return calls.readCached(range.fd, probe, 0, 1, range.position) === 1 && calls.readCached(range.fd, probe, 0, 1, range.position + range.length - 1) === 1;
  }

  private readonly probe = Buffer.alloc(1);

  /** Writes through libuv and resolves once the bytes are in the socket. */
  private writeAndWait(data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.socket.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }
}

/** The bytes of `range`, read on the thread pool. */
async function readRange(range: FileRange): Promise<Buffer> {
  const buffer = Buffer.allocUnsafe(range.length);
  for (let done = 0; done < range.length; ) {
    const got = await new Promise<number>((resolve, reject) =>
      fs.read(range.fd, buffer, done, range.length - done, range.position + done, (err, bytes) => (err ? reject(err) : resolve(bytes))),
    );
    if (got === 0) throw endsInside(range.position + done);
    done += got;
  }
  return buffer;
}

function endsInside(position: number): Error {
  return new Error(`the file ends at byte ${position}, inside the reply`);
}
