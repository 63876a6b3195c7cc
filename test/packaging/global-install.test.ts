/**
 * The package as a user gets it: `npm pack`, then `npm install -g` of the tarball into a clean
 * prefix, then `ubdcow demo` from a clean folder, with nothing of this checkout on the way. Proves
 * the tarball carries everything the program needs (and the man page npm links), and nothing
 * a user does not run or read.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ensureBuiltCli, hasTool, repoRoot } from '../helpers/tools.js';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';

const dir = makeTempDir('ubdcow-pack-');
afterAll(() => removeTempDir(dir));

describe.skipIf(!hasTool('npm'))(`packed tarball installed globally${hasTool('npm') ? '' : ' [skipped: npm not installed]'}`, () => {
  it(
    'installs with npm install -g and runs ubdcow demo; ships the man page, no source maps or developer files',
    () => {
      // --ignore-scripts: no rebuild of dist/ under the feet of test files running beside this one.
      ensureBuiltCli();
      expect(spawnSync(process.execPath, ['scripts/make-man.mjs'], { cwd: repoRoot }).status).toBe(0);
      const pack = spawnSync('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', dir], { cwd: repoRoot, encoding: 'utf8' });
      expect(pack.status, pack.stderr).toBe(0);
      const [{ filename, files }] = JSON.parse(pack.stdout) as [{ filename: string; files: { path: string }[] }];
      const shipped = files.map((file) => file.path);
      expect(shipped).toContain('LICENSE');
      expect(shipped).toContain('man/ubdcow.1');
      expect(shipped).toContain('fixtures/base.img');
      expect(shipped.filter((file) => file.endsWith('.map'))).toEqual([]);
      expect(shipped).not.toContain('fixtures/make-fixtures.ts');
      expect(shipped).not.toContain('docs/benchmarks.md');
      expect(shipped.filter((file) => /^(src|test|bench)\//.test(file))).toEqual([]);

      const prefix = path.join(dir, 'prefix');
      const install = spawnSync('npm', ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', path.join(dir, filename)], {
        cwd: dir,
        encoding: 'utf8',
      });
      expect(install.status, install.stderr).toBe(0);
      expect(fs.existsSync(path.join(prefix, 'share', 'man', 'man1', 'ubdcow.1'))).toBe(true);

      const work = path.join(dir, 'clean-folder');
      fs.mkdirSync(work);
      const demo = spawnSync(path.join(prefix, 'bin', 'ubdcow'), ['demo'], { cwd: work, encoding: 'utf8' });
      expect(demo.status, `${demo.stdout}${demo.stderr}`).toBe(0);
      expect(demo.stdout).toMatch(/all steps passed/);
      expect(fs.readdirSync(work)).toEqual([]);
    },
    180_000,
  );
});
