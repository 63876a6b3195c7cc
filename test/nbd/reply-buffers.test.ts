import { describe, expect, it } from 'vitest';
import { ReplyBufferPool } from '../../src/nbd/reply-buffers.js';

describe('ReplyBufferPool', () => {
  it('gives back the memory of a returned buffer for the next reply of its size class, never one still out', () => {
    const pool = new ReplyBufferPool(1 << 20);
    const first = pool.take((256 << 10) + 16);
    expect(first.length).toBe((256 << 10) + 16);
    expect(first.buffer.byteLength).toBe((256 << 10) + 4096);
    const second = pool.take(256 << 10);
    expect(second.buffer).not.toBe(first.buffer);
    pool.give(first);
    const third = pool.take(200 << 10);
    expect(third.buffer).toBe(first.buffer);
    expect(pool.take(256 << 10).buffer).not.toBe(first.buffer);
  });

  it('keeps at most maxPooledBytes, and small buffers not at all', () => {
    const pool = new ReplyBufferPool(300 << 10);
    const a = pool.take(256 << 10);
    const b = pool.take(256 << 10);
    pool.give(a);
    pool.give(b);
    expect(pool.take(256 << 10).buffer).toBe(a.buffer);
    expect(pool.take(256 << 10).buffer).not.toBe(b.buffer);
    const small = pool.take(10_000);
    pool.give(small);
    expect(pool.take(10_000).buffer).not.toBe(small.buffer);
  });
});
