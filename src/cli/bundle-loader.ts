/**
 * Loads the one-file CLI bundle (dist/cli/bundle.cjs, made by scripts/bundle-cli.mjs) with a V8
 * code cache. Why: compiling the ~770 KB bundle, and then each function the command calls, took
 * ~30-50 ms of every run (a fifth of a small command's time). Node 20 has no compile cache of its
 * own (module.enableCompileCache is Node 22), so the bundle is compiled through vm.Script with
 * `cachedData`, and after a run of a command not seen before, V8's code for every function
 * compiled so far is saved (createCachedData) for the next run.
 *
 * Invariant: the cache only ever saves compile time; it never changes what runs, and no problem
 * with it can stop the program. It is used only when its key (a hash of the bundle's text, the
 * Node version, the architecture) and the checksum of its data match, V8 checks its own version
 * and flags and may still reject it (the bundle then compiles as without a cache), it is replaced
 * atomically (temporary file and rename, so no reader sees half a file), and every failure to
 * read or write it is ignored. It lives beside the bundle, or where that folder is not writable
 * (a read-only or root-owned install) in the user's cache folder ($XDG_CACHE_HOME or ~/.cache,
 * ubdcow/), which must belong to the user.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as vm from 'node:vm';

/** What the bundle exports (src/cli/main.ts). */
export interface CliBundle {
  main(argv: string[]): Promise<void>;
}

const MAGIC = 'ubdcow-v8-code-cache 1\n';
/** A cache names the commands whose functions it holds; past this many it stops growing. */
const MAX_COMMANDS = 64;

interface CacheHeader {
  key: string;
  /** sha256 of the data that follows the header. */
  sum: string;
  commands: string[];
}

interface CacheFile {
  header: CacheHeader;
  data: Buffer;
}

function sha256(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Where the cache may live, in order of preference. */
export function cacheLocations(bundleFile: string, env: NodeJS.ProcessEnv = process.env): string[] {
  const besideBundle = `${bundleFile}.v8cache`;
  const base = env.XDG_CACHE_HOME && path.isAbsolute(env.XDG_CACHE_HOME) ? env.XDG_CACHE_HOME : path.join(os.homedir(), '.cache');
  // One cache per installed bundle: its path, hashed, names the file.
  const userCache = path.join(base, 'ubdcow', `${sha256(path.resolve(bundleFile)).slice(0, 16)}.v8cache`);
  return [besideBundle, userCache];
}

/** The cache's header and data, or undefined when it is missing, damaged, or for another bundle. */
export function readCache(file: string, key: string): CacheFile | undefined {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch {
    return undefined;
  }
  if (bytes.subarray(0, MAGIC.length).toString('latin1') !== MAGIC) return undefined;
  const headerEnd = bytes.indexOf(10, MAGIC.length);
  if (headerEnd < 0) return undefined;
  let header: CacheHeader;
  try {
    header = JSON.parse(bytes.subarray(MAGIC.length, headerEnd).toString('utf8')) as CacheHeader;
  } catch {
    return undefined;
  }
  if (header?.key !== key || typeof header.sum !== 'string' || !Array.isArray(header.commands)) return undefined;
  const data = bytes.subarray(headerEnd + 1);
  // V8 checks a code cache's version, flags and source length, not its bytes: damaged bytes
  // would be run as code. The checksum stands between them.
  if (sha256(data) !== header.sum) return undefined;
  return { header, data };
}

/** Writes the cache to `file` atomically; false when it could not (nothing is left behind). */
export function writeCache(file: string, header: Omit<CacheHeader, 'sum'>, data: Buffer): boolean {
  const temporary = `${file}.${process.pid}-${Math.random().toString(36).slice(2, 10)}.tmp`;
  try {
    const full: CacheHeader = { ...header, sum: sha256(data) };
    fs.writeFileSync(temporary, Buffer.concat([Buffer.from(MAGIC + JSON.stringify(full) + '\n'), data]), { flag: 'wx', mode: 0o644 });
    fs.renameSync(temporary, file);
    return true;
  } catch {
    try {
      fs.unlinkSync(temporary);
    } catch {
      // Never created.
    }
    return false;
  }
}

/** Creates the user's cache folder (private) and checks that it is the user's own. */
function userCacheFolderReady(folder: string): boolean {
  try {
    fs.mkdirSync(folder, { recursive: true, mode: 0o700 });
    const stat = fs.statSync(folder);
    return stat.isDirectory() && (typeof process.getuid !== 'function' || stat.uid === process.getuid()) && (stat.mode & 0o022) === 0;
  } catch {
    return false;
  }
}

/**
 * The kind of run, as the cache names it: the command (the first word that is not an option), or
 * "-" for help and version output (which run none of a command's own code).
 */
export function commandOf(argv: string[]): string {
  if (argv.some((arg) => arg === '--help' || arg === '-h' || arg === '--version' || arg === '-V')) return '-';
  const word = argv.find((arg) => !arg.startsWith('-'));
  return word !== undefined && /^[a-z][a-z0-9-]{0,31}$/.test(word) ? word : '-';
}

/** How a load used the code cache: none found, used, or rejected by V8 (then compiled anew). */
export type CacheUse = 'none' | 'used' | 'rejected';

/**
 * Compiles and runs the bundle (CommonJS, wrapped as Node wraps a module), with the code cache
 * when there is a valid one, and saves a fresh cache when the process exits if this run compiled
 * code the cache did not have (no cache, a rejected one, or a command not run before).
 */
export function loadBundle(bundleUrl: URL, argv: string[]): CliBundle {
  return loadBundleReporting(bundleUrl, argv).exports;
}

/** loadBundle, telling also how the cache was used (for tests). */
export function loadBundleReporting(bundleUrl: URL, argv: string[], env: NodeJS.ProcessEnv = process.env): { exports: CliBundle; cache: CacheUse } {
  const bundleFile = fileURLToPath(bundleUrl);
  const source = fs.readFileSync(bundleFile, 'utf8');
  const key = `${sha256(source)} ${process.version} ${process.arch}`;
  const locations = cacheLocations(bundleFile, env);
  let cache: CacheFile | undefined;
  for (const location of locations) {
    cache = readCache(location, key);
    if (cache) break;
  }
  const wrapped = `(function (exports, require, module, __filename, __dirname) {${source}\n})`;
  const script = new vm.Script(wrapped, { filename: bundleFile, cachedData: cache?.data });
  const used: CacheUse = cache === undefined ? 'none' : script.cachedDataRejected ? 'rejected' : 'used';
  const command = commandOf(argv);
  const seen = used === 'used' ? cache!.header.commands : [];
  if (!seen.includes(command) && seen.length < MAX_COMMANDS) {
    process.once('exit', () => saveCache(script, locations, { key, commands: [...seen, command] }));
  }
  const module = { exports: {} as CliBundle };
  const run = script.runInThisContext() as (...args: unknown[]) => void;
  run.call(module.exports, module.exports, createRequire(bundleFile), module, bundleFile, path.dirname(bundleFile));
  return { exports: module.exports, cache: used };
}

function saveCache(script: vm.Script, locations: string[], header: Omit<CacheHeader, 'sum'>): void {
  try {
    const data = script.createCachedData();
    for (const [index, location] of locations.entries()) {
      if (index > 0 && !userCacheFolderReady(path.dirname(location))) continue;
      if (writeCache(location, header, data)) return;
    }
  } catch {
    // A cache is an optimisation: never a reason to fail, nor to say anything.
  }
}
