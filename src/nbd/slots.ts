/**
 * Transmission slots: at most `capacity` connections are in the transmission phase at once
 * (`serve --shared N`). A connection asks for a slot only when its client chooses the export
 * (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), so handshakes run concurrently and a client that stalls in
 * the handshake holds no slot. Clients asking while every slot is busy wait in arrival order and
 * get the next slot that frees, as qemu-nbd -e N serves clients beyond N one after another.
 */

import type { Socket } from 'node:net';

/** Why a wait for a slot ended without one. */
export class SlotWaitCancelled extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'SlotWaitCancelled';
  }
}

interface Waiter {
  grant: () => void;
  refuse: (err: Error) => void;
}

export class TransmissionSlots {
  private busy = 0;
  private readonly waiters: Waiter[] = [];

  constructor(readonly capacity: number) {}

  get inUse(): number {
    return this.busy;
  }

  get waiting(): number {
    return this.waiters.length;
  }

  /**
   * Resolves once a slot is this caller's (give it back with `release`). `cancel` returned
   * alongside ends the wait (the client left, the server stops): the promise then rejects with
   * SlotWaitCancelled and no slot is taken. Cancelling after the grant does nothing.
   */
  acquire(): { granted: Promise<void>; queued: boolean; cancel: (reason: string) => void } {
    if (this.busy < this.capacity && this.waiters.length === 0) {
      this.busy++;
      return { granted: Promise.resolve(), queued: false, cancel: () => undefined };
    }
    let waiter!: Waiter;
    const granted = new Promise<void>((grant, refuse) => {
      waiter = { grant, refuse };
    });
    this.waiters.push(waiter);
    const cancel = (reason: string) => {
      const at = this.waiters.indexOf(waiter);
      if (at < 0) return;
      this.waiters.splice(at, 1);
      waiter.refuse(new SlotWaitCancelled(reason));
    };
    return { granted, queued: true, cancel };
  }

  /** Gives a slot back; the longest waiter, if any, gets it at once. */
  release(): void {
    const next = this.waiters.shift();
    if (next) next.grant();
    else this.busy--;
  }

  /** Ends every wait (the server stops). */
  cancelAll(reason: string): void {
    for (const waiter of this.waiters.splice(0)) waiter.refuse(new SlotWaitCancelled(reason));
  }
}

/**
 * Waits for a slot for the connection on `socket`; false when the wait ended without one (the
 * client left, the server stops). Queueing, the grant and a cancelled wait are logged.
 */
export async function waitForSlot(slots: TransmissionSlots, socket: Socket, log: (line: string) => void): Promise<boolean> {
  if (socket.destroyed) return false;
  const wait = slots.acquire();
  if (wait.queued) log(`all ${slots.capacity} slots busy (--shared ${slots.capacity}): waiting, ${slots.waiting} in the queue`);
  const left = () => wait.cancel('left while waiting for a slot');
  socket.once('close', left);
  try {
    await wait.granted;
    if (wait.queued) log('got a slot: starting');
    return true;
  } catch (err) {
    if (!(err instanceof SlotWaitCancelled)) throw err;
    log(err.message);
    return false;
  } finally {
    socket.off('close', left);
  }
}
