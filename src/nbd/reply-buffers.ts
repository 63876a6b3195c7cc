/**
 * Reuses the buffers READ replies are built in. A fresh 256 KiB Buffer per reply costs a malloc,
 * page faults as the kernel first writes it, and V8 garbage collections driven by the external
 * memory; nbdcopy sends thousands of such requests a second, so that was a large share of the
 * server's time.
 *
 * Invariant: a buffer is given back only after the socket has finished with it (the write's
 * callback), so a reused buffer is never one libuv is still sending. Buffers are kept by capacity
 * class (a power of two of at least 64 KiB, plus room for a reply header, so a 256 KiB read fits
 * a 260 KiB buffer); at most `maxPooledBytes` are kept, the rest are left to the garbage collector.
 */
const MIN_CLASS_BYTES = 64 << 10;
const HEADER_ROOM = 4096;

export class ReplyBufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(private readonly maxPooledBytes: number) {}

  /** A buffer of exactly `bytes` bytes (a view of a pooled one when the size is large enough). */
  take(bytes: number): Buffer {
    if (bytes < MIN_CLASS_BYTES) return Buffer.allocUnsafe(bytes);
    const capacity = capacityFor(bytes);
    const kept = this.free.get(capacity)?.pop();
    if (kept) {
      this.pooledBytes -= capacity;
      return kept.subarray(0, bytes);
    }
    return Buffer.allocUnsafeSlow(capacity).subarray(0, bytes);
  }

  /** Hands back a buffer from take() that nothing reads any more. */
  give(buffer: Buffer): void {
    const capacity = buffer.buffer.byteLength;
    if (buffer.byteOffset !== 0 || capacity < MIN_CLASS_BYTES + HEADER_ROOM || capacity !== capacityFor(capacity)) return;
    if (this.pooledBytes + capacity > this.maxPooledBytes) return;
    let list = this.free.get(capacity);
    if (!list) this.free.set(capacity, (list = []));
    list.push(Buffer.from(buffer.buffer, 0, capacity));
    this.pooledBytes += capacity;
  }
}

function capacityFor(bytes: number): number {
  let power = MIN_CLASS_BYTES;
  while (power + HEADER_ROOM < bytes) power *= 2;
  return power + HEADER_ROOM;
}
