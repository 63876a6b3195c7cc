/**
 * The interface of the async block device `openCow` returns, and its options: what callers (the
 * CLI, the NBD server, programs using the library) may rely on. The engine implements it.
 */
import type { CowGeometry } from '../../format/geometry.js';
import type { CowHeader } from '../../format/header.js';
import type { FileSystem } from '../file/index.js';
import type { Extent } from '../../format/extent-list.js';

export interface OpenCowOptions {
  /** Backing file to use instead of the header's path (like UML's `ubdN=cow,backing`). */
  backing?: string;
  readOnly?: boolean;
  /**
   * Like UML's `ubdNs`: data is fdatasync'ed before its bitmap slice is written and the slice
   * before the write resolves, so even a power loss never leaves a set bit over unwritten data.
   */
  sync?: boolean;
  fs?: FileSystem;
  /**
   * Take a POSIX record lock on the COW file as the kernel does (write lock, or read lock when
   * read-only), refusing a file a running UML holds. Default true.
   */
  lock?: boolean;
  /**
   * Read requests of up to 64 KiB with blocking pread on the calling thread instead of the thread
   * pool. For page-cached data the system call costs a fraction of the pool's round trip (a
   * server answering many small reads gains; see docs/nbd.md), but a read that waits for the disk
   * stalls the event loop meanwhile. Default false.
   */
  blockingReads?: boolean;
  /**
   * Soft bound on the bitmap bytes kept in memory (default 16 MiB; the bitmap is loaded a 64 KiB
   * slice at a time, on demand, so opening costs the same for any disk size).
   */
  maxBitmapCacheBytes?: number;
  /** Bytes per bitmap slice (default 64 KiB; small values exercise eviction in tests). */
  bitmapSliceBytes?: number;
  /**
   * Bytes a write allocates at once (default max(4096, sector size)): a write allocating any
   * sector of a unit copies the unit's other unallocated sectors up from the backing, so every
   * allocated unit is whole. Debian's UML 6.1 kernel misreads a 4 KiB page mixing backing and COW
   * sectors (docs/nbd.md); the sector size keeps sector granularity. A power of two and a
   * multiple of the sector size.
   */
  allocationUnit?: number;
}

/** A run of sectors [start, end) that live in the COW file. */
export type AllocatedRun = Extent;

/** A run of bytes of an open file: `length` bytes at `position` of descriptor `fd`. */
export interface FileRange {
  fd: number;
  position: number;
  length: number;
}

/** A block device in user space over a COW file and its backing file. */
export interface CowDevice {
  /** Virtual disk size in bytes. */
  readonly size: number;
  readonly sectorSize: number;
  readonly header: CowHeader;
  readonly geometry: CowGeometry;
  readonly readOnly: boolean;
  /** Worth telling the user, not stopping for (read-only: a backing mtime mismatch). */
  readonly warnings: string[];
  /** Exactly `length` bytes from `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Fills `buffer` with the disk's bytes from `offset` (lets callers reuse buffers, like pread). */
  readInto(offset: number, buffer: Uint8Array): Promise<Uint8Array>;
  /** Resolves once the data and the bitmap bits that point at it are written. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Everything acknowledged so far is durable (fdatasync). */
  flush(): Promise<void>;
  /** Drains the queue, flushes, releases the lock and the files. */
  close(): Promise<void>;
  /**
   * True when sector `sector` lives in the COW file. Synchronous: answered from the bitmap slices
   * in memory, else by loading the sector's slice with a blocking read (then cached).
   */
  isAllocated(sector: number): boolean;
  /**
   * Runs of sectors in [startSector, endSector) that live in the COW file, in order, merged
   * across slices; bitmap slices that are holes in the file are skipped without reading.
   */
  allocatedRuns(startSector?: number, endSector?: number): AsyncGenerator<AllocatedRun>;
  /**
   * Where the disk's bytes [offset, offset + length) live, as ranges of the COW's and the backing's
   * descriptors in disk order, for senders that copy from files themselves (sendfile). `use` runs
   * after the same waits as a read (no stale bit), and the files stay open until its promise
   * settles. Undefined when a file has no descriptor (an in-memory file system).
   */
  withFileRanges<T>(offset: number, length: number, use: (ranges: FileRange[]) => Promise<T>): Promise<T> | undefined;
}
