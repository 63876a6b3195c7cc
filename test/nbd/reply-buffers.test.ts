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
    small.fill(0x5a);
    pool.give(small);
    const next = pool.take(10_000);
    next.fill(0xa5);
    expect(small.every((byte) => byte === 0x5a)).toBe(true);
  });

  it('carves small replies (a 4 KiB read and its header) from shared slabs, each its own bytes, never reused', () => {
    const pool = new ReplyBufferPool(1 << 20);
    const replies = Array.from({ length: 600 }, (_, i) => {
      const reply = pool.take(4096 + 16);
      reply.fill(i & 0xff);
      return reply;
    });
    // Far fewer ArrayBuffers than replies: one malloc serves hundreds.
    expect(new Set(replies.map((reply) => reply.buffer)).size).toBeLessThanOrEqual(3);
    for (const reply of replies) expect(reply.length).toBe(4096 + 16);
    for (const reply of replies.slice(0, 300)) pool.give(reply);
    for (let i = 0; i < 300; i++) pool.take(4096 + 16).fill(0xee);
    replies.forEach((reply, i) => expect(reply.every((byte) => byte === (i & 0xff)), `reply ${i}`).toBe(true));
  });
});
