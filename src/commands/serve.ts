/**
 * `ubdcow serve`: a UML COW (through the engine, with its lock and its data-before-bitmap order)
 * or a raw image as an NBD export. base:allocation reports what the COW holds as data and what
 * reads through to the backing file as a hole (without the zero flag: the backing's bytes are
 * not known to be zero), so qemu-img map, nbdinfo --map and qemu-img convert -B see the COW's
 * own allocation. The spec lets a client treat such a hole's contents as undefined and qemu-img
 * compare takes them for zeros, hence `allocation: 'merged'` (the disk as one image: data, or
 * zeros where neither the COW nor the backing file holds anything).
 */
import { UbdcowError, fromSystemError } from '../errors.js';
import { type CowDevice, looksLikeCow, openCow } from '../io/engine/index.js';
import { dataExtents, type FileHandleLike, nodeFileSystem, writeAll, writeNewFile } from '../io/file/index.js';
import { openBacking, type OpenedFile, resolveBackingPath } from '../io/image/index.js';
import { ExtentList } from '../format/extent-list.js';
import { type NbdBlockDevice, type NbdServer, STATE_HOLE, STATE_ZERO, type StatusDescriptor, serveNbd } from '../nbd/index.js';
import { type OptionKeys, checkOptions } from '../options.js';

export interface ServeOptions {
  /** Backing file instead of the COW header's (COW images only). */
  backing?: string;
  socket?: string;
  port?: number;
  bind?: string;
  readOnly?: boolean;
  name?: string;
  /** Every write durable before its reply (like UML's ubdNs). */
  sync?: boolean;
  shared?: number;
  /** Clients beyond `shared` that wait for a slot (default 128); more are refused. */
  queue?: number;
  pidFile?: string;
  /**
   * What base:allocation describes. 'cow' (default): sectors the COW holds are data, sectors that
   * read through to the backing are holes (NBD_STATE_HOLE without NBD_STATE_ZERO), so map tools
   * and `qemu-img convert -B` see the COW's own allocation. 'merged': the disk as one image, for
   * clients that take a hole without the zero flag to read as zeros (qemu-img compare does) and
   * for whole-disk copies: what the COW holds and the backing's data are data, the backing's holes
   * (where the COW holds nothing) are holes that read as zeros (NBD_STATE_HOLE | NBD_STATE_ZERO).
   */
  allocation?: 'cow' | 'merged';
  /**
   * With allocation 'cow': bytes each run the COW holds is widened to, outwards, on both ends
   * (default: one sector). A qcow2 overlay allocates 64 KiB clusters: `convert -B` asks for 65536,
   * so qemu-img copies whole clusters (their other bytes read through to the backing: the same
   * bytes the overlay's backing has) instead of a 4 KiB page and then the rest of its cluster.
   */
  allocationGrain?: number;
  log?: (line: string) => void;
  /** Bytes a write allocates in a COW at once (default 4096; see OpenCowOptions.allocationUnit). */
  allocationUnit?: number;
}

export interface ServeHandle {
  server: NbdServer;
  kind: 'cow' | 'raw';
  size: number;
  readOnly: boolean;
  /** Worth telling the user, not stopping for (read-only: the backing file's mtime moved). */
  warnings: string[];
  /** Stops the server (in-flight requests finish), flushes, closes the image (releasing its lock). */
  close(): Promise<void>;
}

const serveImageOptionKeys: OptionKeys<ServeOptions> = { backing: true, socket: true, port: true, bind: true, readOnly: true, name: true, sync: true, shared: true, queue: true, pidFile: true, allocation: true, allocationGrain: true, log: true, allocationUnit: true };

export async function serveImage(image: string, options: ServeOptions = {}): Promise<ServeHandle> {
  checkOptions('serveImage', options, serveImageOptionKeys);
  const kind = (await looksLikeCow(nodeFileSystem, image)) ? 'cow' : 'raw';
  if (kind === 'raw' && options.backing !== undefined) {
    throw new UbdcowError('not-a-cow', `${image}: is not a UML COW file (no COW magic), so a backing file (${options.backing}) makes no sense for it`, { file: image });
  }
  const device = kind === 'cow' ? await cowExport(image, options) : await rawExport(image, options);
  let server: NbdServer;
  try {
    server = await serveNbd(device, {
      socket: options.socket,
      port: options.port,
      bind: options.bind,
      name: options.name,
      description: `ubdcow ${kind === 'cow' ? 'COW' : 'raw'} image ${image}`,
      readOnly: options.readOnly,
      shared: options.shared,
      queue: options.queue,
      writesDurable: Boolean(options.sync),
      log: options.log,
    });
  } catch (err) {
    await device.close().catch(() => undefined);
    throw err;
  }
  if (options.pidFile !== undefined) {
    try {
      const pidFile = options.pidFile;
      // Whole or not at all: a supervisor never reads a half-written pid.
      await writeNewFile(nodeFileSystem, pidFile, true, async (file) => {
        const text = new TextEncoder().encode(`${process.pid}\n`);
        await writeAll(file, pidFile, 'write the pid file', { buffer: text, offset: 0, length: text.length, position: 0 });
      });
    } catch (err) {
      await server.close().catch(() => undefined);
      await device.close().catch(() => undefined);
      throw fromSystemError(err, options.pidFile, 'write the pid file');
    }
  }
  let closing: Promise<void> | undefined;
  return {
    server,
    kind,
    size: device.size,
    readOnly: Boolean(options.readOnly) || device.readOnly,
    warnings: device.warnings ?? [],
    close() {
      closing ??= (async () => {
        try {
          await server.close();
        } finally {
          await device.close();
          if (options.pidFile !== undefined) await nodeFileSystem.unlink(options.pidFile).catch(() => undefined);
        }
      })();
      return closing;
    },
  };
}

type ClosableDevice = NbdBlockDevice & { close(): Promise<void>; warnings?: string[] };

async function cowExport(image: string, options: ServeOptions): Promise<ClosableDevice> {
  const cow = await openCow(image, { backing: options.backing, readOnly: options.readOnly, sync: options.sync, blockingReads: true, allocationUnit: options.allocationUnit });
  let backing: OpenedFile | undefined;
  if (options.allocation === 'merged') {
    // A second, read-only descriptor of the backing file, only to find its holes (SEEK_DATA).
    backing = await openBacking(nodeFileSystem, resolveBackingPath(cow.header, options.backing), 'r').catch(async (err) => {
      await cow.close().catch(() => undefined);
      throw err;
    });
  }
  const merged = backing;
  return {
    size: cow.size,
    readOnly: cow.readOnly,
    readInto: (offset, buffer) => cow.readInto(offset, buffer),
    withFileRanges: (offset, length, send) => cow.withFileRanges(offset, length, send),
    write: (offset, data) => cow.write(offset, data),
    flush: () => cow.flush(),
    blockStatus: merged
      ? (offset, length, maxExtents) => mergedAllocation(cow, merged, offset, length, maxExtents)
      : (offset, length, maxExtents) => cowAllocationFromRuns(cow, offset, length, maxExtents, options.allocationGrain),
    close: async () => {
      try {
        await cow.close();
      } finally {
        await merged?.handle.close().catch(() => undefined);
      }
    },
    warnings: cow.warnings,
  };
}

type RunQuery = Pick<CowDevice, 'sectorSize' | 'allocatedRuns'> & { geometry: Pick<CowDevice['geometry'], 'coveredSectors'> };

/** Descriptors from a start offset on, joined while their flags match, at most `maxExtents`. */
class StatusAnswer {
  private readonly extents = new ExtentList<number>();

  constructor(
    public at: number,
    private readonly maxExtents: number,
  ) {}

  /** Extends the answer to `to` with `flags`; false once a new descriptor would pass maxExtents. */
  reach(to: number, flags: number): boolean {
    if (to <= this.at) return true;
    if (!this.extents.joinsLast(this.at, flags) && this.extents.length >= this.maxExtents) return false;
    this.extents.add(this.at, to, flags);
    this.at = to;
    return true;
  }

  descriptors(): StatusDescriptor[] {
    return this.extents.extents.map((extent) => ({ length: extent.end - extent.start, flags: extent.label }));
  }
}

/**
 * The one walk behind both base:allocation answers: the COW's runs of held sectors are data
 * (status 0), and `between(answer, to)` describes each stretch up to `to` that reads through to
 * the backing (and what lies past the bitmap's cover: V1/V2 files). Asked through the device's
 * run query, which skips the bitmap's holes, so mapping a nearly empty multi-TiB COW costs what
 * its allocated part costs. A full answer stops where it is: the client asks again from there.
 */
async function allocationOverRuns(
  cow: RunQuery,
  offset: number,
  length: number,
  maxExtents: number,
  between: (answer: StatusAnswer, to: number) => Promise<boolean> | boolean,
  grain = cow.sectorSize,
): Promise<StatusDescriptor[]> {
  const sectorSize = cow.sectorSize;
  const end = offset + length;
  const answer = new StatusAnswer(offset, maxExtents);
  const first = Math.floor(offset / sectorSize);
  const covered = Math.min(Math.ceil(end / sectorSize), cow.geometry.coveredSectors);
  if (first < covered) {
    for await (const run of cow.allocatedRuns(first, covered)) {
      // Widened runs may overlap the one before: reach() and between() ignore what is behind.
      const start = Math.floor((run.start * sectorSize) / grain) * grain;
      const stop = Math.ceil((run.end * sectorSize) / grain) * grain;
      if (!(await between(answer, Math.max(offset, start)))) return answer.descriptors();
      if (!answer.reach(Math.min(end, stop), 0)) return answer.descriptors();
    }
  }
  await between(answer, end);
  return answer.descriptors();
}

/**
 * base:allocation of the COW's own allocation ('cow'): what the COW holds is data, what reads
 * through to the backing a hole without the zero flag (NBD_STATE_HOLE), clipped to
 * [offset, offset + length), at most `maxExtents` descriptors; each held run widened to `grain`
 * bytes (default: a sector, i.e. exactly the COW's runs).
 */
export function cowAllocationFromRuns(cow: RunQuery, offset: number, length: number, maxExtents: number, grain?: number): Promise<StatusDescriptor[]> {
  return allocationOverRuns(cow, offset, length, maxExtents, (answer, to) => answer.reach(to, STATE_HOLE), grain);
}

/**
 * base:allocation of the disk as one image ('merged'): what the COW holds is data; elsewhere the
 * backing file's data extents are data and its holes read as zeros (NBD_STATE_HOLE |
 * NBD_STATE_ZERO), so a whole-disk copy (convert, nbdcopy) skips them as it skips a sparse raw
 * file's. A COW run and the backing data around it are one data extent, so a client asking for
 * one descriptor (REQ_ONE) gets all of it. Past the backing file's end (a backing shorter than the
 * disk) nothing is claimed: data, so reads there answer (and fail) as they do.
 */
export function mergedAllocation(
  cow: RunQuery,
  backing: { handle: FileHandleLike; size: number },
  offset: number,
  length: number,
  maxExtents: number,
): Promise<StatusDescriptor[]> {
  return allocationOverRuns(cow, offset, length, maxExtents, async (answer, to) => {
    const backingEnd = Math.min(to, Math.max(answer.at, backing.size));
    for await (const extent of dataExtents(backing.handle, answer.at, backingEnd)) {
      if (!answer.reach(extent.start, STATE_HOLE | STATE_ZERO) || !answer.reach(extent.end, 0)) return false;
    }
    return answer.reach(backingEnd, STATE_HOLE | STATE_ZERO) && answer.reach(to, 0);
  });
}

async function rawExport(image: string, options: ServeOptions): Promise<ClosableDevice> {
  let handle: FileHandleLike;
  let readOnly = Boolean(options.readOnly);
  try {
    handle = await nodeFileSystem.open(image, readOnly ? 'r' : 'r+');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (readOnly || (code !== 'EACCES' && code !== 'EROFS' && code !== 'EPERM')) throw fromSystemError(err, image, 'open image');
    // Like qemu-nbd on a file it cannot write: serve it read-only rather than not at all.
    handle = await nodeFileSystem.open(image, 'r').catch((e) => {
      throw fromSystemError(e, image, 'open image');
    });
    readOnly = true;
  }
  const stat = await handle.stat();
  if (stat.kind !== 'file') {
    await handle.close();
    throw new UbdcowError('not-a-file', `${image}: is not a regular file; serve a COW or a raw image file`, { file: image });
  }
  const size = stat.size;
  const sync = Boolean(options.sync);
  return {
    size,
    readOnly,
    async readInto(offset, buffer) {
      const got = await handle.read(buffer, 0, buffer.length, offset);
      if (got < buffer.length) throw new UbdcowError('truncated', `${image}: ends before byte ${offset + buffer.length}`, { file: image });
      return buffer;
    },
    async write(offset, data) {
      await handle.write(data, 0, data.length, offset);
      if (sync) await handle.datasync();
    },
    // The server validated the range against the size; the handle stays open until close().
    withFileRanges: (offset, length, send) => send([{ fd: handle.fd!, position: offset, length }]),
    flush: () => (readOnly ? Promise.resolve() : handle.datasync()),
    close: () => handle.close(),
  };
}
