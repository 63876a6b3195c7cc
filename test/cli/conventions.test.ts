/**
 * What a new user trips on (issue 14): the qemu-img/POSIX conventions, one JSON vocabulary, the
 * wording of errors, the setups UML cannot use, and the library's run-time option checks. The CLI
 * is run as a child process, the library through the package entry (dist/index.js).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureBuiltCli, hasTool, repoRoot, run } from '../helpers/tools.js';
import { makeTempDir, useTempDir } from '../helpers/tmp.js';

let cli: string;
beforeAll(() => {
  cli = ensureBuiltCli();
});

const tmp = useTempDir();

function ubdcow(args: string[], options: { cwd?: string; input?: string } = {}) {
  return run(process.execPath, [cli, ...args], { cwd: options.cwd ?? tmp.path, input: options.input });
}

/** One line on stderr, no stack trace, the given exit code. */
function expectOneLine(result: ReturnType<typeof ubdcow>, status: number, pattern: RegExp): void {
  expect(result.status, result.stderr).toBe(status);
  const lines = result.stderr.split('\n').filter((line) => line !== '');
  expect(lines, result.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(pattern);
  expect(result.stderr).not.toMatch(/^\s+at |internal error/m);
}

function makeCow(name = 'vm.cow', base = 'base.img'): string {
  const basePath = path.join(tmp.path, base);
  if (!fs.existsSync(basePath)) fs.writeFileSync(basePath, Buffer.alloc(1 << 20, 7));
  const created = ubdcow(['create', name, base]);
  expect(created.status, created.stderr).toBe(0);
  return path.join(tmp.path, name);
}

describe('conventions shared with qemu-img and POSIX tools', () => {
  it('-q silences confirmations and warnings, not the data asked for', () => {
    fs.writeFileSync(path.join(tmp.path, 'base.img'), Buffer.alloc(1 << 20));
    const loud = ubdcow(['create', 'my vm.cow', 'base.img']);
    expect(loud.stdout).toMatch(/^created my vm\.cow/);
    expect(loud.stderr).toMatch(/warning: my vm\.cow: the path holds a comma or white space/);
    const quiet = ubdcow(['create', '-q', 'other vm.cow', 'base.img']);
    expect(quiet).toMatchObject({ status: 0, stdout: '', stderr: '' });
    const report = ubdcow(['inspect', '--quiet', 'other vm.cow']);
    expect(report.stdout).toMatch(/^file: +other vm\.cow/);
    const wrote = ubdcow(['write', '-q', 'other vm.cow', '--offset', '10'], { input: 'hi' });
    expect(wrote).toMatchObject({ status: 0, stdout: '', stderr: '' });
  });

  it('-V and --version print the version', () => {
    const { version } = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
    expect(ubdcow(['-V']).stdout.trim()).toBe(version);
    expect(ubdcow(['--version']).stdout.trim()).toBe(version);
  });

  it('--output=json is --json; a command without JSON output says so', () => {
    makeCow();
    const json = ubdcow(['inspect', 'vm.cow', '--json']);
    const output = ubdcow(['inspect', 'vm.cow', '--output=json']);
    expect(output.status).toBe(0);
    expect(output.stdout).toBe(json.stdout);
    expect(ubdcow(['map', '--output', 'json', 'vm.cow']).stdout).toBe(ubdcow(['map', 'vm.cow', '--json']).stdout);
    expectOneLine(ubdcow(['cat', 'vm.cow', '--output=json']), 1, /^ubdcow cat: --output=json: cat has no JSON output/);
  });

  it('info is inspect', () => {
    makeCow();
    const info = ubdcow(['info', 'vm.cow']);
    expect(info.status).toBe(0);
    expect(info.stdout).toBe(ubdcow(['inspect', 'vm.cow']).stdout);
  });

  it('names an unknown option, even where it swallowed the file name', () => {
    makeCow();
    expectOneLine(ubdcow(['check', '--bogus', 'vm.cow']), 2, /^ubdcow check: unknown option --bogus \(see ubdcow check --help\)$/);
    expectOneLine(ubdcow(['map', 'vm.cow', '-x']), 1, /^ubdcow map: unknown option -x /);
    expectOneLine(ubdcow(['inspect', 'vm.cow', '--jsn']), 1, /^ubdcow inspect: unknown option --jsn /);
    // Negated and aliased forms of real options are not unknown.
    expect(ubdcow(['inspect', 'vm.cow', '--no-json']).status).toBe(0);
  });

  it('--help shows --no-progress; completion prints a shell script', () => {
    expect(ubdcow(['commit', '--help']).stdout).toMatch(/--no-progress/);
    const completion = ubdcow(['completion']);
    expect(completion.status).toBe(0);
    expect(completion.stdout).toMatch(/ubdcow/);
    expect(completion.stdout).toMatch(/complete -o|compdef/);
  });

  it('check exits 2 when it could not check, 1 only for problems found', () => {
    expectOneLine(ubdcow(['check', 'missing.cow']), 2, /missing\.cow: cannot open COW file: no such file/);
    makeCow();
    expect(ubdcow(['check', 'vm.cow']).status).toBe(0);
  });
});

describe('one JSON vocabulary', () => {
  it('create --json uses the names inspect --json uses, with schemaVersion', () => {
    fs.writeFileSync(path.join(tmp.path, 'base.img'), Buffer.alloc(1 << 20));
    const created = JSON.parse(ubdcow(['create', 'vm.cow', 'base.img', '--json']).stdout);
    const inspected = JSON.parse(ubdcow(['inspect', 'vm.cow', '--json']).stdout);
    expect(created.schemaVersion).toBe(1);
    expect(inspected.schemaVersion).toBe(1);
    expect(created).not.toHaveProperty('littleEndian');
    expect(created).not.toHaveProperty('fileLength');
    for (const key of Object.keys(created)) expect(inspected, key).toHaveProperty(key);
    for (const key of ['byteOrder', 'fileSize', 'bitmapOffset', 'dataOffset', 'mtimeIso']) expect(created[key]).toEqual(inspected[key]);
  });
});

describe('wording', () => {
  it('names the kind of a special file in words', () => {
    expectOneLine(ubdcow(['check', '/dev/null']), 2, /\/dev\/null: is a character device, socket or other special file, expected a COW file/);
  });

  it('refuses standard input ("-") with the reason', () => {
    expectOneLine(ubdcow(['inspect', '-']), 1, /no file name given for the COW file \('-', standard input, is not supported/);
  });

  it('works from a folder whose path is longer than PATH_MAX', () => {
    // Its own folder: Node's fs.rmSync cannot remove a tree this deep, GNU rm can.
    const top = makeTempDir();
    try {
      fs.writeFileSync(path.join(top, 'base.img'), Buffer.alloc(1 << 20));
      const name = 'd'.repeat(200); // 22 levels: over 4,400 bytes, past PATH_MAX (4096)
      const node = `"${process.execPath}" "${cli}"`;
      const script = `cd ${top} && for i in $(seq 1 22); do mkdir ${name} && cd ${name}; done && ${node} create vm.cow ${path.join(top, 'base.img')} && ${node} inspect vm.cow --json`;
      const result = spawnSync('bash', ['-c', script], { encoding: 'utf8' });
      expect(result.stderr).not.toMatch(/internal error|ERANGE/);
      expect(result.status, result.stderr).toBe(0);
      expect(JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))).size).toBe(1 << 20);
    } finally {
      spawnSync('rm', ['-rf', top]);
    }
  });
});

describe('setups UML cannot use', () => {
  it('refuses a COW as the backing file (the ubd driver cannot stack them); -f overrides', () => {
    makeCow();
    expectOneLine(ubdcow(['create', 'chain.cow', 'vm.cow']), 1, /vm\.cow: is itself a UML COW file, .*ubdcow commit vm\.cow merged\.img/);
    expect(fs.existsSync(path.join(tmp.path, 'chain.cow'))).toBe(false);
    expect(ubdcow(['create', '-f', 'chain.cow', 'vm.cow']).status).toBe(0);
  });

  it('warns when ubd0=COW,BACKING cannot name the files, naming the way out', () => {
    fs.mkdirSync(path.join(tmp.path, 'my images'));
    fs.writeFileSync(path.join(tmp.path, 'my images', 'base.img'), Buffer.alloc(1 << 20));
    const result = ubdcow(['create', 'vm.cow', 'my images/base.img']);
    expect(result.status).toBe(0);
    expect(result.stderr).toMatch(/the backing path holds a comma or white space, .*start UML with ubd0=vm\.cow alone/);
    const comma = ubdcow(['create', 'a,b.cow', 'my images/base.img']);
    expect(comma.stderr).toMatch(/a,b\.cow: the path holds a comma/);
  });

  it('readers warn and go on over a backing whose mtime moved; writers refuse; both name the fix', () => {
    makeCow();
    fs.utimesSync(path.join(tmp.path, 'base.img'), 2_000_000, 2_000_000);
    const read = ubdcow(['read', 'vm.cow', '--length', '4']);
    expect(read.status).toBe(0);
    expect(read.stdout).toBe('\x07\x07\x07\x07');
    expect(read.stderr).toMatch(/warning: .*the kernel would refuse it; .*ubdcow rebase vm\.cow .*--compare/);
    const cat = ubdcow(['cat', 'vm.cow', '--length', '4']);
    expect(cat.stdout).toBe(read.stdout);
    expect(cat.stderr).toMatch(/warning: .*ubdcow rebase vm\.cow .*--compare/);
    expectOneLine(ubdcow(['write', 'vm.cow', '--offset', '0'], { input: 'x' }), 1, /refusing to write \(if .*base\.img is a copy or was only touched, "ubdcow rebase vm\.cow/);
  });

  it.skipIf(!hasTool('script'))('cat and read refuse to write a disk to a terminal [needs script(1)]', () => {
    makeCow();
    for (const command of ['cat', 'read']) {
      const result = spawnSync('script', ['-qec', `"${process.execPath}" "${cli}" ${command} vm.cow`, '/dev/null'], { cwd: tmp.path, encoding: 'utf8' });
      expect(result.status).toBe(1);
      expect(result.stdout).toMatch(new RegExp(`ubdcow ${command}: vm\\.cow: refusing to write disk contents to a terminal; redirect them`));
      expect(result.stdout).not.toContain('\x07\x07\x07');
    }
  });
});

describe('cat > file keeps holes', () => {
  it('skips zero blocks when stdout is a fresh regular file; the offset ends at the end; >> and pipes get every byte', () => {
    const base = path.join(tmp.path, 'base.img');
    fs.writeFileSync(base, Buffer.alloc(0));
    fs.truncateSync(base, 16 << 20);
    expect(ubdcow(['create', 'vm.cow', 'base.img']).status).toBe(0);
    const data = Buffer.alloc(300_000, 0x5a);
    expect(ubdcow(['write', '-q', 'vm.cow', '--offset', '5000001'], { input: data.toString('latin1') }).status).toBe(0);
    const node = `"${process.execPath}" "${cli}"`;
    const shell = (script: string) => spawnSync('bash', ['-c', script], { cwd: tmp.path, encoding: 'utf8' });
    expect(shell(`${node} cat vm.cow > out.img && { ${node} cat vm.cow; printf END; } > tail.img && printf 'pre' > app.img && ${node} cat vm.cow >> app.img && ${node} cat vm.cow | cat > piped.img`).status).toBe(0);
    const expected = Buffer.alloc(16 << 20);
    data.copy(expected, 5000001);
    expect(fs.readFileSync(path.join(tmp.path, 'out.img')).equals(expected)).toBe(true);
    expect(fs.readFileSync(path.join(tmp.path, 'piped.img')).equals(expected)).toBe(true);
    expect(fs.readFileSync(path.join(tmp.path, 'tail.img')).equals(Buffer.concat([expected, Buffer.from('END')]))).toBe(true);
    expect(fs.readFileSync(path.join(tmp.path, 'app.img')).equals(Buffer.concat([Buffer.from('pre'), expected]))).toBe(true);
    // 300 KB of data: a few hundred KiB on disk, where the piped copy takes all 16 MiB.
    expect(fs.statSync(path.join(tmp.path, 'out.img')).blocks * 512).toBeLessThan(1 << 20);
    expect(fs.statSync(path.join(tmp.path, 'piped.img')).blocks * 512).toBeGreaterThan(15 << 20);
  });
});

describe('demo', () => {
  it('removes its temporary folder, or keeps it with --keep and says where', () => {
    const removed = ubdcow(['demo']);
    expect(removed.status, removed.stderr).toBe(0);
    // Step 5 summarises the differing ranges (count, bytes, the first three) on a short line.
    const diffLine = removed.stdout.split('\n').find((line) => line.startsWith('5. '));
    expect(diffLine).toMatch(/^5\. ok   diff: \d+ ranges, \d+ bytes, differ from the backing: \d+ bytes at \d+, \d+ bytes at \d+, \d+ bytes at \d+, … \(\d+ more\)$/);
    expect(diffLine!.length).toBeLessThan(200);
    const gone = /temporary folder (\S+) removed/.exec(removed.stdout);
    expect(gone, removed.stdout).not.toBeNull();
    expect(fs.existsSync(gone![1])).toBe(false);
    const kept = ubdcow(['demo', '--keep']);
    const folder = /files kept in (\S+) \(as asked/.exec(kept.stdout);
    expect(folder, kept.stdout).not.toBeNull();
    expect(fs.readdirSync(folder![1]).sort()).toEqual(['demo.cow', 'merged.img']);
    fs.rmSync(folder![1], { recursive: true });
  });
});

describe('library through the package entry', () => {
  it('refuses unknown option keys instead of doing something else (commitCow { out } merged in place)', async () => {
    const api = await import(pathToFileURL(path.join(repoRoot, 'dist', 'index.js')).href);
    const cow = makeCow();
    await api.writeThroughEngine(cow, [Buffer.from('changed')], { offset: 0 });
    const base = path.join(tmp.path, 'base.img');
    const before = fs.readFileSync(base);
    const err = await api.commitCow(cow, { out: path.join(tmp.path, 'merged.img') }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(api.UbdcowError);
    expect(err.message).toMatch(/^commitCow: unknown option "out" \(did you mean "output"\? known options: output, /);
    expect(fs.readFileSync(base).equals(before)).toBe(true);
    expect(fs.existsSync(path.join(tmp.path, 'merged.img'))).toBe(false);
    await expect(api.inspectCow(cow, { backingFile: base })).rejects.toThrow(/inspectCow: unknown option "backingFile" \(did you mean "backing"\?/);
    await expect(api.openCow(cow, { readonly: true })).rejects.toThrow(/openCow: unknown option "readonly" \(did you mean "readOnly"\?/);
    await expect(api.createCow(path.join(tmp.path, 'x.cow'), base, 'force')).rejects.toThrow(/createCow: options must be an object, got string/);
  });
});

describe('the man page', () => {
  it('is generated from the help text (npm run build) and covers every command', () => {
    // What `npm run build` runs after tsc (dist/ is built already; rebuilding it here would race
    // with the test files running beside this one).
    const make = run(process.execPath, ['scripts/make-man.mjs'], { cwd: repoRoot });
    expect(make.status, make.stderr).toBe(0);
    const page = fs.readFileSync(path.join(repoRoot, 'man', 'ubdcow.1'), 'utf8');
    expect(page).toMatch(/^\.TH UBDCOW 1 /);
    for (const command of ['create', 'inspect', 'diff', 'map', 'cat', 'commit', 'check', 'rebase', 'read', 'write', 'demo']) {
      expect(page).toContain(`.SS ${command}\n`);
    }
    expect(page).toContain(ubdcow(['rebase', '--help']).stdout.split('\n')[0]);
  });
});

const extMissing = ['mke2fs', 'qemu-img'].filter((tool) => !hasTool(tool));

describe.skipIf(extMissing.length > 0)(
  `the same conventions on serve, convert, import, ls, get and diff --files${extMissing.length > 0 ? ` [skipped: ${extMissing.join(', ')} not installed]` : ''}`,
  () => {
    /** A COW over an ext2 base holding /hello.txt. */
    function makeGuestCow(): void {
      const root = path.join(tmp.path, 'root');
      fs.mkdirSync(root);
      fs.writeFileSync(path.join(root, 'hello.txt'), 'hello\n');
      const mkfs = run('mke2fs', ['-q', '-F', '-t', 'ext2', '-d', root, path.join(tmp.path, 'base.img'), '4M']);
      expect(mkfs.status, mkfs.stderr).toBe(0);
      expect(ubdcow(['create', '-q', 'vm.cow', 'base.img']).status).toBe(0);
    }

    it('-q, --output=json with schemaVersion, and unknown options named', () => {
      makeGuestCow();
      const ls = ubdcow(['ls', 'vm.cow', '--output=json']);
      expect(ls.status, ls.stderr).toBe(0);
      expect(JSON.parse(ls.stdout)).toMatchObject({ schemaVersion: 1, entries: expect.arrayContaining([expect.objectContaining({ name: 'hello.txt' })]) });
      const files = ubdcow(['diff', '--files', 'vm.cow', '--output', 'json']);
      expect(files.status, files.stderr).toBe(0);
      expect(JSON.parse(files.stdout)).toMatchObject({ schemaVersion: 1, changes: [] });

      const converted = ubdcow(['convert', 'vm.cow', 'vm.qcow2', '-O', 'qcow2', '--output=json']);
      expect(converted.status, converted.stderr).toBe(0);
      expect(JSON.parse(converted.stdout)).toMatchObject({ schemaVersion: 1, format: 'qcow2' });
      expect(ubdcow(['convert', '-q', 'vm.cow', 'quiet.qcow2', '-O', 'qcow2'])).toMatchObject({ status: 0, stdout: '', stderr: '' });
      expect(ubdcow(['import', '-q', 'vm.qcow2', 'back.cow', 'base.img'])).toMatchObject({ status: 0, stdout: '', stderr: '' });

      for (const command of [['serve', 'vm.cow', '--socket', 's'], ['convert', 'vm.cow', 'x', '-O', 'raw'], ['import', 'vm.qcow2', 'y.cow', 'base.img'], ['ls', 'vm.cow'], ['get', 'vm.cow', '/hello.txt']]) {
        expectOneLine(ubdcow([...command, '--bogus']), 1, new RegExp(`^ubdcow ${command[0]}: unknown option --bogus \\(see ubdcow ${command[0]} --help\\)`));
      }
      expect(fs.existsSync(path.join(tmp.path, 'x'))).toBe(false);
    });

    it('get -o/--out FILE is a file; --output stays the format (refused: get has no JSON); serve --json carries schemaVersion', async () => {
      makeGuestCow();
      const got = ubdcow(['get', 'vm.cow', '/hello.txt', '-o', 'json']);
      expect(got.status, got.stderr).toBe(0);
      expect(fs.readFileSync(path.join(tmp.path, 'json'), 'utf8')).toBe('hello\n');
      expect(ubdcow(['get', 'vm.cow', '/hello.txt', '--out', 'out.txt']).status).toBe(0);
      expect(fs.readFileSync(path.join(tmp.path, 'out.txt'), 'utf8')).toBe('hello\n');
      // --output means the format everywhere: get has no JSON, so it is refused, and no file appears.
      for (const args of [['--output=json'], ['--output', 'json'], ['--output', 'other.txt']]) {
        const refused = ubdcow(['get', 'vm.cow', '/hello.txt', ...args]);
        expect(refused.status, refused.stdout).toBe(1);
        expect(refused.stderr.trim().split('\n')).toHaveLength(1);
        expect(refused.stderr).toMatch(/--output/);
      }
      expect(fs.readdirSync(tmp.path).filter((name) => name === 'other.txt' || name.startsWith('.other'))).toEqual([]);

      const { spawn } = await import('node:child_process');
      const server = spawn(process.execPath, [cli, 'serve', 'vm.cow', '--socket', path.join(tmp.path, 'nbd.sock'), '--read-only', '--output=json'], { cwd: tmp.path });
      const line = await new Promise<string>((resolve, reject) => {
        let text = '';
        server.stdout.on('data', (chunk: Buffer) => {
          text += chunk.toString();
          if (text.includes('\n')) resolve(text.split('\n')[0]);
        });
        server.on('exit', (code) => reject(new Error(`serve exited ${code}`)));
      });
      const exited = new Promise((resolve) => server.on('exit', resolve));
      server.kill('SIGTERM');
      await exited;
      expect(JSON.parse(line)).toMatchObject({ schemaVersion: 1, kind: 'cow', readOnly: true });
    });

    it('their library functions refuse unknown option keys', async () => {
      makeGuestCow();
      const api = await import(pathToFileURL(path.join(repoRoot, 'dist', 'index.js')).href);
      const cow = path.join(tmp.path, 'vm.cow');
      const calls: Array<[string, () => Promise<unknown>]> = [
        ['serveImage', () => api.serveImage(cow, { sockt: 'x' })],
        ['convertImage', () => api.convertImage(cow, path.join(tmp.path, 'o.img'), { format: 'raw', forse: true })],
        ['importImage', () => api.importImage(cow, path.join(tmp.path, 'i.cow'), path.join(tmp.path, 'base.img'), { forse: true })],
        ['openGuestFs', () => api.openGuestFs(cow, { partitions: 1 })],
        ['diffFiles', () => api.diffFiles(cow, undefined, { checksums: true })],
        ['listGuest', () => api.listGuest(cow, '/', { recurse: true })],
        ['getGuestFile', () => api.getGuestFile(cow, '/hello.txt', { backng: 'x' }).next()],
        ['serveNbd', () => api.serveNbd({}, { sockett: 'x' })],
      ];
      for (const [name, call] of calls) {
        await expect(call(), name).rejects.toThrow(new RegExp(`^${name}: unknown option "\\w+" \\(did you mean`));
      }
      expect(fs.readdirSync(tmp.path).sort()).toEqual(['base.img', 'root', 'vm.cow']);
    });

    it('one mtime rule: convert (a reader) warns and goes on, a writable serve refuses; both name the fix', () => {
      makeGuestCow();
      fs.utimesSync(path.join(tmp.path, 'base.img'), 1_000_000, 1_000_000);
      const converted = ubdcow(['convert', 'vm.cow', 'vm.raw', '-O', 'raw']);
      expect(converted.status, converted.stderr).toBe(0);
      expect(converted.stderr).toMatch(/^ubdcow convert: warning: vm\.cow: .*backing mtime is 1000000 .*the kernel would refuse it; .*"ubdcow rebase vm\.cow .* --compare" records its mtime/);
      expect(ubdcow(['convert', '-q', 'vm.cow', 'quiet.raw', '-O', 'raw'])).toMatchObject({ status: 0, stdout: '', stderr: '' });
      const before = fs.readFileSync(path.join(tmp.path, 'vm.cow'));
      expectOneLine(ubdcow(['serve', 'vm.cow', '--socket', 'nbd.sock']), 1, /^ubdcow serve: vm\.cow: .*backing mtime is 1000000 .*refusing to write \(.*"ubdcow rebase vm\.cow .* --compare" records its mtime/);
      expect(fs.readFileSync(path.join(tmp.path, 'vm.cow')).equals(before)).toBe(true);
    });

    it('the man page covers them', () => {
      const page = fs.readFileSync(path.join(repoRoot, 'man', 'ubdcow.1'), 'utf8');
      for (const command of ['serve', 'convert', 'import', 'ls', 'get']) expect(page).toContain(`.SS ${command}\n`);
    });
  },
);
