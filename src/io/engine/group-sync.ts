/**
 * Group commit: many callers asking for a sync share one fdatasync. A caller that arrives while a
 * sync is running joins the NEXT one, because the running one may have started before the
 * caller's writes completed.
 */
export class GroupSync {
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;

  constructor(private readonly syncOnce: () => Promise<void>) {}

  request(): Promise<void> {
    if (this.queued) return this.queued;
    if (!this.running) return this.start();
    const previous = this.running;
    const queued = previous
      .catch(() => undefined)
      .then(() => {
        if (this.queued === queued) this.queued = undefined;
        return this.start();
      });
    this.queued = queued;
    return queued;
  }

  private start(): Promise<void> {
    const run = this.syncOnce().finally(() => {
      if (this.running === run) this.running = undefined;
    });
    this.running = run;
    return run;
  }
}
