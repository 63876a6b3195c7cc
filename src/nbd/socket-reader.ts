/**
 * Exact-length reads from a socket with flow control: at most `highWater` bytes (or the one
 * message being waited for, if larger) are buffered before the socket is paused, so a client that
 * floods requests faster than they are served is slowed by TCP instead of growing our memory.
 * A read fails once the peer has closed (or `abort()` was called) before enough bytes arrived.
 */
import type { Socket } from 'node:net';

export class ConnectionClosed extends Error {
  constructor(reason = 'connection closed') {
    super(reason);
    this.name = 'ConnectionClosed';
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private wanted = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;

  constructor(
    private readonly socket: Socket,
    private readonly highWater = 1 << 20,
  ) {
    socket.on('data', (chunk: Buffer) => {
      if (this.failure) return;
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      if (this.buffered >= Math.max(this.highWater, this.wanted)) socket.pause();
      this.wake();
    });
    const closed = (err?: Error) => this.fail(new ConnectionClosed(err?.message ?? 'connection closed by the client'));
    socket.on('end', () => closed());
    socket.on('close', () => closed());
    socket.on('error', (err) => closed(err));
  }

  /** Exactly `length` bytes, in one Buffer. */
  read(length: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('SocketReader: one read at a time'));
    if (this.buffered >= length) return Promise.resolve(this.take(length));
    if (this.failure) return Promise.reject(this.failure);
    this.wanted = length;
    this.socket.resume();
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /**
   * Exactly `length` bytes when they are buffered already, else undefined (then `read`): the
   * request loop takes the requests of one socket read without a promise and a microtask each.
   */
  tryRead(length: number): Buffer | undefined {
    if (this.waiter || this.buffered < length) return undefined;
    return this.take(length);
  }

  /** Fails the pending read and every later one (used when the server shuts down). */
  abort(reason = 'server is shutting down'): void {
    this.fail(new ConnectionClosed(reason));
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.reject(err);
  }

  private wake(): void {
    if (this.waiter && this.buffered >= this.wanted) {
      const waiter = this.waiter;
      this.waiter = undefined;
      waiter.resolve(this.take(this.wanted));
    }
  }

  private take(length: number): Buffer {
    let out: Buffer;
    if (length === 0) {
      out = Buffer.alloc(0);
    } else if (this.chunks[0].length >= length) {
      const first = this.chunks[0];
      out = first.subarray(0, length);
      if (first.length === length) this.chunks.shift();
      else this.chunks[0] = first.subarray(length);
    } else {
      out = Buffer.allocUnsafe(length);
      let at = 0;
      while (at < length) {
        const first = this.chunks[0];
        const n = Math.min(first.length, length - at);
        first.copy(out, at, 0, n);
        at += n;
        if (n === first.length) this.chunks.shift();
        else this.chunks[0] = first.subarray(n);
      }
    }
    this.buffered -= length;
    this.wanted = 0;
    if (this.buffered < this.highWater && !this.failure) this.socket.resume();
    return out;
  }
}
