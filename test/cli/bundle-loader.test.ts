import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { cacheLocations, commandOf, readCache, writeCache } from '../../src/cli/bundle-loader.js';
import { useTempDir } from '../helpers/tmp.js';
import { ensureBuiltCli, repoRoot } from '../helpers/tools.js';

/*
 * The CLI bundle's V8 code cache (src/cli/bundle-loader.ts) saves compile time and nothing else:
 * a changed bundle (even one of the same length, which V8 alone would not notice), a damaged or
 * foreign cache, or a folder it cannot be written to never change what runs nor make it fail.
 * Real processes load small bundles through the built loader, as bin/ubdcow does.
 */

const loader = path.join(repoRoot, 'dist', 'cli', 'bundle-loader.js');

beforeAll(() => {
  ensureBuiltCli();
});

/** A bundle whose main prints `word` and its argv; a CommonJS module as scripts/bundle-cli.mjs makes. */
function writeBundle(file: string, word: string): void {
  const body = Array.from({ length: 200 }, (_, i) => `function helper${i}(x) { return x + ${i}; }`).join('\n');
  fs.writeFileSync(file, `${body}\nexports.main = async (argv) => { process.stdout.write(${JSON.stringify(word)} + ' ' + argv.join(',') + ' ' + helper7(1) + ' ' + path.basename(__filename) + '\\n'); };\nconst path = require('node:path');\n`);
}

/** Loads `bundle` in a new process as bin/ubdcow does; stdout has the bundle's line, then how the cache was used. */
function load(bundle: string, argv: string[], env: NodeJS.ProcessEnv = {}) {
  const script = `import(${JSON.stringify(loader)}).then(async (l) => { const r = l.loadBundleReporting(new URL(${JSON.stringify(`file://${bundle}`)}), process.argv.slice(1)); await r.exports.main(process.argv.slice(1)); process.stdout.write('cache ' + r.cache + '\\n'); });`;
  const result = spawnSync(process.execPath, ['--input-type=module', '-e', script, ...argv], { encoding: 'utf8', env: { ...process.env, ...env } });
  expect(result.stderr).toBe('');
  expect(result.status).toBe(0);
  const [line, cache] = result.stdout.trim().split('\n');
  return { line, cache: cache?.replace(/^cache /, '') };
}

describe('the CLI bundle code cache', () => {
  const tmp = useTempDir();

  it('names runs by command; help and version runs are one kind', () => {
    expect(commandOf(['commit', 'a.cow', 'out.img'])).toBe('commit');
    expect(commandOf(['--quiet', 'inspect', 'x'])).toBe('inspect');
    expect(commandOf(['commit', '--help'])).toBe('-');
    expect(commandOf(['-V'])).toBe('-');
    expect(commandOf([])).toBe('-');
    expect(commandOf(['/some/file'])).toBe('-');
  });

  it('reads back what it wrote, and refuses another key, a damaged byte, a short file and garbage', () => {
    const file = path.join(tmp.path, 'c.v8cache');
    const data = Buffer.from('some compiled code'.repeat(100));
    expect(writeCache(file, { key: 'k1', commands: ['commit'] }, data)).toBe(true);
    expect(readCache(file, 'k1')?.data.equals(data)).toBe(true);
    expect(readCache(file, 'k1')?.header.commands).toEqual(['commit']);
    expect(readCache(file, 'k2')).toBeUndefined();
    const bytes = fs.readFileSync(file);
    bytes[bytes.length - 10] ^= 1;
    fs.writeFileSync(file, bytes);
    expect(readCache(file, 'k1')).toBeUndefined();
    fs.writeFileSync(file, bytes.subarray(0, bytes.length - 100));
    expect(readCache(file, 'k1')).toBeUndefined();
    fs.writeFileSync(file, 'garbage');
    expect(readCache(file, 'k1')).toBeUndefined();
    expect(readCache(path.join(tmp.path, 'absent'), 'k1')).toBeUndefined();
    // Nothing but the cache itself is left in the folder (no temporary files).
    expect(fs.readdirSync(tmp.path)).toEqual(['c.v8cache']);
  });

  it('saves a cache beside the bundle, uses it next time, and grows it for a new command only', () => {
    const bundle = path.join(tmp.path, 'bundle.cjs');
    writeBundle(bundle, 'hello');
    const [beside] = cacheLocations(bundle);
    expect(load(bundle, ['commit', 'x'])).toEqual({ line: 'hello commit,x 8 bundle.cjs', cache: 'none' });
    expect(fs.existsSync(beside)).toBe(true);
    expect(load(bundle, ['commit', 'y'])).toEqual({ line: 'hello commit,y 8 bundle.cjs', cache: 'used' });
    const saved = fs.statSync(beside).mtimeMs;
    expect(load(bundle, ['commit', 'z']).cache).toBe('used');
    // Same command again: no rewrite.
    expect(fs.statSync(beside).mtimeMs).toBe(saved);
    expect(load(bundle, ['map']).cache).toBe('used');
    const header = fs.readFileSync(beside, 'latin1').split('\n')[1];
    expect(JSON.parse(header).commands).toEqual(['commit', 'map']);
  });

  it('runs a changed bundle of the same length as itself, never the cached old code', () => {
    const bundle = path.join(tmp.path, 'bundle.cjs');
    writeBundle(bundle, 'old');
    expect(load(bundle, ['commit']).line).toMatch(/^old /);
    expect(load(bundle, ['commit']).cache).toBe('used');
    const before = fs.statSync(bundle).size;
    writeBundle(bundle, 'new');
    expect(fs.statSync(bundle).size).toBe(before);
    expect(load(bundle, ['commit'])).toEqual({ line: 'new commit 8 bundle.cjs', cache: 'none' });
    expect(load(bundle, ['commit'])).toEqual({ line: 'new commit 8 bundle.cjs', cache: 'used' });
  });

  it('runs correctly over a damaged cache, and replaces it', () => {
    const bundle = path.join(tmp.path, 'bundle.cjs');
    writeBundle(bundle, 'hello');
    load(bundle, ['commit']);
    const [beside] = cacheLocations(bundle);
    const bytes = fs.readFileSync(beside);
    for (let i = bytes.length - 2000; i < bytes.length; i += 7) bytes[i] ^= 0x5a;
    fs.writeFileSync(beside, bytes);
    expect(load(bundle, ['commit'])).toEqual({ line: 'hello commit 8 bundle.cjs', cache: 'none' });
    expect(load(bundle, ['commit']).cache).toBe('used');
  });

  it('falls back to the user cache folder where the bundle folder takes no cache, and runs where neither does', () => {
    const bundle = path.join(tmp.path, 'bundle.cjs');
    writeBundle(bundle, 'hello');
    const [beside] = cacheLocations(bundle);
    // A folder where the cache would go: the rename over it fails as on a read-only install
    // (permissions cannot show that here: the tests may run as root).
    fs.mkdirSync(beside);
    const env = { XDG_CACHE_HOME: path.join(tmp.path, 'xdg') };
    expect(load(bundle, ['commit'], env).cache).toBe('none');
    const userCache = cacheLocations(bundle, env)[1];
    expect(path.dirname(userCache)).toBe(path.join(tmp.path, 'xdg', 'ubdcow'));
    expect(fs.existsSync(userCache)).toBe(true);
    expect(fs.statSync(path.dirname(userCache)).mode & 0o777).toBe(0o700);
    expect(load(bundle, ['commit'], env)).toEqual({ line: 'hello commit 8 bundle.cjs', cache: 'used' });
    // The user cache folder a file: no cache anywhere, the program runs all the same, silently.
    const blocked = { XDG_CACHE_HOME: path.join(tmp.path, 'file-not-folder') };
    fs.writeFileSync(blocked.XDG_CACHE_HOME, '');
    expect(load(bundle, ['commit'], blocked)).toEqual({ line: 'hello commit 8 bundle.cjs', cache: 'none' });
    expect(load(bundle, ['commit'], blocked).cache).toBe('none');
    expect(fs.readdirSync(tmp.path).sort()).toEqual(['bundle.cjs', 'bundle.cjs.v8cache', 'file-not-folder', 'xdg']);
  });
});
