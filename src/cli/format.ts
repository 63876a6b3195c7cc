import { usageError } from '../errors.js';

/** Human-readable output helpers (the JSON output never uses these). */

const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const shown = unit === 0 ? String(value) : value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2);
  return `${shown} ${units[unit]}`;
}

/** Two columns, labels padded so the values line up. */
export function formatTable(rows: Array<[string, string | number]>): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return rows.map(([label, value]) => `${`${label}:`.padEnd(width + 2)}${value}`).join('\n');
}

/**
 * The version of the JSON the commands print. Fields may be added within a version; a field is
 * renamed, removed or changes meaning only with a new version.
 */
export const JSON_SCHEMA_VERSION = 1;

/** A command's JSON output: an object, with `schemaVersion` first. */
export function toJson(value: object): string {
  return JSON.stringify({ schemaVersion: JSON_SCHEMA_VERSION, ...value }, null, 2);
}

const sizeUnits: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50 };

/** A byte count as users type it: `4096`, `0x1000`, `4K`, `1MiB`, `2G` (binary units). */
export function parseByteCount(option: string, text: string): number {
  const match = /^(0x[0-9a-f]+|\d+)\s*(?:([kmgtp])(?:i?b)?|(b))?$/i.exec(text.trim());
  const value = match ? Number(match[1]) * sizeUnits[(match[2] ?? match[3] ?? '').toLowerCase()] : NaN;
  if (!Number.isSafeInteger(value)) {
    throw usageError(`--${option} is ${JSON.stringify(text)}, expected a byte count such as 4096, 0x1000, 64K or 1MiB`);
  }
  return value;
}

let quiet = false;

/** `-q/--quiet`: no warnings and no confirmations; the data a command was asked for still prints. */
export function setQuiet(value: boolean): void {
  quiet = value;
}

/** A line of the data the command was asked for (a report, ranges, JSON): printed even with -q. */
export function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

/** A confirmation of what was done ("created …", "committed …"): silent with -q, like qemu-img -q. */
export function note(text: string): void {
  if (!quiet) out(text);
}

/** Warnings on stderr, one line each, named after the command; silent with -q. */
export function warn(command: string, warnings: string[]): void {
  if (quiet) return;
  for (const warning of warnings) process.stderr.write(`ubdcow ${command}: warning: ${warning}\n`);
}

/** `n thing` / `n things`: "1 extent", "2 extents", "0 extents". */
export function plural(count: number, singular: string, pluralForm = `${singular}s`): string {
  return `${count} ${count === 1 ? singular : pluralForm}`;
}
