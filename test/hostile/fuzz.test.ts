/**
 * Fuzzing: valid COW files of every layout, mutated (byte flips in the header and bitmap,
 * truncations, header fields overwritten with boundary values), fed to the library functions
 * in-process by the thousand, and a sample to the CLI. Each call must succeed or throw a
 * UbdcowError with a one-line message naming a file (never another error type), finish within
 * a time limit, and leave the COW and backing files exactly as they were.
 *
 * UBDCOW_HEAVY=1 runs many more cases. A failure prints fast-check's seed and the shrunk
 * mutation list, which rebuild the case exactly.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { catImage } from '../../src/commands/cat.js';
import { checkCow } from '../../src/commands/check.js';
import { diffImages } from '../../src/commands/diff.js';
import { inspectCow } from '../../src/commands/inspect.js';
import { mapCow } from '../../src/commands/map.js';
import { UbdcowError } from '../../src/errors.js';
import { type HeaderFields, type HeaderLayout, serializeV1, serializeV2, serializeV3, serializeV3Broken } from '../../src/format/header.js';
import { openCow } from '../../src/io/engine/engine.js';
import { buildCow, sha256 } from '../helpers/cow-fixtures.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli } from '../helpers/tools.js';
import { basicProblems, nonWarningLines, runBatch } from './cli-run.js';
import { HEAVY, Tally, recordFigures } from './figures.js';

const LIBRARY_RUNS = HEAVY ? 20_000 : 1_200;
const CLI_SAMPLE = HEAVY ? 400 : 40;
const CALL_TIMEOUT_MS = 5000;
/** 128 whole sectors and a partial one, so partial-sector paths are reached. */
const DISK_SIZE = 64 * 1024 + 100;
/** Enough of the disk to read through every path without reading huge claimed sizes. */
const READ_LIMIT = 128 * 1024;

type SeedLayout = HeaderLayout | 'v1-be';
const SEED_LAYOUTS: SeedLayout[] = ['v1', 'v1-be', 'v2', 'v3', 'v3-broken'];

interface FieldSpec {
  name: string;
  offset: number;
  bytes: 4 | 8;
}

/** Numeric header fields per layout (magic and version included), for boundary-value overwrites. */
const FIELDS: Record<SeedLayout, FieldSpec[]> = {
  v1: [
    { name: 'magic', offset: 0, bytes: 4 },
    { name: 'version', offset: 4, bytes: 4 },
    { name: 'mtime', offset: 264, bytes: 4 },
    { name: 'size', offset: 268, bytes: 8 },
    { name: 'sectorsize', offset: 276, bytes: 4 },
  ],
  'v1-be': [
    { name: 'magic', offset: 0, bytes: 4 },
    { name: 'version', offset: 4, bytes: 4 },
    { name: 'mtime', offset: 264, bytes: 4 },
    { name: 'size', offset: 268, bytes: 8 },
    { name: 'sectorsize', offset: 276, bytes: 4 },
  ],
  v2: [
    { name: 'magic', offset: 0, bytes: 4 },
    { name: 'version', offset: 4, bytes: 4 },
    { name: 'mtime', offset: 4104, bytes: 4 },
    { name: 'size', offset: 4108, bytes: 8 },
    { name: 'sectorsize', offset: 4116, bytes: 4 },
  ],
  v3: [
    { name: 'magic', offset: 0, bytes: 4 },
    { name: 'version', offset: 4, bytes: 4 },
    { name: 'mtime', offset: 8, bytes: 4 },
    { name: 'size', offset: 12, bytes: 8 },
    { name: 'sectorsize', offset: 20, bytes: 4 },
    { name: 'alignment', offset: 24, bytes: 4 },
    { name: 'cow_format', offset: 28, bytes: 4 },
  ],
  'v3-broken': [
    { name: 'magic', offset: 0, bytes: 4 },
    { name: 'version', offset: 4, bytes: 4 },
    { name: 'mtime', offset: 8, bytes: 4 },
    { name: 'size', offset: 16, bytes: 8 },
    { name: 'sectorsize', offset: 24, bytes: 4 },
    { name: 'alignment', offset: 28, bytes: 4 },
    { name: 'cow_format', offset: 32, bytes: 4 },
  ],
};

const BOUNDARY_U32 = [0, 1, 2, 3, 7, 8, 511, 512, 513, 1024, 4095, 4096, 4097, 65536, 65537, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
const BOUNDARY_U64 = [
  0n,
  1n,
  511n,
  512n,
  513n,
  BigInt(DISK_SIZE - 1),
  BigInt(DISK_SIZE + 1),
  BigInt(DISK_SIZE * 2),
  2n ** 32n,
  2n ** 40n,
  2n ** 53n - 1n,
  2n ** 53n,
  2n ** 63n,
  2n ** 64n - 512n,
  2n ** 64n - 1n,
];

type Mutation =
  | { kind: 'flip'; region: 'header' | 'bitmap' | 'anywhere'; at: number; xor: number }
  | { kind: 'truncate'; at: number }
  | { kind: 'field'; field: number; value: number | string; byteOrder: 'own' | 'swapped' };

interface FuzzCase {
  layout: SeedLayout;
  mutations: Mutation[];
}

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('flip' as const), region: fc.constantFrom('header' as const, 'bitmap' as const, 'anywhere' as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }) },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant('field' as const),
      field: fc.nat(),
      value: fc.oneof(fc.constantFrom(...BOUNDARY_U32), fc.constantFrom(...BOUNDARY_U64.map(String)), fc.nat()),
      byteOrder: fc.constantFrom('own' as const, 'own' as const, 'swapped' as const),
    }),
  },
);

const caseArb: fc.Arbitrary<FuzzCase> = fc.record({
  layout: fc.constantFrom(...SEED_LAYOUTS),
  mutations: fc.array(mutationArb, { minLength: 1, maxLength: 4 }),
});

const HEADER_SERIALIZERS: Record<HeaderLayout, (fields: HeaderFields) => Uint8Array> = {
  v1: (fields) => serializeV1(fields, true),
  v2: serializeV2,
  v3: serializeV3,
  'v3-broken': serializeV3Broken,
};

interface Seed {
  bytes: Uint8Array;
  headerLength: number;
  bitmapOffset: number;
  bitmapLength: number;
  littleEndian: boolean;
}

function applyMutations(seed: Seed, layout: SeedLayout, mutations: Mutation[]): Uint8Array {
  let bytes = seed.bytes.slice();
  for (const mutation of mutations) {
    if (mutation.kind === 'truncate') {
      // Mostly inside the interesting first part of the file, sometimes anywhere.
      const limit = mutation.at % 3 === 0 ? bytes.length + 1 : Math.min(bytes.length + 1, seed.bitmapOffset + seed.bitmapLength + 4096);
      bytes = bytes.slice(0, mutation.at % limit);
    } else if (mutation.kind === 'flip') {
      const [start, length] =
        mutation.region === 'header' ? [0, seed.headerLength] : mutation.region === 'bitmap' ? [seed.bitmapOffset, seed.bitmapLength] : [0, bytes.length];
      const at = start + (mutation.at % Math.max(1, length));
      if (at < bytes.length) bytes[at] ^= mutation.xor;
    } else {
      const fields = FIELDS[layout];
      const field = fields[mutation.field % fields.length];
      if (field.offset + field.bytes > bytes.length) continue;
      const littleEndian = mutation.byteOrder === 'own' ? seed.littleEndian : !seed.littleEndian;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const value = BigInt(mutation.value);
      if (field.bytes === 8) view.setBigUint64(field.offset, BigInt.asUintN(64, value), littleEndian);
      else view.setUint32(field.offset, Number(BigInt.asUintN(32, value)), littleEndian);
    }
  }
  return bytes;
}

type Outcome = { ok: true; value: unknown } | { ok: false; error: unknown } | { hung: true };

async function withTimeout(run: () => Promise<unknown>): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<Outcome>((resolve) => {
    timer = setTimeout(() => resolve({ hung: true }), CALL_TIMEOUT_MS);
  });
  try {
    return await Promise.race([
      run().then(
        (value): Outcome => ({ ok: true, value }),
        (error: unknown): Outcome => ({ ok: false, error }),
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

interface LibraryCall {
  name: string;
  run(cowPath: string): Promise<unknown>;
}

const LIBRARY_CALLS: LibraryCall[] = [
  { name: 'inspectCow', run: (cow) => inspectCow(cow) },
  { name: 'checkCow', run: (cow) => checkCow(cow) },
  { name: 'mapCow', run: (cow) => mapCow(cow) },
  { name: 'diffImages', run: (cow) => diffImages(cow) },
  { name: 'diffImages --allocated', run: (cow) => diffImages(cow, undefined, { allocated: true }) },
  {
    name: 'catImage',
    run: async (cow) => {
      let seen = 0;
      for await (const chunk of catImage(cow, { chunkBytes: 32 * 1024 })) {
        seen += chunk.length;
        if (seen >= READ_LIMIT) break;
      }
    },
  },
  {
    name: 'openCow read',
    run: async (cow) => {
      const device = await openCow(cow, { readOnly: true });
      try {
        await device.read(0, Math.min(device.size, READ_LIMIT));
        if (device.size > 1000) await device.read(device.size - 1000, 1000);
      } finally {
        await device.close();
      }
    },
  },
];

function fileFingerprint(file: string): string {
  const stat = fs.statSync(file);
  return `${stat.size}:${stat.mtimeMs}:${sha256(file)}`;
}

describe('fuzzed COW files', () => {
  let root: string;
  const seeds = new Map<SeedLayout, Seed>();
  let backingPath: string;
  let backingFingerprint: string;
  const tally = new Tally();
  const errorCodes = new Map<string, number>();
  const failures: string[] = [];
  let libraryCases = 0;
  let cliRuns = 0;

  beforeAll(() => {
    root = makeTempDir('ubdcow-fuzz-');
    backingPath = path.join(root, 'base.img');
    for (const layout of SEED_LAYOUTS) {
      const dir = path.join(root, `seed-${layout}`);
      fs.mkdirSync(dir);
      const built = buildCow(dir, {
        layout: layout === 'v1-be' ? 'v1' : layout,
        size: DISK_SIZE,
        extents: [
          { start: 0, end: 3 },
          { start: 40, end: 64 },
          { start: 120, end: 129 },
        ],
        seed: 7,
      });
      const bytes = new Uint8Array(fs.readFileSync(built.cowPath));
      // Every seed points at one shared backing file, so one fingerprint proves none wrote it.
      const fields = { backingFile: backingPath, mtime: built.header.mtime, size: DISK_SIZE, sectorSize: 512, alignment: 4096 };
      const header = layout === 'v1-be' ? serializeV1(fields, false) : HEADER_SERIALIZERS[layout](fields);
      bytes.set(header, 0);
      if (!fs.existsSync(backingPath)) {
        fs.copyFileSync(built.backingPath, backingPath);
        fs.utimesSync(backingPath, built.header.mtime, built.header.mtime);
      }
      seeds.set(layout, {
        bytes,
        headerLength: built.geometry.headerSize,
        bitmapOffset: built.geometry.bitmapOffset,
        bitmapLength: built.geometry.bitmapLength,
        littleEndian: layout === 'v1',
      });
    }
    backingFingerprint = fileFingerprint(backingPath);
  });

  afterAll(() => {
    if (root) removeTempDir(root);
    const rows = tally.rows('function', ['calls', 'succeeded', 'reported problems', 'UbdcowError', 'failed']);
    recordFigures('fuzz', {
      title: 'Fuzzed COW files',
      notes: [
        `Seeds: valid ${SEED_LAYOUTS.join(', ')} files of ${DISK_SIZE} bytes of disk with allocated sectors; each case applies 1-4 mutations ` +
          '(byte flips in header, bitmap or anywhere; truncation; a numeric header field overwritten with a boundary value in either byte order).',
        `Every library function is called on every case; each must succeed or throw a UbdcowError with a one-line message naming a file, within ${CALL_TIMEOUT_MS / 1000} s, and change no file.`,
        `Error codes seen: ${[...errorCodes].sort((a, b) => b[1] - a[1]).map(([code, n]) => `${code} ${n}`).join(', ')}.`,
      ],
      rows,
      totals: { 'library cases': libraryCases, 'library calls': tally.total('calls'), 'CLI runs': cliRuns, failed: failures.length },
      failures,
    });
  });

  function judgeLibraryOutcome(call: LibraryCall, outcome: Outcome, cowPath: string): string | undefined {
    tally.add(call.name, 'calls');
    if ('hung' in outcome) return `${call.name} hung`;
    if (outcome.ok) {
      tally.add(call.name, 'succeeded');
      if ((outcome.value as { clean?: boolean } | undefined)?.clean === false) tally.add(call.name, 'reported problems');
      return undefined;
    }
    const { error } = outcome;
    if (!(error instanceof UbdcowError)) {
      return `${call.name} threw ${error instanceof Error ? `${error.name}: ${error.message}` : String(error)} (not a UbdcowError)`;
    }
    tally.add(call.name, 'UbdcowError');
    errorCodes.set(error.code, (errorCodes.get(error.code) ?? 0) + 1);
    if (error.message.includes('\n')) return `${call.name}: message has several lines: ${error.message}`;
    if (!error.message.includes(cowPath) && !error.message.includes(backingPath) && !error.message.includes('/')) {
      return `${call.name}: message names no file: ${error.message}`;
    }
    return undefined;
  }

  it(`library functions on ${LIBRARY_RUNS} mutated files: succeed or throw a UbdcowError, never hang, change nothing`, async () => {
    const cowPath = path.join(root, 'fuzz.cow');
    await fc.assert(
      fc.asyncProperty(caseArb, async ({ layout, mutations }) => {
        libraryCases++;
        const bytes = applyMutations(seeds.get(layout)!, layout, mutations);
        fs.writeFileSync(cowPath, bytes);
        const before = fileFingerprint(cowPath);
        const problems: string[] = [];
        for (const call of LIBRARY_CALLS) {
          const outcome = await withTimeout(() => call.run(cowPath));
          const problem = judgeLibraryOutcome(call, outcome, cowPath);
          if (problem) problems.push(problem);
          if (fileFingerprint(cowPath) !== before) problems.push(`${call.name} changed the COW file`);
        }
        if (fileFingerprint(backingPath) !== backingFingerprint) problems.push('the backing file changed');
        if (problems.length > 0) {
          failures.push(`${layout} ${JSON.stringify(mutations)}: ${problems.join('; ')}`);
          throw new Error(problems.join('\n'));
        }
      }),
      { numRuns: LIBRARY_RUNS, endOnFailure: true },
    );
  }, HEAVY ? 1_800_000 : 120_000);

  it(`the CLI on ${CLI_SAMPLE} mutated files: documented exit codes, one error line, no stack trace, nothing changed`, async () => {
    ensureBuiltCli();
    const dir = path.join(root, 'cli');
    fs.mkdirSync(dir);
    const cases = fc.sample(caseArb, { numRuns: CLI_SAMPLE, seed: 20261121 });
    const commands: Array<{ cli: string; argv: (cow: string) => string[]; answers: boolean }> = [
      { cli: 'inspect', argv: (cow) => ['inspect', cow], answers: false },
      { cli: 'check', argv: (cow) => ['check', cow], answers: true },
      { cli: 'map', argv: (cow) => ['map', cow], answers: false },
      { cli: 'diff', argv: (cow) => ['diff', cow], answers: true },
      { cli: 'cat', argv: (cow) => ['cat', cow, '--length', String(Math.min(READ_LIMIT, DISK_SIZE))], answers: false },
      { cli: 'read', argv: (cow) => ['read', cow, '--length', '4096'], answers: false },
    ];
    const files = cases.map(({ layout, mutations }, index) => {
      const file = path.join(dir, `case-${index}.cow`);
      fs.writeFileSync(file, applyMutations(seeds.get(layout)!, layout, mutations));
      return { file, layout, mutations, fingerprint: fileFingerprint(file) };
    });
    const runs = files.flatMap(({ file }) => commands.map((command) => ({ argv: command.argv(file) })));
    const results = await runBatch(runs, root);
    cliRuns += results.length;
    const problems: string[] = [];
    results.forEach((result, index) => {
      const command = commands[index % commands.length];
      const { layout, mutations } = files[Math.floor(index / commands.length)];
      const found = basicProblems(result);
      const errorCode = command.answers ? 2 : 1;
      const lines = nonWarningLines(result, command.cli);
      if (result.exitCode === errorCode) {
        if (lines.length !== 1 || !lines[0].startsWith(`ubdcow ${command.cli}: `)) found.push(`error output is not one line: ${JSON.stringify(result.stderr)}`);
      } else if (result.exitCode === 0 || (command.answers && result.exitCode === 1)) {
        if (lines.length > 0) found.push(`stderr has more than warnings: ${JSON.stringify(result.stderr)}`);
      } else {
        found.push(`exit code ${result.exitCode}`);
      }
      tally.add(`CLI ${command.cli}`, 'calls');
      tally.add(`CLI ${command.cli}`, result.exitCode === 0 || (command.answers && result.exitCode === 1) ? 'succeeded' : 'UbdcowError');
      if (command.cli === 'check' && result.exitCode === 1) tally.add(`CLI ${command.cli}`, 'reported problems');
      if (found.length > 0) {
        tally.add(`CLI ${command.cli}`, 'failed');
        problems.push(`ubdcow ${result.argv.join(' ')} (${layout} ${JSON.stringify(mutations)}): ${found.join('; ')}`);
      }
    });
    for (const { file, fingerprint } of files) if (fileFingerprint(file) !== fingerprint) problems.push(`${file} changed`);
    if (fileFingerprint(backingPath) !== backingFingerprint) problems.push('the backing file changed');
    failures.push(...problems);
    expect(problems).toEqual([]);
  }, 240_000);
});
