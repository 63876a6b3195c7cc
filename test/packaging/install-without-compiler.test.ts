/**
 * The package installs and runs with no C toolchain: `npm pack`, then `npm install` of the
 * tarball into a fresh folder with CC and CXX set to /bin/false (so any add-on that compiles at
 * install fails the install), then `ubdcow demo` from there, which locks, writes and commits.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, removeTempDir } from '../helpers/tmp.js';
import { hasTool, repoRoot, titleWithSkipReason } from '../helpers/tools.js';

function why(): string[] {
  if (!hasTool('npm')) return ['npm'];
  const ping = spawnSync('npm', ['ping'], { encoding: 'utf8', timeout: 20_000 });
  return ping.status === 0 ? [] : ['the npm registry (npm ping failed)'];
}

const missing = why();

describe.skipIf(missing.length > 0)(titleWithSkipReason('npm install of the packed tarball needs no compiler', missing), () => {
  let work: string;
  beforeAll(() => {
    work = makeTempDir('ubdcow-pack-');
  });
  afterAll(() => {
    if (work) removeTempDir(work);
  });

  it('packs, installs with CC=/bin/false CXX=/bin/false, and `ubdcow demo` passes with no warning (and without koffi, with one)', () => {
    const pack = spawnSync('npm', ['pack', '--json', '--pack-destination', work], { cwd: repoRoot, encoding: 'utf8' });
    expect(pack.status, pack.stderr).toBe(0);
    // prepare's build output may precede the JSON on stdout.
    const packed = JSON.parse(pack.stdout.slice(pack.stdout.indexOf('[')))[0] as { filename: string; files: { path: string }[] };
    const tarball = path.join(work, path.basename(packed.filename));
    expect(packed.files.map((file) => file.path)).toEqual(expect.arrayContaining(['bin/ubdcow', 'dist/cli/main.js', 'dist/os/libc.js', 'fixtures/base.img']));

    const app = path.join(work, 'app');
    fs.mkdirSync(app);
    fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'fresh-app', version: '1.0.0', private: true }));
    const env = { ...process.env, CC: '/bin/false', CXX: '/bin/false', npm_config_fund: 'false', npm_config_audit: 'false', npm_config_update_notifier: 'false' };
    const install = spawnSync('npm', ['install', '--prefer-offline', '--no-save', tarball], { cwd: app, encoding: 'utf8', env });
    expect(install.status, `${install.stdout}\n${install.stderr}`).toBe(0);
    expect(fs.existsSync(path.join(app, 'node_modules', 'os-lock'))).toBe(false);
    expect(fs.existsSync(path.join(app, 'node_modules', 'koffi'))).toBe(true);

    const demo = spawnSync(path.join(app, 'node_modules', '.bin', 'ubdcow'), ['demo'], { cwd: app, encoding: 'utf8', env });
    expect(demo.status, demo.stderr).toBe(0);
    expect(demo.stdout).toMatch(/all steps passed/);
    // No "cannot be locked" warning: the prebuilt koffi binary loaded and took the fcntl lock.
    expect(demo.stderr).toBe('');
    const folder = /files in (\S+)/.exec(demo.stdout)?.[1];
    if (folder) fs.rmSync(folder, { recursive: true, force: true });

    // Where koffi cannot install (no prebuilt binary, no compiler), npm drops the optional
    // dependency; ubdcow then falls back, with one warning line and no stack trace.
    const bare = path.join(work, 'bare');
    fs.mkdirSync(bare);
    fs.writeFileSync(path.join(bare, 'package.json'), JSON.stringify({ name: 'bare-app', version: '1.0.0', private: true }));
    const withoutKoffi = spawnSync('npm', ['install', '--prefer-offline', '--no-save', '--omit=optional', tarball], { cwd: bare, encoding: 'utf8', env });
    expect(withoutKoffi.status, `${withoutKoffi.stdout}\n${withoutKoffi.stderr}`).toBe(0);
    expect(fs.existsSync(path.join(bare, 'node_modules', 'koffi'))).toBe(false);
    const fallback = spawnSync(path.join(bare, 'node_modules', '.bin', 'ubdcow'), ['demo'], { cwd: bare, encoding: 'utf8', env });
    expect(fallback.status, fallback.stderr).toBe(0);
    expect(fallback.stdout).toMatch(/all steps passed/);
    const lines = fallback.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^ubdcow: warning: .*cannot be locked here \(koffi did not load \(Cannot find (module|package) 'koffi'/);
    const bareFolder = /files in (\S+)/.exec(fallback.stdout)?.[1];
    if (bareFolder) fs.rmSync(bareFolder, { recursive: true, force: true });
  }, 300_000);
});
