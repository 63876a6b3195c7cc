/*
 * Issue 19 item 3: the package entry (dist/index.js) exports the API, not internals. The
 * commands and the engine are there; the bitmap cache and the OS helpers are not (they are
 * building blocks of src/io and src/os, free to change).
 */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';

describe('the package entry', () => {
  let api: Record<string, unknown>;
  beforeAll(async () => {
    ensureBuiltCli();
    api = await import(pathToFileURL(path.join(repoRoot, 'dist', 'index.js')).href);
  });

  it('exports the commands, the engine and the FileSystem seam', () => {
    for (const name of ['createCow', 'commitCow', 'openCow', 'inspectCow', 'checkCow', 'serveImage', 'customize', 'nodeFileSystem', 'parseHeader', 'UbdcowError']) {
      expect(typeof api[name], name).not.toBe('undefined');
    }
  });

  it('does not export internals: the bitmap cache, the OS bindings, the file-operation helpers', () => {
    for (const name of ['LazyBitmap', 'lazyBitmapOf', 'osCalls', 'osCallsUnavailable', 'cloneFile', 'cloneRange', 'copyRange', 'cloneOrCopyFile', 'punchHole', 'syncRange', 'dataExtents', 'isHole']) {
      expect(api[name], name).toBeUndefined();
    }
  });
});
