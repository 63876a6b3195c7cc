/**
 * A guest path typed on the command line, as the bytes the user gave. Guest names are bytes, but
 * Node hands process.argv over decoded as UTF-8, a byte that is not UTF-8 already replaced by
 * U+FFFD: `ubdcow get vm.cow $'/caf\xe9'` would look for "/caf\uFFFD". On Linux the exact bytes
 * are still in /proc/self/cmdline, so an argument with U+FFFD in it is taken from there.
 * The spelling `ls` prints for such names (`caf\351`, see guest-names.ts) names them too: when the
 * literal path does not exist, the command retries with it unescaped (see `withEscapedRetry`).
 */
import * as fs from 'node:fs';
import { UbdcowError } from '../errors.js';
import { decodeName, unescapeName } from '../guestfs/guest-names.js';

/** The raw bytes of the argument that Node decoded to `value` (or `value` as UTF-8). */
export function guestPathArgument(value: string): Uint8Array {
  const utf8 = Buffer.from(value, 'utf8');
  if (!value.includes('\uFFFD')) return utf8;
  let raw: Buffer[];
  try {
    const cmdline = fs.readFileSync('/proc/self/cmdline');
    raw = [];
    for (let start = 0; start < cmdline.length; ) {
      const end = cmdline.indexOf(0, start);
      raw.push(cmdline.subarray(start, end < 0 ? cmdline.length : end));
      start = end < 0 ? cmdline.length : end + 1;
    }
  } catch {
    return utf8;
  }
  const matches = raw.filter((arg) => decodeName(arg) === value);
  // Two different byte strings that read the same: no way to tell which was meant.
  return matches.length > 0 && matches.every((m) => m.equals(matches[0]!)) ? new Uint8Array(matches[0]!) : utf8;
}

/** Runs `run` on the path as typed; if that is not found and it has `\` escapes, on the bytes they spell. */
export async function withEscapedRetry<T>(typed: string, run: (path: Uint8Array) => Promise<T>): Promise<T> {
  try {
    return await run(guestPathArgument(typed));
  } catch (err) {
    const unescaped = unescapeName(typed);
    if (!(err instanceof UbdcowError && err.code === 'not-found') || !typed.includes('\\') || Buffer.from(unescaped).equals(Buffer.from(typed, 'utf8'))) throw err;
    try {
      return await run(unescaped);
    } catch (retryErr) {
      // The escaped spelling found something after all (a directory where a file was wanted...): say that.
      if (retryErr instanceof UbdcowError && retryErr.code !== 'not-found') throw retryErr;
      throw err;
    }
  }
}
