#!/usr/bin/env node
/*
 * Bundles the command line program (dist/cli/main.js and everything it imports, yargs included)
 * into one file, dist/cli/bundle.cjs, which bin/ubdcow loads (through dist/cli/bundle-loader.js,
 * with a V8 code cache). Why: Node 20 spends ~40 ms resolving and loading the ~100 modules one by
 * one at every start, a large share of a command that does its work in a few hundred milliseconds
 * (commit of a scattered COW, inspect, write). CommonJS, not ESM, because Node 20 can cache the
 * compiled code of a script (vm.Script cachedData) but not of an ES module. The library
 * (dist/index.js) stays unbundled. The bundle sits beside main.js so paths taken from
 * import.meta.url (the demo's fixture, package.json) stay the same: import.meta.url becomes the
 * bundle's own URL. Native and WebAssembly packages, and those loaded only by some commands, stay
 * outside and load from node_modules as before. Run by `npm run build`, after tsc.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * yargs takes its "main file" (the folder it searches for package.json settings, and its locale
 * files) from its own module's location, cut before "node_modules". Inside the bundle that would be
 * the bundle's location, with no "node_modules" in it, and yargs then falls back to
 * process.cwd(), which throws in a folder deeper than PATH_MAX. So the shim keeps seeing the
 * location it has without the bundle, computed from the bundle's own at run time.
 */
const yargsShimLocation = {
  name: 'yargs-shim-location',
  setup(build) {
    build.onLoad({ filter: /[\\/]yargs[\\/]lib[\\/]platform-shims[\\/]esm\.mjs$/ }, async (args) => {
      const source = await fs.readFile(args.path, 'utf8');
      if (!source.includes('import.meta.url')) throw new Error(`${args.path}: no import.meta.url to relocate; check scripts/bundle-cli.mjs against this yargs`);
      const location = "new URL('../../node_modules/yargs/lib/platform-shims/esm.mjs', import.meta.url).href";
      return { contents: source.replaceAll('import.meta.url', location), loader: 'js', resolveDir: path.dirname(args.path) };
    });
  },
};

/**
 * string-width (yargs' and cliui's, to lay out help text) builds an Intl.Segmenter and Unicode
 * property regular expressions (\p{RGI_Emoji}) when its module is evaluated: ~25 ms of CPU at
 * every start, although only help and usage errors measure text. Each import of it gets a
 * stand-in that loads the real module (esbuild wraps a require()d module so that its top level
 * runs at the first require) on the first call.
 */
const lazyStringWidth = {
  name: 'lazy-string-width',
  setup(build) {
    build.onResolve({ filter: /^string-width$/ }, async (args) => {
      if (args.pluginData?.real) return undefined;
      const real = await build.resolve(args.path, { kind: args.kind, importer: args.importer, resolveDir: args.resolveDir, pluginData: { real: true } });
      if (real.errors.length > 0) return { errors: real.errors };
      return { path: real.path, namespace: 'lazy-string-width' };
    });
    build.onLoad({ filter: /.*/, namespace: 'lazy-string-width' }, (args) => ({
      contents: [
        'let stringWidth;',
        'export default function lazyStringWidth(string, options) {',
        `  stringWidth ??= require(${JSON.stringify(args.path)}).default;`,
        '  return stringWidth(string, options);',
        '}',
      ].join('\n'),
      loader: 'js',
      resolveDir: path.dirname(args.path),
    }));
  },
};

// The ES module bundle of earlier builds; nothing loads it now.
await fs.rm(path.join(root, 'dist', 'cli', 'bundle.js'), { force: true });

await build({
  entryPoints: [path.join(root, 'dist', 'cli', 'main.js')],
  outfile: path.join(root, 'dist', 'cli', 'bundle.cjs'),
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  // The wrapper bundle-loader.ts runs the bundle in gives it __filename, as Node gives a module.
  define: { 'import.meta.url': '__bundleUrl' },
  banner: { js: 'var __bundleUrl = require("node:url").pathToFileURL(__filename).href;' },
  external: ['koffi', 'ext2fs', 'cli-progress'],
  plugins: [yargsShimLocation, lazyStringWidth],
  logLevel: 'warning',
});
