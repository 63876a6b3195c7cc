import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { UbdcowError, fromSystemError } from '../../errors.js';
import type { FileHandleLike, FileSystem } from '../file/index.js';

/*
 * The redo journal of `ubdcow customize`, `IMAGE.ubdcow-customize`: every 4 KiB page of the
 * virtual disk the run changes, with its new contents. It is written while the run stages its
 * changes (pages that do not fit in memory go straight into their slot), completed by an index
 * and a trailer, synced (file and folder), and only then applied to the image; removed once the
 * image is synced. A journal whose trailer, index checksum or any page checksum does not verify
 * is incomplete: the run died before it was durable, so the image was never touched and the
 * journal is discarded. A complete one is replayed (writing the same pages again is idempotent).
 *
 * Layout (little-endian): a 4 KiB header, then one 4 KiB slot per page, then the index (16 bytes
 * per page: page number u64, slot u32, CRC-32 of the slot u32), then a 32-byte trailer.
 */

export const JOURNAL_PAGE = 4096;
const HEADER_BYTES = 4096;
const INDEX_ENTRY = 16;
const TRAILER_BYTES = 32;
const HEADER_MAGIC = 'UBDCOWRJ';
const TRAILER_MAGIC = 'UBDCOWRC';
const VERSION = 1;

export interface RedoEntry {
  /** Page number on the virtual disk (byte offset / 4096). */
  page: number;
  slot: number;
  crc: number;
}

export interface RedoJournalMeta {
  /** Size in bytes of the virtual disk the pages belong to. */
  diskSize: number;
  kind: 'cow' | 'raw';
}

export function customizeJournalPath(image: string): string {
  return `${image}.ubdcow-customize`;
}

export function slotOffset(slot: number): number {
  return HEADER_BYTES + slot * JOURNAL_PAGE;
}

function encodeHeader(meta: RedoJournalMeta): Uint8Array {
  const header = Buffer.alloc(HEADER_BYTES);
  header.write(HEADER_MAGIC, 0, 'latin1');
  header.writeUInt32LE(VERSION, 8);
  header.writeUInt32LE(JOURNAL_PAGE, 12);
  header.writeBigUInt64LE(BigInt(meta.diskSize), 16);
  header.writeUInt32LE(meta.kind === 'cow' ? 1 : 2, 24);
  header.writeBigUInt64LE(BigInt(Date.now()), 32);
  return header;
}

/** A journal being built: slots written as pages are staged, then index and trailer. */
export class RedoJournalWriter {
  private constructor(
    private readonly fs: FileSystem,
    readonly path: string,
    private readonly file: FileHandleLike,
    private readonly header: Uint8Array,
  ) {}

  /** Creates the journal (never replacing one: the caller has dealt with any earlier one). */
  static async create(fs: FileSystem, journalPath: string, meta: RedoJournalMeta): Promise<RedoJournalWriter> {
    let file: FileHandleLike;
    try {
      file = await fs.open(journalPath, 'wx+');
    } catch (err) {
      throw fromSystemError(err, journalPath, 'create the customize journal');
    }
    const header = encodeHeader(meta);
    const writer = new RedoJournalWriter(fs, journalPath, file, header);
    await writer.writeAt(header, 0);
    return writer;
  }

  private async writeAt(data: Uint8Array, position: number): Promise<void> {
    try {
      if (this.file.writeSync) this.file.writeSync(data, 0, data.length, position);
      else await this.file.write(data, 0, data.length, position);
    } catch (err) {
      throw fromSystemError(err, this.path, 'write the customize journal');
    }
  }

  writeSlot(slot: number, data: Uint8Array): Promise<void> {
    return this.writeAt(data, slotOffset(slot));
  }

  async readSlot(slot: number, into: Uint8Array): Promise<void> {
    try {
      const got = this.file.readSync ? this.file.readSync(into, 0, JOURNAL_PAGE, slotOffset(slot)) : await this.file.read(into, 0, JOURNAL_PAGE, slotOffset(slot));
      if (got !== JOURNAL_PAGE) throw new Error(`short read (${got} bytes)`);
    } catch (err) {
      throw fromSystemError(err, this.path, 'read the customize journal');
    }
  }

  /** Writes index and trailer after `slots` slots, syncs the file and its folder: the journal is complete. */
  async finish(entries: RedoEntry[], slots: number): Promise<void> {
    const index = Buffer.alloc(entries.length * INDEX_ENTRY);
    entries.forEach((entry, i) => {
      index.writeBigUInt64LE(BigInt(entry.page), i * INDEX_ENTRY);
      index.writeUInt32LE(entry.slot, i * INDEX_ENTRY + 8);
      index.writeUInt32LE(entry.crc, i * INDEX_ENTRY + 12);
    });
    const indexOffset = slotOffset(slots);
    const trailer = Buffer.alloc(TRAILER_BYTES);
    trailer.write(TRAILER_MAGIC, 0, 'latin1');
    trailer.writeUInt32LE(entries.length, 8);
    trailer.writeBigUInt64LE(BigInt(indexOffset), 12);
    trailer.writeUInt32LE(crc32(index, crc32(this.header)), 20);
    await this.writeAt(index, indexOffset);
    await this.writeAt(trailer, indexOffset + index.length);
    try {
      await this.file.sync();
      await this.fs.syncDirectory(path.dirname(this.path));
    } catch (err) {
      throw fromSystemError(err, this.path, 'sync the customize journal');
    }
  }

  async close(): Promise<void> {
    await this.file.close();
  }

  /** Closes and removes the journal (an abandoned run: the image was never touched). */
  async discard(): Promise<void> {
    await this.file.close().catch(() => undefined);
    await removeCustomizeJournal(this.fs, this.path);
  }
}

/** A complete, verified journal: its pages can be read back by slot. */
export interface CompleteJournal {
  path: string;
  meta: RedoJournalMeta;
  entries: RedoEntry[];
  readPage(entry: RedoEntry, into: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

export type JournalState = { state: 'none' } | { state: 'incomplete'; path: string; why: string } | { state: 'complete'; journal: CompleteJournal };

/**
 * Looks at the journal beside `image`: none, incomplete (with why), or complete and verified
 * (header, index and every page checksum). The caller must hold the image's write lock.
 */
export async function inspectCustomizeJournal(fs: FileSystem, image: string): Promise<JournalState> {
  const journalPath = customizeJournalPath(image);
  let file: FileHandleLike;
  try {
    file = await fs.open(journalPath, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { state: 'none' };
    throw fromSystemError(err, journalPath, 'open the customize journal');
  }
  const incomplete = async (why: string): Promise<JournalState> => {
    await file.close().catch(() => undefined);
    return { state: 'incomplete', path: journalPath, why };
  };
  const read = async (position: number, length: number): Promise<Buffer> => {
    const buffer = Buffer.alloc(length);
    let got: number;
    try {
      got = await file.read(buffer, 0, length, position);
    } catch (err) {
      await file.close().catch(() => undefined);
      throw fromSystemError(err, journalPath, 'read the customize journal');
    }
    return got === length ? buffer : Buffer.alloc(0);
  };
  const { size } = await file.stat();
  if (size < HEADER_BYTES + TRAILER_BYTES) return incomplete('shorter than a header and a trailer');
  const trailer = await read(size - TRAILER_BYTES, TRAILER_BYTES);
  if (trailer.length === 0 || trailer.toString('latin1', 0, 8) !== TRAILER_MAGIC) return incomplete('no trailer');
  const count = trailer.readUInt32LE(8);
  const indexOffset = Number(trailer.readBigUInt64LE(12));
  if (indexOffset + count * INDEX_ENTRY + TRAILER_BYTES !== size || indexOffset < HEADER_BYTES) return incomplete('trailer does not match the file size');
  const header = await read(0, HEADER_BYTES);
  const index = await read(indexOffset, count * INDEX_ENTRY);
  if (header.length === 0 || index.length !== count * INDEX_ENTRY) return incomplete('header or index unreadable');
  if (crc32(index, crc32(header)) !== trailer.readUInt32LE(20)) return incomplete('header or index checksum mismatch');
  if (header.toString('latin1', 0, 8) !== HEADER_MAGIC || header.readUInt32LE(8) !== VERSION || header.readUInt32LE(12) !== JOURNAL_PAGE) {
    await file.close().catch(() => undefined);
    throw new UbdcowError('bad-journal', `${journalPath}: not a ubdcow customize journal of this version; remove it if no customize was running`, { file: journalPath });
  }
  const meta: RedoJournalMeta = { diskSize: Number(header.readBigUInt64LE(16)), kind: header.readUInt32LE(24) === 1 ? 'cow' : 'raw' };
  const slots = (indexOffset - HEADER_BYTES) / JOURNAL_PAGE;
  const entries: RedoEntry[] = [];
  for (let i = 0; i < count; i++) {
    const entry = { page: Number(index.readBigUInt64LE(i * INDEX_ENTRY)), slot: index.readUInt32LE(i * INDEX_ENTRY + 8), crc: index.readUInt32LE(i * INDEX_ENTRY + 12) };
    if (entry.slot >= slots) return incomplete(`index entry ${i} points past the slots`);
    entries.push(entry);
  }
  // Every page must verify before any is applied: a page lost in a crash before the sync means the run never applied anything.
  for (const entry of entries) {
    const got = await read(slotOffset(entry.slot), JOURNAL_PAGE);
    if (got.length === 0 || crc32(got) !== entry.crc) return incomplete(`page ${entry.page} does not match its checksum`);
  }
  const journal: CompleteJournal = {
    path: journalPath,
    meta,
    entries,
    async readPage(entry, into) {
      const got = await file.read(into, 0, JOURNAL_PAGE, slotOffset(entry.slot));
      if (got !== JOURNAL_PAGE || crc32(into.subarray(0, JOURNAL_PAGE)) !== entry.crc) {
        throw new UbdcowError('bad-journal', `${journalPath}: page ${entry.page} changed while it was replayed`, { file: journalPath });
      }
    },
    close: () => file.close(),
  };
  return { state: 'complete', journal };
}

export async function removeCustomizeJournal(fs: FileSystem, journalPath: string): Promise<void> {
  try {
    await fs.unlink(journalPath);
    await fs.syncDirectory(path.dirname(journalPath));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw fromSystemError(err, journalPath, 'remove the customize journal');
  }
}

/** True when a customize journal (complete or not) is beside `image`: writers other than customize refuse then. */
export async function customizeJournalExists(fs: FileSystem, image: string): Promise<boolean> {
  return fs.stat(customizeJournalPath(image)).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false;
      throw fromSystemError(err, customizeJournalPath(image), 'look for the customize journal');
    },
  );
}

/** Refuses (for writers other than customize) while an interrupted customize's journal is beside `image`. */
export async function refuseInterruptedCustomize(fs: FileSystem, image: string): Promise<void> {
  if (await customizeJournalExists(fs, image)) {
    throw new UbdcowError(
      'customize-interrupted',
      `${image}: a customize was interrupted (${customizeJournalPath(image)} exists); run \`ubdcow customize ${image}\` (no operations) to finish or discard it first`,
      { file: image },
    );
  }
}
