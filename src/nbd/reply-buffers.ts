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
/** The slab small replies are carved from (see carve). */
const SLAB_BYTES = 1 << 20;

export class ReplyBufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(private readonly maxPooledBytes: number) {}

  /** A buffer of exactly `bytes` bytes (a view of a pooled one when the size is large enough). */
  take(bytes: number): Buffer {
    if (bytes < MIN_CLASS_BYTES) return this.carve(bytes);
    const capacity = capacityFor(bytes);
    const kept = this.free.get(capacity)?.pop();
    if (kept) {
      this.pooledBytes -= capacity;
      return kept.subarray(0, bytes);
    }
    return Buffer.allocUnsafeSlow(capacity).subarray(0, bytes);
  }

  /**
   * A small reply carved from a shared slab, never reused: a 4 KiB read's reply (4 KiB + its
   * header) is over Node's own pool limit, so allocUnsafe made an ArrayBuffer per reply (a malloc
   * and external memory that drives garbage collections); one slab serves ~250 of them and is
   * freed by the garbage collector once none of its replies is referenced.
   */
  private carve(bytes: number): Buffer {
    if (bytes > SLAB_BYTES / 8) return Buffer.allocUnsafe(bytes);
    if (this.slab === undefined || this.slabUsed + bytes > SLAB_BYTES) {
      this.slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.slabUsed = 0;
    }
    const out = this.slab.subarray(this.slabUsed, this.slabUsed + bytes);
    // 8-byte aligned, as Node's pool keeps its slices.
    this.slabUsed += (bytes + 7) & ~7;
    return out;
  }

  private slab: Buffer | undefined;
  private slabUsed = 0;

  /** Hands back a buffer from take() that nothing reads any more. */
  give(buffer: Buffer): void {
    const capacity = buffer.buffer.byteLength;
    // Slices of the small-reply slab (SLAB_BYTES is no capacity class) are never pooled.
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
