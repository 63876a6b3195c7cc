import type { Writable } from 'node:stream';
import { checkByteRange } from '../errors.js';
import { openCow } from '../io/engine/index.js';
import { refuseInterruptedCustomize } from '../io/journal/index.js';
import { type FileSystem, nodeFileSystem } from '../io/file/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

const CHUNK = 1 << 20;
const WRITES_IN_FLIGHT = 8;

export interface ReadOptions {
  offset?: number;
  /** Bytes to read; default: to the end of the disk. */
  length?: number;
  backing?: string;
  fs?: FileSystem;
  /** Told about things worth a word that do not stop reading (e.g. a backing mtime mismatch). */
  onWarning?: (warning: string) => void;
}

const readThroughEngineOptionKeys: OptionKeys<ReadOptions> = { offset: true, length: true, backing: true, fs: true, onWarning: true };

/** Reads the virtual disk through the engine (read-only), a chunk at a time, into `sink`. */
export async function readThroughEngine(cowPath: string, sink: (chunk: Uint8Array) => Promise<void>, options: ReadOptions = {}): Promise<number> {
  checkOptions('readThroughEngine', options, readThroughEngineOptionKeys);
  const dev = await openCow(cowPath, { readOnly: true, backing: options.backing, fs: options.fs });
  try {
    for (const warning of dev.warnings) options.onWarning?.(warning);
    const offset = options.offset ?? 0;
    const length = options.length ?? Math.max(0, dev.size - offset);
    checkByteRange(cowPath, 'read', offset, length, dev.size);
    for (let done = 0; done < length; done += CHUNK) {
      await sink(await dev.read(offset + done, Math.min(CHUNK, length - done)));
    }
    return length;
  } finally {
    await dev.close();
  }
}

export interface WriteOptions {
  offset: number;
  backing?: string;
  sync?: boolean;
  fs?: FileSystem;
  /** Known length of the input, checked against the disk before anything is written. */
  expectedLength?: number;
  /** See OpenCowOptions.allocationUnit (default 4096). */
  allocationUnit?: number;
}

export interface WriteResult {
  offset: number;
  bytes: number;
  flushed: boolean;
}

const writeThroughEngineOptionKeys: OptionKeys<WriteOptions> = { offset: true, backing: true, sync: true, fs: true, expectedLength: true, allocationUnit: true };

/** Writes a stream into the virtual disk at `offset` through the engine, then flushes. */
export async function writeThroughEngine(cowPath: string, input: AsyncIterable<Uint8Array>, options: WriteOptions): Promise<WriteResult> {
  checkOptions('writeThroughEngine', options, writeThroughEngineOptionKeys);
  // A write under an interrupted customize's journal would be undone by its replay.
  await refuseInterruptedCustomize(options.fs ?? nodeFileSystem, cowPath);
  const dev = await openCow(cowPath, { backing: options.backing, sync: options.sync, fs: options.fs, allocationUnit: options.allocationUnit });
  const inFlight = new Set<Promise<void>>();
  let firstError: unknown;
  let written = 0;
  try {
    if (options.expectedLength !== undefined) checkByteRange(cowPath, 'write', options.offset, options.expectedLength, dev.size);
    for await (const chunk of rechunk(input, CHUNK)) {
      if (firstError) break;
      const request = dev.write(options.offset + written, chunk).catch((err) => {
        firstError ??= err;
      });
      written += chunk.length;
      inFlight.add(request);
      void request.finally(() => inFlight.delete(request));
      if (inFlight.size >= WRITES_IN_FLIGHT) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    if (firstError) throw firstError;
    await dev.flush();
    return { offset: options.offset, bytes: written, flushed: true };
  } finally {
    await Promise.allSettled(inFlight);
    await dev.close();
  }
}

/** Regroups a byte stream into chunks of exactly `size` bytes (the last may be shorter). */
async function* rechunk(input: AsyncIterable<Uint8Array>, size: number): AsyncGenerator<Uint8Array> {
  let pending = new Uint8Array(size);
  let filled = 0;
  for await (const piece of input) {
    let used = 0;
    while (used < piece.length) {
      const take = Math.min(size - filled, piece.length - used);
      pending.set(piece.subarray(used, used + take), filled);
      filled += take;
      used += take;
      if (filled === size) {
        yield pending;
        pending = new Uint8Array(size);
        filled = 0;
      }
    }
  }
  if (filled > 0) yield pending.subarray(0, filled);
}

/** Writes to a stream, waiting for it to drain, so memory stays at one chunk. */
export function streamSink(stream: Writable): (chunk: Uint8Array) => Promise<void> {
  return (chunk) =>
    new Promise((resolve, reject) => {
      stream.write(chunk, (err) => (err ? reject(err) : resolve()));
    });
}
