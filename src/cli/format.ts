import { UbdcowError } from '../errors.js';

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

export function toJson(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

const sizeSuffixes: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** Parses a byte count: a whole number, optionally with a binary suffix (K, M, G, T; "KiB" too). */
export function parseByteCount(text: string, option: string): number {
  const match = /^(\d+)\s*([kmgt]?)(?:i?b)?$/i.exec(String(text).trim());
  const value = match ? Number(match[1]) * sizeSuffixes[match[2].toLowerCase()] : NaN;
  if (!Number.isSafeInteger(value)) {
    throw new UbdcowError('usage', `--${option} is ${JSON.stringify(text)}, expected a byte count such as 4096, 64K or 1G`);
  }
  return value;
}
