interface Holder {
  start: number;
  end: number;
  granted: boolean;
  grant: () => void;
}

/**
 * Exclusive locks on sector ranges, granted in arrival order among overlapping ranges (FIFO), so
 * a stream of writes to one place cannot starve an earlier one. Disjoint ranges never wait.
 */
export class RangeLock {
  private readonly holders: Holder[] = [];

  /** Resolves with a release function once [start, end) is held. */
  acquire(start: number, end: number): Promise<() => void> {
    return new Promise((resolve) => {
      const holder: Holder = {
        start,
        end,
        granted: false,
        grant: () => resolve(() => this.release(holder)),
      };
      this.holders.push(holder);
      if (!this.blockedByEarlier(this.holders.length - 1)) this.grant(holder);
    });
  }

  private grant(holder: Holder): void {
    holder.granted = true;
    holder.grant();
  }

  private blockedByEarlier(index: number): boolean {
    const { start, end } = this.holders[index];
    for (let i = 0; i < index; i++) {
      const other = this.holders[i];
      if (other.start < end && start < other.end) return true;
    }
    return false;
  }

  private release(holder: Holder): void {
    const index = this.holders.indexOf(holder);
    if (index < 0) return;
    this.holders.splice(index, 1);
    for (let i = 0; i < this.holders.length; i++) {
      const candidate = this.holders[i];
      if (!candidate.granted && !this.blockedByEarlier(i)) this.grant(candidate);
    }
  }
}
