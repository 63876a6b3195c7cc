/* TransmissionSlots: capacity, arrival order, cancelled waits take nothing, cancelAll at shutdown. */
import { describe, expect, it } from 'vitest';
import { SlotWaitCancelled, TransmissionSlots } from '../../src/nbd/slots.js';

const settle = () => new Promise((resolve) => setImmediate(resolve));

describe('TransmissionSlots', () => {
  it('grants up to capacity at once, then one per release in arrival order; a cancelled wait is skipped', async () => {
    const slots = new TransmissionSlots(2);
    const first = slots.acquire();
    const second = slots.acquire();
    expect([first.queued, second.queued]).toEqual([false, false]);
    const granted: string[] = [];
    const waits = ['a', 'b', 'c'].map((name) => {
      const wait = slots.acquire();
      wait.granted.then(() => granted.push(name), (err: unknown) => granted.push(`${name}: ${(err as Error).message}`));
      return wait;
    });
    expect(waits.every((w) => w.queued)).toBe(true);
    expect(slots.waiting).toBe(3);
    waits[1]!.cancel('left');
    await settle();
    expect(granted).toEqual(['b: left']);
    slots.release();
    await settle();
    expect(granted).toEqual(['b: left', 'a']);
    expect(slots.inUse).toBe(2);
    slots.release();
    slots.release();
    await settle();
    expect(granted).toEqual(['b: left', 'a', 'c']);
    expect(slots.inUse).toBe(1);
    waits[2]!.cancel('too late: already granted');
    slots.release();
    expect(slots.inUse).toBe(0);
  });

  it('cancelAll ends every wait with SlotWaitCancelled and leaves the slots as they were', async () => {
    const slots = new TransmissionSlots(1);
    slots.acquire();
    const waits = [slots.acquire(), slots.acquire()];
    slots.cancelAll('server is shutting down');
    for (const wait of waits) await expect(wait.granted).rejects.toBeInstanceOf(SlotWaitCancelled);
    expect(slots.waiting).toBe(0);
    expect(slots.inUse).toBe(1);
  });
});
