import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { JOURNAL_PAGE, type RedoEntry } from './redo-journal.js';

/*
 * Changes to a disk held back from it: whole 4 KiB pages (aligned on the virtual disk) that
 * overlay the disk's current bytes. A page is staged whole (read-modify-write on first touch), so
 * what is finally written to a COW is whole pages, as the UML kernel needs. Reads see the staged
 * pages over the disk; the disk itself is only ever read.
 *
 * Pages live in memory up to a budget; past it the least recently used page goes to a slot of a
 * spill file (the redo journal itself, so a large upload is written once before it is applied)
 * and is read and rewritten there.
 */

/** The disk as it is: only ever read. */
export interface PageBase {
  size: number;
  read(offset: number, into: Uint8Array): Promise<void>;
}

/** Where pages go when memory is full: numbered 4 KiB slots. */
export interface SpillSlots {
  writeSlot(slot: number, data: Uint8Array): Promise<void>;
  readSlot(slot: number, into: Uint8Array): Promise<void>;
}

/** A spill file nobody else can see (created and unlinked at once), for runs that keep nothing (dry runs). */
export function anonymousSpill(): SpillSlots & { close(): void } {
  const file = path.join(os.tmpdir(), `ubdcow-stage-${process.pid}-${Math.random().toString(36).slice(2)}`);
  const fd = fs.openSync(file, 'wx+', 0o600);
  fs.unlinkSync(file);
  return {
    async writeSlot(slot, data) {
      fs.writeSync(fd, data, 0, JOURNAL_PAGE, slot * JOURNAL_PAGE);
    },
    async readSlot(slot, into) {
      fs.readSync(fd, into, 0, JOURNAL_PAGE, slot * JOURNAL_PAGE);
    },
    close: () => fs.closeSync(fd),
  };
}

export class StagedPages {
  /** In memory, least recently used first (a Map keeps insertion order; a touch re-inserts). */
  private readonly memory = new Map<number, Uint8Array>();
  private readonly spilled = new Map<number, number>();
  private nextSlot = 0;
  private readonly maxMemoryPages: number;
  private readonly scratch = new Uint8Array(JOURNAL_PAGE);

  constructor(
    private readonly base: PageBase,
    private readonly spill: SpillSlots,
    memoryBytes = 256 << 20,
  ) {
    this.maxMemoryPages = Math.max(16, Math.floor(memoryBytes / JOURNAL_PAGE));
  }

  get size(): number {
    return this.base.size;
  }

  /** Number of distinct pages changed so far. */
  get pageCount(): number {
    return this.memory.size + this.spilled.size;
  }

  /** Bytes of page `page` that lie on the disk (the last page of an odd-sized disk is shorter). */
  private pageBytes(page: number): number {
    return Math.min(JOURNAL_PAGE, this.base.size - page * JOURNAL_PAGE);
  }

  private async readBase(page: number, into: Uint8Array): Promise<void> {
    const bytes = this.pageBytes(page);
    await this.base.read(page * JOURNAL_PAGE, into.subarray(0, bytes));
    if (bytes < JOURNAL_PAGE) into.fill(0, bytes);
  }

  async read(offset: number, into: Uint8Array): Promise<void> {
    const end = offset + into.length;
    let position = offset;
    while (position < end) {
      const page = Math.floor(position / JOURNAL_PAGE);
      const inPage = position - page * JOURNAL_PAGE;
      const staged = await this.stagedPage(page, false);
      if (staged) {
        const length = Math.min(JOURNAL_PAGE - inPage, end - position);
        into.set(staged.subarray(inPage, inPage + length), position - offset);
        position += length;
        continue;
      }
      // Unstaged pages in a row: one read of the disk.
      let runEnd = (page + 1) * JOURNAL_PAGE;
      while (runEnd < end && !this.isStaged(Math.floor(runEnd / JOURNAL_PAGE))) runEnd += JOURNAL_PAGE;
      const length = Math.min(runEnd, end) - position;
      await this.base.read(position, into.subarray(position - offset, position - offset + length));
      position += length;
    }
  }

  private isStaged(page: number): boolean {
    return this.memory.has(page) || this.spilled.has(page);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    const end = offset + data.length;
    let position = offset;
    while (position < end) {
      const page = Math.floor(position / JOURNAL_PAGE);
      const inPage = position - page * JOURNAL_PAGE;
      const length = Math.min(JOURNAL_PAGE - inPage, end - position);
      const whole = inPage === 0 && length >= this.pageBytes(page);
      const staged = (await this.stagedPage(page, true, whole))!;
      staged.set(data.subarray(position - offset, position - offset + length), inPage);
      await this.touched(page, staged);
      position += length;
    }
  }

  /**
   * The staged copy of `page`, or undefined when it has none and `create` is false. Spilled pages
   * come back into memory (the scratch buffer when only read). A new page starts as the disk's
   * bytes unless the caller overwrites it whole.
   */
  private async stagedPage(page: number, create: boolean, whole = false): Promise<Uint8Array | undefined> {
    const inMemory = this.memory.get(page);
    if (inMemory) return inMemory;
    const slot = this.spilled.get(page);
    if (slot !== undefined) {
      const into = create ? new Uint8Array(JOURNAL_PAGE) : this.scratch;
      await this.spill.readSlot(slot, into);
      return into;
    }
    if (!create) return undefined;
    const fresh = new Uint8Array(JOURNAL_PAGE);
    if (!whole) await this.readBase(page, fresh);
    return fresh;
  }

  /** Records a written page: back into its slot if it lives there, else in memory (spilling the coldest). */
  private async touched(page: number, data: Uint8Array): Promise<void> {
    const slot = this.spilled.get(page);
    if (slot !== undefined) {
      await this.spill.writeSlot(slot, data);
      return;
    }
    this.memory.delete(page);
    this.memory.set(page, data);
    while (this.memory.size > this.maxMemoryPages) {
      const [coldest, bytes] = this.memory.entries().next().value as [number, Uint8Array];
      this.memory.delete(coldest);
      const target = this.nextSlot++;
      await this.spill.writeSlot(target, bytes);
      this.spilled.set(coldest, target);
    }
  }

  /** Writes the pages still in memory to slots; returns every page's entry, by page number. */
  async settle(): Promise<{ entries: RedoEntry[]; slots: number }> {
    const entries: RedoEntry[] = [];
    for (const [page, slot] of this.spilled) {
      await this.spill.readSlot(slot, this.scratch);
      entries.push({ page, slot, crc: crc32(this.scratch) });
    }
    for (const [page, bytes] of this.memory) {
      const slot = this.nextSlot++;
      await this.spill.writeSlot(slot, bytes);
      entries.push({ page, slot, crc: crc32(bytes) });
      this.spilled.set(page, slot);
    }
    this.memory.clear();
    entries.sort((a, b) => a.page - b.page);
    return { entries, slots: this.nextSlot };
  }
}
