/* Guest names are bytes: the terminal spelling escapes every control character and every byte that
 * is not UTF-8, and reads back to the same bytes; JSON gets base64 only when the string is lossy. */
import { describe, expect, it } from 'vitest';
import { decodeName, escapeName, escapeText, lossless, unescapeName } from '../../src/guestfs/guest-names.js';

const bytes = (...values: number[]) => Uint8Array.from(values);

describe('guest names', () => {
  it('escapes C0, DEL, C1 (U+009B is a one-character CSI), invalid UTF-8 and backslashes as GNU ls -b does; keeps printable UTF-8', () => {
    expect(escapeName(Buffer.from('a\x1b]0;x\x07b'))).toBe('a\\033]0;x\\007b');
    expect(escapeName(Buffer.from('tab\there\nnl\x7f'))).toBe('tab\\011here\\012nl\\177');
    expect(escapeName(Buffer.from('\u009b31m'))).toBe('\\302\\23331m');
    expect(escapeName(bytes(0x63, 0x61, 0x66, 0xe9))).toBe('caf\\351');
    expect(escapeName(Buffer.from('back\\slash'))).toBe('back\\\\slash');
    expect(escapeName(Buffer.from('café ☃ 😀'))).toBe('café ☃ 😀');
    // Overlong and surrogate encodings are not UTF-8.
    expect(escapeName(bytes(0xc0, 0xaf))).toBe('\\300\\257');
    expect(escapeName(bytes(0xed, 0xa0, 0x80))).toBe('\\355\\240\\200');
    expect(escapeText('x\x1by')).toBe('x\\033y');
  });

  it('unescapeName reads the escaped spelling back to the exact bytes', () => {
    for (const name of [bytes(0x63, 0x61, 0x66, 0xe9), Buffer.from('a\x1b]0;x\x07b\\c'), Buffer.from('\u009bé😀'), bytes(0xff, 0x5c, 0x30)]) {
      expect(Buffer.from(unescapeName(escapeName(name)))).toEqual(Buffer.from(name));
    }
  });

  it('JSON: the UTF-8 reading, plus base64 of the bytes only when that reading is lossy', () => {
    expect(decodeName(bytes(0x63, 0x61, 0x66, 0xe9))).toBe('caf\uFFFD');
    expect(lossless(bytes(0x63, 0x61, 0x66, 0xe9))).toBe(Buffer.from([0x63, 0x61, 0x66, 0xe9]).toString('base64'));
    expect(lossless(Buffer.from('esc\x1b'))).toBeUndefined();
  });
});
