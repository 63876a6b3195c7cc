/*
 * `--allocation-unit BYTES` of the commands that write COWs (write, serve, import): what a write
 * allocates at once (src/io/engine/allocation-unit.ts). Checked before anything runs, so a bad value
 * never leaves a half-done import behind.
 */
import type { Argv } from 'yargs';
import { usageError } from '../errors.js';
import { parseByteCount } from './format.js';

export const ALLOCATION_UNIT_HELP =
  'Bytes a write allocates in the COW at once (default 4096: whole 4 KiB pages, because Debian\'s UML 6.1 kernel misreads a page mixing backing and COW sectors; 512 keeps sector granularity)';

export function withAllocationUnitOption<T>(y: Argv<T>): Argv<T> {
  return y.option('allocation-unit', { type: 'string', describe: ALLOCATION_UNIT_HELP });
}

/** The flag's value in bytes, or undefined when not given (the library's default). */
export function allocationUnitOf(argv: Record<string, unknown>): number | undefined {
  const text = argv['allocation-unit'];
  if (text === undefined) return undefined;
  const value = parseByteCount('allocation-unit', String(text));
  if (value < 512 || (value & (value - 1)) !== 0) {
    throw usageError(`--allocation-unit is ${JSON.stringify(String(text))}, expected a power of two of at least 512 bytes (4096, the default, for UML 6.1; 512 for sector granularity)`);
  }
  return value;
}
