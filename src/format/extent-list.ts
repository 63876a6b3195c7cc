/**
 * The one add-and-coalesce builder of extents: ranges [start, end) added in order, each merged
 * into the last one when it touches or overlaps it and carries the same label (a read plan's
 * "from the COW", an NBD status flag); otherwise appended. Every place that merges adjacent runs
 * (read plans, bitmap scans, allocation streams, diff ranges, map, NBD block status) builds with
 * it, so "adjacent runs merge" is decided once.
 *
 * Invariant: `extents` stays sorted, non-empty ranges, no two neighbours both touching and
 * carrying the same label. Streams take the finished extents (all but the last, which may still
 * grow) with `takeFinished`, and the rest with `takeAll` at the end.
 */

/** A range [start, end) of sectors or bytes. */
export interface Extent {
  start: number;
  end: number;
}

/** An extent with a label: neighbours merge only when their labels are equal. */
export interface LabelledExtent<L> extends Extent {
  label: L;
}

export class ExtentList<L = true> {
  extents: LabelledExtent<L>[] = [];

  get length(): number {
    return this.extents.length;
  }

  get last(): LabelledExtent<L> | undefined {
    return this.extents[this.extents.length - 1];
  }

  /** True when [start, ...) with `label` would grow the last extent rather than start a new one. */
  joinsLast(start: number, label: L): boolean {
    const last = this.last;
    return last !== undefined && start <= last.end && last.label === label;
  }

  /** Adds [start, end) (start at or after the last extent's start); empty ranges are ignored. */
  add(start: number, end: number, label: L = true as L): void {
    if (end <= start) return;
    const last = this.last;
    if (last && start <= last.end && last.label === label) {
      if (end > last.end) last.end = end;
    } else {
      this.extents.push({ start, end, label });
    }
  }

  /** Removes and returns the extents that can no longer grow (all but the last). */
  takeFinished(): LabelledExtent<L>[] {
    if (this.extents.length <= 1) return [];
    const done = this.extents.slice(0, -1);
    this.extents = this.extents.slice(-1);
    return done;
  }

  /** Removes and returns every extent. */
  takeAll(): LabelledExtent<L>[] {
    const all = this.extents;
    this.extents = [];
    return all;
  }
}
