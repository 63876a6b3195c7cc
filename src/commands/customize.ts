/**
 * `ubdcow customize`: changes guest files on a COW (or, with `inPlace`, a raw image) without
 * booting, all or nothing. The operations run against libext2fs mounted over staged pages (the
 * image is only read); when every one has succeeded and libext2fs has closed the file system, the
 * staged pages become a redo journal beside the image (synced), are applied, the image is synced
 * and the journal removed. A run killed or failing before the journal is complete leaves the
 * image as it was; one killed after leaves a journal the next customize (or `customize IMAGE`
 * with no operations) replays. See docs/customize.md.
 */
import { createRequire } from 'node:module';
import { UbdcowError } from '../errors.js';
import { type FileSystem, nodeFileSystem } from '../io/file/index.js';
import { type LockedDisk, openLockedDisk } from '../io/engine/index.js';
import {
  anonymousSpill,
  applyPages,
  customizeJournalExists,
  customizeJournalPath,
  recoverCustomizeJournal,
  type Recovery,
  RedoJournalWriter,
  removeCustomizeJournal,
  StagedPages,
} from '../io/journal/index.js';
import { type CustomizeOperation, describeOperation } from '../guestfs/customize-spec.js';
import { OperationRunner } from '../guestfs/customize-ops.js';
import { SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE } from '../guestfs/ext-layout.js';
import { openVolume } from '../guestfs/guest-fs.js';
import { type Ext2fsPromises, GuestWriter } from '../guestfs/guest-writer.js';
import { StagedExt2fsDisk, stagedGuestDisk } from '../guestfs/staged-disk.js';
import { checkWritable } from '../guestfs/write-safety.js';
import { setInodeTimes } from '../guestfs/inode-times.js';
import type { FsSource } from '../guestfs/disk-adapter.js';
import { type OptionKeys, checkOptions } from '../options.js';

export type { CustomizeOperation } from '../guestfs/customize-spec.js';

export interface CustomizeOptions {
  /** Backing file instead of the one the COW's header names. */
  backing?: string;
  /** 1-based partition number (MBR or GPT). */
  partition?: number;
  /** Allow a raw image (changed in place, with the same journal). */
  inPlace?: boolean;
  /** Run every operation on the staged disk and report, but change nothing. */
  dryRun?: boolean;
  /** Staged pages kept in memory before they go to the journal file (default 256 MiB). */
  memoryBytes?: number;
  fs?: FileSystem;
}

export interface CustomizeStep {
  operation: string;
  /** Guest paths the operation changed. */
  paths: string[];
}

export interface CustomizeResult {
  image: string;
  kind: 'cow' | 'raw';
  /** Where the file system is: the whole disk or partition N. */
  location: string;
  dryRun: boolean;
  steps: CustomizeStep[];
  /** 4 KiB pages of the disk changed (or that would be, in a dry run). */
  pagesChanged: number;
  /** What was done with a journal an earlier, interrupted run left. */
  recovery: Recovery;
  warnings: string[];
}

const optionKeys: OptionKeys<CustomizeOptions> = { backing: true, partition: true, inPlace: true, dryRun: true, memoryBytes: true, fs: true };

interface Ext2fsModule {
  mount(disk: unknown, offset: number): Promise<{ promises: Ext2fsPromises }>;
  umount(fs: { promises: Ext2fsPromises }): Promise<void>;
}

let ext2fsModule: Ext2fsModule | undefined;
function loadExt2fs(): Ext2fsModule {
  ext2fsModule ??= createRequire(import.meta.url)('ext2fs') as Ext2fsModule;
  return ext2fsModule;
}

export async function customize(image: string, operations: CustomizeOperation[], options: CustomizeOptions = {}): Promise<CustomizeResult> {
  checkOptions('customize', options, optionKeys);
  const fs = options.fs ?? nodeFileSystem;
  const dryRun = options.dryRun ?? false;
  const disk = await openLockedDisk(image, { fs, backing: options.backing, allowRaw: options.inPlace ?? false });
  try {
    // A dry run changes nothing, so it leaves an earlier run's journal alone (and refuses over it).
    let recovery: Recovery = 'none';
    if (dryRun) {
      if (await customizeJournalExists(fs, image)) {
        throw new UbdcowError('customize-interrupted', `${image}: an earlier customize was interrupted (${customizeJournalPath(image)} exists); run \`ubdcow customize ${image}\` without --dry-run to finish it first`, { file: image });
      }
    } else {
      recovery = (await recoverCustomizeJournal(fs, disk)).recovery;
    }
    const base: CustomizeResult = { image, kind: disk.kind, location: '', dryRun, steps: [], pagesChanged: 0, recovery, warnings: [...disk.warnings] };
    if (operations.length === 0) return base;
    return await stageAndApply(disk, operations, options, fs, base);
  } finally {
    await disk.close();
  }
}

async function stageAndApply(disk: LockedDisk, operations: CustomizeOperation[], options: CustomizeOptions, fs: FileSystem, result: CustomizeResult): Promise<CustomizeResult> {
  const journal = result.dryRun ? undefined : await RedoJournalWriter.create(fs, customizeJournalPath(disk.path), { diskSize: disk.size, kind: disk.kind });
  const spill = journal ?? anonymousSpill();
  let complete = false;
  try {
    const pages = new StagedPages(disk, spill, options.memoryBytes);
    const { source, location, label } = await openVolume(stagedGuestDisk(disk.path, disk.kind, pages, []), options.partition);
    result.location = location;
    checkWritable(await source.read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE), label, disk.path);
    await runOperations(pages, source, label, disk.path, operations, result);
    result.pagesChanged = pages.pageCount;
    if (!journal) return result;
    const { entries, slots } = await pages.settle();
    const last = entries.at(-1);
    if (last && Math.min((last.page + 1) * 4096, disk.size) > disk.writableBytes) {
      throw new UbdcowError('uncovered', `${disk.path}: the file system changed bytes past ${disk.writableBytes}, which this old-version COW cannot hold (its last sectors have no bitmap bit); nothing was changed`, { file: disk.path });
    }
    await journal.finish(entries, slots);
    complete = true;
    // From here on the run is decided: a crash is finished by replaying the journal.
    try {
      await applyPages(disk, entries, (entry, into) => journal.readSlot(entry.slot, into));
    } catch (err) {
      // The journal stays on disk (a later run replays it); only its descriptor is let go.
      await journal.close().catch(() => undefined);
      const cause = err instanceof UbdcowError ? err : new UbdcowError('io', String((err as Error)?.message ?? err));
      throw new UbdcowError(cause.code, `${cause.message}; the run's journal ${journal.path} is complete: run \`ubdcow customize ${disk.path}\` (no operations) to finish applying it`, { file: disk.path, cause: err });
    }
    await journal.close();
    await removeCustomizeJournal(fs, journal.path);
    return result;
  } finally {
    if (!complete) {
      if (journal) await journal.discard().catch(() => undefined);
      else (spill as { close(): void }).close();
    }
  }
}

/** Mounts libext2fs over the staged pages, runs the operations in order, and closes it cleanly (or throws). */
async function runOperations(pages: StagedPages, source: FsSource, label: string, file: string, operations: CustomizeOperation[], result: CustomizeResult): Promise<void> {
  const ext2fs = loadExt2fs();
  let mounted: { promises: Ext2fsPromises };
  try {
    mounted = await ext2fs.mount(new StagedExt2fsDisk(pages), source.offset);
  } catch (err) {
    throw new UbdcowError('corrupt-fs', `${label}: libext2fs cannot open the file system for writing (${(err as { code?: string }).code ?? String(err)}); corrupt file system?`, { file });
  }
  let closed = false;
  let runner: OperationRunner | undefined;
  try {
    runner = new OperationRunner(new GuestWriter(mounted.promises, label, file));
    for (const [index, operation] of operations.entries()) {
      try {
        result.steps.push({ operation: describeOperation(operation), paths: await runner.run(operation) });
      } catch (err) {
        if (err instanceof UbdcowError) {
          throw new UbdcowError(err.code, `operation ${index + 1} (${describeOperation(operation)}): ${err.message}; nothing was changed`, { file: err.file ?? file, cause: err });
        }
        throw err;
      }
    }
    closed = true;
    try {
      await ext2fs.umount(mounted);
    } catch (err) {
      throw new UbdcowError('guest-op-failed', `${label}: libext2fs could not close the file system (${(err as { code?: string }).code ?? String(err)}); nothing was changed`, { file });
    }
    // Times libext2fs cannot set (--copy-in keeps the host's): edited into the staged inodes now that it is closed.
    await setInodeTimes(source, (offset, data) => pages.write(source.offset + offset, data), label, runner.times);
  } finally {
    // A failed run's staged pages are dropped; the mount only needs its memory back.
    if (!closed) await ext2fs.umount(mounted).catch(() => undefined);
  }
}
