/**
 * Guest entries that are not plain (issue 18): times outside 1970-2038, names that are not UTF-8
 * or hold control characters, directory hard links that loop, crafted extent trees, deep trees,
 * sparse files. Images are made by mke2fs and debugfs (names written as raw bytes in a debugfs
 * script) and ubdcow's answers are checked against debugfs's own.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runProgram } from '../uml/harness.js';
import { ensureBuiltCli, missingTools, titleWithSkipReason } from '../helpers/tools.js';
import { useTempDir } from '../helpers/tmp.js';

const missing = missingTools('mke2fs', 'debugfs', 'bash');

const ESC = '\x1b';
const hello = Buffer.from('hello\n');
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/** Runs the CLI with raw-byte arguments (through bash's $'...'), a time limit, and stdout as bytes. */
function cli(args: Array<string | Buffer>, timeoutMs = 60_000): { status: number | null; stdout: Buffer; stderr: string; ms: number } {
  const quoted = args.map((arg) => `$'${[...Buffer.from(arg)].map((b) => `\\x${b.toString(16).padStart(2, '0')}`).join('')}'`);
  const started = Date.now();
  const result = spawnSync('bash', ['-c', `exec "${process.execPath}" "${ensureBuiltCli()}" ${quoted.join(' ')}`], { timeout: timeoutMs, maxBuffer: 256 << 20 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr.toString('utf8'), ms: Date.now() - started };
}

async function mkfs(image: string, size: string, extra: string[] = []): Promise<void> {
  const result = await runProgram('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', ...extra, image, size]);
  expect(result.status, result.stderr).toBe(0);
}

/** debugfs -w with a script given as bytes (so names can be any bytes). */
function debugfs(image: string, lines: Array<string | Buffer>, write = true): Buffer {
  const script = `${image}.debugfs`;
  fs.writeFileSync(script, Buffer.concat(lines.flatMap((line) => [Buffer.from(line), Buffer.from('\n')])));
  return execFileSync('debugfs', [...(write ? ['-w'] : []), '-f', script, image], { env: { ...process.env, TZ: 'UTC' }, stdio: ['ignore', 'pipe', 'pipe'] });
}

const latin1Name = Buffer.from('caf\xe9', 'latin1');
const escName = Buffer.from(`esc${ESC}]0;pwned\x07x`);
const bytesPath = (...parts: Buffer[]) => Buffer.concat([Buffer.from('/d/'), ...parts]);

describe.skipIf(missing.length > 0)(titleWithSkipReason('guest entries: odd times, byte names, control characters, loops, crafted trees, depth, holes', missing), () => {
  const tmp = useTempDir();

  async function oddImage(): Promise<string> {
    const image = path.join(tmp.path, 'odd.img');
    await mkfs(image, '32M');
    const host = path.join(tmp.path, 'hello.txt');
    fs.writeFileSync(host, hello);
    debugfs(image, [
      'mkdir /d',
      `write ${host} /d/old`,
      `write ${host} /d/new`,
      `write ${host} /d/far`,
      Buffer.concat([Buffer.from(`write ${host} `), bytesPath(latin1Name)]),
      Buffer.concat([Buffer.from('symlink /d/lnk '), latin1Name]),
      Buffer.concat([Buffer.from(`write ${host} `), bytesPath(escName)]),
      'sif /d mtime 19500101000000',
      'sif /d/old mtime 19600101000000',
      'sif /d/new mtime 20390101000000',
      // Two epoch bits past the low 32: the year 2232 ext4 can store and libext2fs's stat cannot.
      'sif /d/far mtime 19600101000000',
      'sif /d/far mtime_extra 2',
    ]);
    return image;
  }

  it('times before 1970 and after 2038 (epoch bits), Latin-1 names and control characters: ls, get and the symlink match debugfs', async () => {
    const image = await oddImage();
    const listing = cli(['ls', image, '-R', '-l']);
    expect(listing.status, listing.stderr).toBe(0);
    const text = listing.stdout.toString('utf8');
    // No control character reaches the terminal; the names are spelled as GNU ls -b does.
    expect(listing.stdout.includes(ESC)).toBe(false);
    expect(listing.stdout.includes(7)).toBe(false);
    expect(text).toContain(' /d/caf\\351\n');
    expect(text).toContain(' /d/esc\\033]0;pwned\\007x\n');
    expect(text).toContain(' /d/lnk -> caf\\351\n');
    // Every time as debugfs prints it (TZ=UTC), epoch bits and negative times included.
    for (const name of ['d', 'd/old', 'd/new', 'd/far']) {
      const stat = debugfs(image, [`stat /${name}`], false).toString('latin1');
      const printed = / mtime: 0x[0-9a-f]+:[0-9a-f]+ -- (.+)\n/.exec(stat)![1]!;
      const iso = new Date(`${printed} UTC`).toISOString().replace('T', ' ').slice(0, 19);
      const line = text.split('\n').find((l) => l.endsWith(` /${name}`));
      expect(line, `${name}: ${printed}`).toContain(` ${iso} /${name}`);
    }
    expect(text).toMatch(/ 1950-01-0\d \d\d:\d\d:\d\d \/d\n/);
    expect(text).toMatch(/ 2232-\d\d-\d\d \d\d:\d\d:\d\d \/d\/far\n/);

    // JSON: exact strings (JSON escapes the control characters), base64 bytes where not UTF-8.
    const json = cli(['ls', image, '/d', '--json']);
    expect(json.status, json.stderr).toBe(0);
    const entries = JSON.parse(json.stdout.toString('utf8')).entries as Array<Record<string, unknown>>;
    const byName = new Map(entries.map((e) => [e.name, e]));
    expect(byName.get(`esc${ESC}]0;pwned\x07x`)).toMatchObject({ path: `/d/esc${ESC}]0;pwned\x07x` });
    expect(byName.get(`esc${ESC}]0;pwned\x07x`)).not.toHaveProperty('nameBytes');
    const latin1 = byName.get('caf\uFFFD')!;
    expect(Buffer.from(String(latin1.nameBytes), 'base64')).toEqual(latin1Name);
    expect(Buffer.from(String(latin1.pathBytes), 'base64')).toEqual(bytesPath(latin1Name));
    expect(Buffer.from(String(byName.get('lnk')!.targetBytes), 'base64')).toEqual(latin1Name);
    // The raw fields debugfs shows: signed low 32 bits plus the extra field's epoch bits times 2^32.
    for (const name of ['old', 'new', 'far']) {
      const [, low, extra] = / mtime: 0x([0-9a-f]+):([0-9a-f]+)/.exec(debugfs(image, [`stat /d/${name}`], false).toString('latin1'))!;
      expect(byName.get(name)!.mtime, name).toBe((parseInt(low!, 16) | 0) + (parseInt(extra!, 16) & 3) * 2 ** 32);
    }
    expect(byName.get('old')!.mtime).toBeLessThan(0);

    // get: the 1960 file, through the Latin-1 symlink, by the raw bytes the shell passes, and by ls's spelling.
    const debugfsBytes = debugfs(image, [Buffer.concat([Buffer.from('cat '), bytesPath(latin1Name)])], false);
    expect(debugfsBytes.subarray(debugfsBytes.indexOf(hello))).toEqual(hello);
    for (const guestPath of ['/d/old', '/d/far', '/d/lnk', bytesPath(latin1Name), '/d/caf\\351', '/d/esc\\033]0;pwned\\007x']) {
      const got = cli(['get', image, guestPath]);
      expect(got.status, `${String(guestPath)}: ${got.stderr}`).toBe(0);
      expect(got.stdout).toEqual(hello);
    }
    // A missing name with control characters: the error is escaped too.
    const missingFile = cli(['get', image, `/d/nope${ESC}[31m`]);
    expect(missingFile.status).toBe(2);
    expect(missingFile.stderr).toContain('/d/nope\\033[31m: no such file or directory');
    expect(missingFile.stderr.includes(ESC)).toBe(false);
  });

  it('diff --files escapes control characters in human output and keeps exact strings in JSON; --checksum covers a dir that became a file', async () => {
    const base = path.join(tmp.path, 'base.img');
    await mkfs(base, '32M');
    const host = path.join(tmp.path, 'hello.txt');
    fs.writeFileSync(host, hello);
    debugfs(base, ['mkdir /d', 'mkdir /x']);
    const changed = path.join(tmp.path, 'changed.img');
    fs.copyFileSync(base, changed);
    debugfs(changed, [Buffer.concat([Buffer.from(`write ${host} `), bytesPath(escName)]), 'rmdir /x', `write ${host} /x`]);
    const human = cli(['diff', '--files', changed, base]);
    expect(human.status, human.stderr).toBe(1);
    expect(human.stdout.includes(ESC)).toBe(false);
    expect(human.stdout.toString('utf8')).toContain('+ /d/esc\\033]0;pwned\\007x\n');
    const json = cli(['diff', '--files', changed, base, '--json', '--checksum']);
    expect(json.status, json.stderr).toBe(1);
    const changes = JSON.parse(json.stdout.toString('utf8')).changes as Array<{ path: string; what: string[]; sha256?: { a?: string; b?: string } }>;
    expect(changes.map((c) => c.path)).toContain(`/d/esc${ESC}]0;pwned\x07x`);
    const x = changes.find((c) => c.path === '/x')!;
    expect(x.what).toContain('type');
    expect(x.sha256).toEqual({ a: sha256(hello) });
  });

  it('a directory hard link that loops: ls -R reports it and goes on, diff --files says so in one line; neither hangs', async () => {
    const image = path.join(tmp.path, 'loop.img');
    await mkfs(image, '32M');
    const host = path.join(tmp.path, 'hello.txt');
    fs.writeFileSync(host, hello);
    const clean = path.join(tmp.path, 'clean.img');
    debugfs(image, ['mkdir /d', `write ${host} /d/f`, `write ${host} /z`]);
    fs.copyFileSync(image, clean);
    debugfs(image, ['link /d /d/loop']);
    const listing = cli(['ls', image, '-R'], 30_000);
    expect(listing.status, listing.stderr).toBe(2);
    expect(listing.stdout.toString('utf8').split('\n')).toEqual(expect.arrayContaining(['/d', '/d/f', '/d/loop', '/z']));
    expect(listing.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^ubdcow ls: .*\/d\/loop is directory inode \d+ again, already listed at \/d \(a hard link to a directory, which loops\)/)]);
    const json = cli(['ls', image, '-R', '--json'], 30_000);
    expect(json.status).toBe(2);
    expect(JSON.parse(json.stdout.toString('utf8')).errors).toEqual([expect.objectContaining({ path: '/d/loop' })]);

    const diff = cli(['diff', '--files', image, clean], 30_000);
    expect(diff.status, diff.stderr).toBe(2);
    expect(diff.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^ubdcow diff: .*\/d\/loop is directory inode \d+ again/)]);
  });

  it('one entry whose inode number is out of range: ls -R names it and lists every other entry, exit 2', async () => {
    const image = await oddImage();
    // Point /d/old's directory entry at an inode the file system does not have.
    const block = Number(/(\d+)\s*$/.exec(debugfs(image, ['blocks /d'], false).toString('latin1'))?.[1]);
    expect(block).toBeGreaterThan(0);
    const fd = fs.openSync(image, 'r+');
    const bytes = Buffer.alloc(4096);
    fs.readSync(fd, bytes, 0, 4096, block * 4096);
    let at = -1;
    for (let i = bytes.indexOf('old'); i >= 0; i = bytes.indexOf('old', i + 1)) if (bytes[i - 2] === 3) at = i - 8;
    expect(at).toBeGreaterThanOrEqual(0);
    bytes.writeUInt32LE(0xffffff, at);
    fs.writeSync(fd, bytes, 0, 4096, block * 4096);
    fs.closeSync(fd);
    const listing = cli(['ls', image, '-R']);
    expect(listing.status).toBe(2);
    expect(listing.stdout.toString('utf8').trim().split('\n')).toEqual(['/d', '/d/caf\\351', '/d/esc\\033]0;pwned\\007x', '/d/far', '/d/lnk', '/d/new', '/lost+found']);
    expect(listing.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^ubdcow ls: .*inode 16777215 is outside 1\.\.\d+/)]);
  });

  it('a crafted extent tree whose index entries all point at one node is a one-line error, not a heap overflow', async () => {
    const image = path.join(tmp.path, 'tree.img');
    await mkfs(image, '32M');
    // Every other block written: 40 extents, more than the 4 the inode holds, so a one-level tree.
    const sparse = Buffer.alloc(80 * 4096);
    for (let i = 0; i < 80; i += 2) sparse.fill(i + 1, i * 4096, (i + 1) * 4096);
    const host = path.join(tmp.path, 'sparse.bin');
    fs.writeFileSync(host, sparse);
    debugfs(image, [`write ${host} /f`]);
    const stat = debugfs(image, ['stat /f'], false).toString('latin1');
    const leaf = Number(/\(ETB0\):(\d+)/.exec(stat)?.[1]);
    const [data1, data2] = [...stat.matchAll(/\((\d+)\):(\d+)/g)].map((m) => Number(m[2]));
    expect(leaf, stat).toBeGreaterThan(0);
    expect(data2, stat).toBeGreaterThan(0);
    // A tree ext4's depth limit allows (3 levels) where every index entry of a level points at the
    // one node below: 340 x 340 x 340 extents if followed blindly (what ran out of heap before).
    debugfs(image, [`sif /f block[1] ${4 | (3 << 16)}`]);
    const node = (depth: number, child: number) => {
      const bytes = Buffer.alloc(4096);
      bytes.writeUInt16LE(0xf30a, 0);
      bytes.writeUInt16LE(340, 2);
      bytes.writeUInt16LE(340, 4);
      bytes.writeUInt16LE(depth, 6);
      for (let i = 0; i < 340; i++) {
        bytes.writeUInt32LE(i, 12 + i * 12);
        if (depth > 0) bytes.writeUInt32LE(child, 12 + i * 12 + 4);
        else {
          bytes.writeUInt16LE(1, 12 + i * 12 + 4);
          bytes.writeUInt32LE(child, 12 + i * 12 + 8);
        }
      }
      return bytes;
    };
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, node(2, data1!), 0, 4096, leaf * 4096);
    fs.writeSync(fd, node(1, data2!), 0, 4096, data1! * 4096);
    fs.writeSync(fd, node(0, data2!), 0, 4096, data2! * 4096);
    fs.closeSync(fd);
    for (const args of [['get', image, '/f'], ['ls', image, '-R', '-l']]) {
      const result = cli(args, 20_000);
      expect(result.status, `${args.join(' ')}: ${result.stderr}`).toBe(args[0] === 'get' ? 2 : 0);
      if (args[0] === 'get') expect(result.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^ubdcow get: .*inode \d+'s extent tree reaches block \d+ twice/)]);
    }
  });

  it('ls -R of a tree 300 directories deep ends in bounded time (the walk is linear, not cubic)', async () => {
    const tree = path.join(tmp.path, 'deep');
    let dir = tree;
    for (let i = 0; i < 300; i++) dir = path.join(dir, 'd');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'leaf.txt'), hello);
    const image = path.join(tmp.path, 'deep.img');
    await mkfs(image, '32M', ['-d', tree]);
    const listing = cli(['ls', image, '-R'], 20_000);
    expect(listing.status, listing.stderr).toBe(0);
    const lines = listing.stdout.toString('utf8').trim().split('\n').filter((line) => !line.startsWith('/lost+found'));
    expect(lines).toHaveLength(301);
    expect(lines[300]).toBe(`${'/d'.repeat(300)}/leaf.txt`);
    expect(listing.ms).toBeLessThan(20_000);
    const got = cli(['get', image, `${'/d'.repeat(300)}/leaf.txt`], 20_000);
    expect(got.stdout).toEqual(hello);
  });

  it('get -o/--out keeps a sparse guest file sparse (holes and unwritten extents), with the same bytes as get > file', async () => {
    const tree = path.join(tmp.path, 'sparse-tree');
    fs.mkdirSync(tree);
    const size = 64 << 20;
    const host = path.join(tree, 'sparse.bin');
    const fd = fs.openSync(host, 'w');
    fs.writeSync(fd, Buffer.alloc(1 << 20, 0xab), 0, 1 << 20, 0);
    fs.writeSync(fd, Buffer.alloc(1 << 20, 0xcd), 0, 1 << 20, 40 << 20);
    fs.ftruncateSync(fd, size);
    fs.closeSync(fd);
    const image = path.join(tmp.path, 'sparse.img');
    await mkfs(image, '128M', ['-d', tree]);
    // 4 MiB allocated but unwritten (reads as zeros) in the middle of a hole.
    debugfs(image, ['fallocate /sparse.bin 4096 5119']);
    expect(debugfs(image, ['ex /sparse.bin'], false).toString('latin1')).toMatch(/Uninit/);
    const out = path.join(tmp.path, 'out.bin');
    const got = cli(['get', image, '/sparse.bin', '-o', out]);
    expect(got.status, got.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(fs.readFileSync(host))).toBe(true);
    const stat = fs.statSync(out);
    expect(stat.size).toBe(size);
    expect(stat.blocks * 512).toBeLessThanOrEqual(3 << 20);
  });
});
