/*
 * `ubdcow serve` of a raw image file (no COW magic), which goes through the FileSystem seam like
 * a COW export: what qemu-io writes through NBD lands in the file at its offsets, and nbdcopy
 * reads back the file's bytes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useTempDir } from '../helpers/tmp.js';
import { run, titleWithSkipReason } from '../helpers/tools.js';
import { missingNbdTools, nbdUri, patternedBacking, socketIn, startServe } from './serve-harness.js';

const missing = missingNbdTools();
const SIZE = 1 << 20;

describe.skipIf(missing.length > 0)(titleWithSkipReason('serve of a raw image file', missing), () => {
  const tmp = useTempDir();

  it('writes land in the file, reads return its bytes', async () => {
    const image = path.join(tmp.path, 'disk.img');
    const original = patternedBacking(image, SIZE);
    const socket = socketIn(tmp.path);
    const served = await startServe([image, '--socket', socket]);
    try {
      const wrote = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8192 4096', nbdUri(socket)]);
      expect(wrote.status, wrote.stderr).toBe(0);
      const copy = path.join(tmp.path, 'copy.img');
      const copied = run('nbdcopy', [nbdUri(socket), copy]);
      expect(copied.status, copied.stderr).toBe(0);
      const expected = Buffer.from(original);
      expected.fill(0x5a, 8192, 8192 + 4096);
      expect(fs.readFileSync(copy).equals(expected)).toBe(true);
    } finally {
      expect(await served.stop('SIGTERM')).toBe(0);
    }
    const after = fs.readFileSync(image);
    expect(after.subarray(8192, 8192 + 4096).every((b) => b === 0x5a)).toBe(true);
    expect(after.subarray(0, 8192).equals(original.subarray(0, 8192))).toBe(true);
  });
});
