/**
 * Guest names are bytes, not text: an ext directory entry may hold any byte but '/' and NUL, in
 * any encoding (Latin-1 names from old systems, control characters from hostile ones). This file
 * is the one place that turns those bytes into what ubdcow shows:
 *
 * - a best-effort string (invalid UTF-8 becomes U+FFFD), for JSON and the library, plus the exact
 *   bytes (`nameBytes`/`pathBytes`, base64) when that string does not round-trip;
 * - for terminals (human output and error messages), GNU `ls --quoting-style=escape`'s spelling of
 *   the bytes that are not printable text: control characters (C0, DEL, C1) and bytes that are not
 *   UTF-8 become `\ooo` octal escapes of their bytes, and a backslash becomes `\\`, so an escape
 *   sequence in a name never reaches the terminal and the bytes can be told apart exactly.
 *
 * Invariant: `escapeName` output holds no control character; `unescapeName` inverts it.
 */

const strict = new TextDecoder('utf-8', { fatal: true });
const lossy = new TextDecoder('utf-8');

/** The bytes read as UTF-8 where they are, U+FFFD where they are not. */
export function decodeName(bytes: Uint8Array): string {
  return lossy.decode(bytes);
}

/** True when the bytes are valid UTF-8 (then `decodeName` loses nothing). */
export function isUtf8(bytes: Uint8Array): boolean {
  try {
    strict.decode(bytes);
    return true;
  } catch {
    return false;
  }
}

/** The base64 of the bytes when their UTF-8 reading is lossy, else undefined (for JSON's *Bytes fields). */
export function lossless(bytes: Uint8Array): string | undefined {
  return isUtf8(bytes) ? undefined : Buffer.from(bytes).toString('base64');
}

function isControl(code: number): boolean {
  return code < 0x20 || (code >= 0x7f && code <= 0x9f);
}

function octal(byte: number): string {
  return `\\${byte.toString(8).padStart(3, '0')}`;
}

/** Length of the valid UTF-8 sequence at `at`, or 0 when the byte there does not start one. */
function sequenceLength(bytes: Uint8Array, at: number): number {
  const first = bytes[at]!;
  const need = first < 0x80 ? 1 : first >= 0xc2 && first <= 0xdf ? 2 : first >= 0xe0 && first <= 0xef ? 3 : first >= 0xf0 && first <= 0xf4 ? 4 : 0;
  if (need <= 1 || at + need > bytes.length) return need === 1 ? 1 : 0;
  for (let i = 1; i < need; i++) if ((bytes[at + i]! & 0xc0) !== 0x80) return 0;
  // Overlong, surrogate and out-of-range forms.
  const second = bytes[at + 1]!;
  if (first === 0xe0 && second < 0xa0) return 0;
  if (first === 0xed && second > 0x9f) return 0;
  if (first === 0xf0 && second < 0x90) return 0;
  if (first === 0xf4 && second > 0x8f) return 0;
  return need;
}

/** The bytes as a terminal-safe string: printable UTF-8 as is, everything else `\ooo`, `\` as `\\`. */
export function escapeName(bytes: Uint8Array): string {
  let text = '';
  for (let at = 0; at < bytes.length; ) {
    const length = sequenceLength(bytes, at);
    if (length === 0) {
      text += octal(bytes[at]!);
      at++;
      continue;
    }
    const char = lossy.decode(bytes.subarray(at, at + length));
    const code = char.codePointAt(0)!;
    if (code === 0x5c) text += '\\\\';
    else if (isControl(code)) for (let i = 0; i < length; i++) text += octal(bytes[at + i]!);
    else text += char;
    at += length;
  }
  return text;
}

/** A string (a path the user typed, a message part) made terminal-safe the same way. */
export function escapeText(text: string): string {
  return escapeName(Buffer.from(text, 'utf8'));
}

/** The bytes `escapeName` spelled: `\ooo` and `\\` decoded, everything else as UTF-8. */
export function unescapeName(text: string): Uint8Array {
  const out: number[] = [];
  for (let at = 0; at < text.length; ) {
    if (text[at] === '\\' && text[at + 1] === '\\') {
      out.push(0x5c);
      at += 2;
    } else if (text[at] === '\\' && /^[0-3][0-7]{2}$/.test(text.slice(at + 1, at + 4))) {
      out.push(parseInt(text.slice(at + 1, at + 4), 8));
      at += 4;
    } else {
      const code = text.codePointAt(at)!;
      const char = String.fromCodePoint(code);
      out.push(...Buffer.from(char, 'utf8'));
      at += char.length;
    }
  }
  return Uint8Array.from(out);
}

/** `dir/name` as bytes (the root is `/`). */
export function joinPathBytes(dir: Uint8Array, name: Uint8Array): Uint8Array {
  const rootOnly = dir.length === 1 && dir[0] === 0x2f;
  const joined = new Uint8Array((rootOnly ? 1 : dir.length + 1) + name.length);
  if (!rootOnly) joined.set(dir);
  joined[rootOnly ? 0 : dir.length] = 0x2f;
  joined.set(name, rootOnly ? 1 : dir.length + 1);
  return joined;
}
