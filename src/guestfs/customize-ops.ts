/**
 * What each `ubdcow customize` operation does to the guest file system, with virt-customize's
 * meaning (an upload into an existing directory lands inside it, `--link` replaces an existing
 * link as `ln -sf`, `--delete` of a missing path is not an error, ...). Every operation works on
 * the staged file system (guest-writer.ts): a failure leaves the image untouched, whatever the
 * earlier operations did.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { UbdcowError, fromSystemError } from '../errors.js';
import type { CustomizeOperation, SshKeySource } from './customize-spec.js';
import { type GuestWriter, baseName, joinGuest } from './guest-writer.js';
import type { InodeTimes } from './inode-times.js';

const HOST_CHUNK = 1 << 20;

/** A host file's bytes, a chunk at a time (uploads of any size without holding them in memory). */
function* hostChunks(file: string, size: number): Generator<Uint8Array> {
  const fd = fs.openSync(file, 'r');
  try {
    // Sized to the file (plus one byte to see its end): a megabyte per small file of a tree is what the GC would spend its time on.
    const buffer = Buffer.allocUnsafe(Math.min(HOST_CHUNK, size + 1));
    for (;;) {
      const got = fs.readSync(fd, buffer, 0, buffer.length, null);
      if (got === 0) return;
      yield buffer.subarray(0, got);
    }
  } finally {
    fs.closeSync(fd);
  }
}

function hostStat(file: string, follow = true): fs.Stats {
  try {
    return follow ? fs.statSync(file) : fs.lstatSync(file);
  } catch (err) {
    throw fromSystemError(err, file, 'read');
  }
}

function fitsId(id: number): boolean {
  return id >= 0 && id <= 0xffff;
}

/** A time to set after libext2fs has closed the file system (inode-times.ts), for the guest path `path`. */
export interface PendingTimes extends InodeTimes {
  path: string;
}

export class OperationRunner {
  /** Host times of what --copy-in made, still to be set (dropped when a later operation changes the path). */
  readonly times: PendingTimes[] = [];

  constructor(private readonly guest: GuestWriter) {}

  private error(message: string): UbdcowError {
    return new UbdcowError('guest-op-failed', `${this.guest.label}: ${message}`);
  }

  /** Applies one operation; returns the guest paths it changed. */
  async run(operation: CustomizeOperation): Promise<string[]> {
    const pending = this.times.length;
    const changed = await this.apply(operation);
    // Times copied by an earlier operation no longer hold where a later one changed the path (or below or above it).
    const touched = (p: string) => changed.some((c) => c === p || p.startsWith(`${c}/`) || c.startsWith(`${p}/`));
    const kept = this.times.filter((entry, index) => index >= pending || !touched(entry.path));
    this.times.splice(0, this.times.length, ...kept);
    return changed;
  }

  private async apply(operation: CustomizeOperation): Promise<string[]> {
    const g = this.guest;
    switch (operation.op) {
      case 'upload':
        return [await this.upload(operation.from, operation.to)];
      case 'copy-in':
        return this.copyIn(operation.from, operation.toDir);
      case 'write':
        await g.writeFile(operation.path, [Buffer.from(operation.content)]);
        return [operation.path];
      case 'append-line':
        await this.appendLine(operation.path, operation.line);
        return [operation.path];
      case 'mkdir':
        await g.mkdirs(operation.path);
        return [operation.path];
      case 'delete':
        if (operation.path === '/') throw this.error('refusing to --delete / (the whole file system)');
        return (await g.removeTree(operation.path)) ? [operation.path] : [];
      case 'move':
        return this.move(operation.from, operation.to);
      case 'link':
        return this.links(operation.target, operation.links);
      case 'chmod':
        await this.mustExist(operation.path, 'chmod');
        await g.chmod(operation.path, operation.mode);
        return [operation.path];
      case 'chown':
        await this.mustExist(operation.path, 'chown');
        await g.chown(operation.path, operation.uid, operation.gid);
        return [operation.path];
      case 'touch':
        await g.touch(operation.path);
        return [operation.path];
      case 'truncate': {
        const found = await this.mustExist(operation.path, 'truncate');
        if (found.kind !== 'file') throw this.error(`cannot truncate ${operation.path}: not a regular file`);
        await g.writeFile(operation.path, []);
        return [operation.path];
      }
      case 'hostname':
        await g.writeFile('/etc/hostname', [Buffer.from(`${operation.name}\n`)]);
        return ['/etc/hostname'];
      case 'ssh-inject':
        return this.sshInject(operation.user, operation.key);
    }
  }

  private async mustExist(guestPath: string, action: string) {
    const found = await this.guest.stat(guestPath);
    if (!found) throw this.error(`cannot ${action} ${guestPath}: no such file or directory in the guest`);
    return found;
  }

  /** virt-customize's --upload: into DEST (or DEST/name when DEST is a directory), with the host file's mode and owner. */
  private async upload(from: string, to: string): Promise<string> {
    const stat = hostStat(from);
    if (!stat.isFile()) throw new UbdcowError('usage', `--upload ${from}: not a regular file on the host`, { file: from });
    const target = (await this.guest.stat(to))?.kind === 'dir' ? joinGuest(to, path.basename(from)) : to;
    await this.guest.writeFile(target, hostChunks(from, stat.size), { mode: stat.mode & 0o7777 });
    await this.guest.chmod(target, stat.mode & 0o7777);
    if (fitsId(stat.uid) && fitsId(stat.gid)) await this.guest.chown(target, stat.uid, stat.gid);
    return target;
  }

  private async appendLine(guestPath: string, line: string): Promise<void> {
    const existing = await this.guest.stat(guestPath);
    let prefix = '';
    let eol = '\n';
    if (existing) {
      const content = await this.guest.readFile(guestPath);
      if (content.includes('\r\n')) eol = '\r\n';
      if (content.length > 0 && content[content.length - 1] !== 0x0a) prefix = eol;
    }
    await this.guest.writeFile(guestPath, [Buffer.from(`${prefix}${line}${eol}`)], { append: true });
  }

  /** mv: into DEST when it is a directory; never a directory into itself. */
  private async move(from: string, to: string): Promise<string[]> {
    const source = await this.guest.lstat(from);
    if (!source) throw this.error(`cannot move ${from}: no such file or directory in the guest`);
    const destination = (await this.guest.stat(to))?.kind === 'dir' ? joinGuest(to, baseName(from)) : to;
    if (destination === from) return [];
    if (source.kind === 'dir' && (destination + '/').startsWith(from + '/')) throw this.error(`cannot move ${from} into itself (${destination})`);
    const existing = await this.guest.lstat(destination);
    if (existing?.kind === 'dir' && source.kind !== 'dir') throw this.error(`cannot move ${from} to ${destination}: a directory is there`);
    if (existing && existing.kind !== 'dir' && source.kind === 'dir') throw this.error(`cannot move directory ${from} over the non-directory ${destination}`);
    await this.guest.rename(from, destination);
    return [from, destination];
  }

  /** ln -sf TARGET LINK for each LINK. */
  private async links(target: string, links: string[]): Promise<string[]> {
    const made: string[] = [];
    for (const link of links) {
      const at = (await this.guest.stat(link))?.kind === 'dir' ? joinGuest(link, baseName(target)) : link;
      const existing = await this.guest.lstat(at);
      if (existing?.kind === 'dir') throw this.error(`cannot create link ${at}: a directory is there`);
      if (existing) await this.guest.unlink(at);
      await this.guest.symlink(target, at);
      made.push(at);
    }
    return made;
  }

  /** Recursive copy of a host file or tree into an existing guest directory, with modes, owners and symlinks. */
  private async copyIn(from: string, toDir: string): Promise<string[]> {
    const dir = await this.guest.stat(toDir);
    if (dir?.kind !== 'dir') throw this.error(`cannot --copy-in to ${toDir}: not an existing directory in the guest`);
    const copied: string[] = [];
    // Hard links within the tree stay hard links: first guest path of each host (dev, ino).
    const linked = new Map<string, string>();
    // `fresh`: the guest directory was made by this copy, so nothing is in it yet (no lookups).
    const copy = async (host: string, guest: string, fresh: boolean, names: string[]): Promise<void> => {
      const stat = hostStat(host, false);
      const keepTimes = () => this.times.push({ path: guest, baseIno: dir.ino, names, atime: stat.atimeMs / 1000, mtime: stat.mtimeMs / 1000 });
      const existing = fresh ? undefined : await this.guest.lstat(guest);
      const owned = async (noFollow: boolean) => {
        if ((stat.uid !== 0 || stat.gid !== 0 || existing) && fitsId(stat.uid) && fitsId(stat.gid)) await this.guest.chown(guest, stat.uid, stat.gid, noFollow);
      };
      if (stat.isDirectory()) {
        if (existing && existing.kind !== 'dir') throw this.error(`cannot copy ${host} to ${guest}: a non-directory is there`);
        if (!existing) await this.guest.mkdir(guest, stat.mode & 0o7777);
        else await this.guest.chmod(guest, stat.mode & 0o7777);
        await owned(false);
        copied.push(guest);
        for (const name of fs.readdirSync(host).sort()) await copy(path.join(host, name), joinGuest(guest, name), !existing, [...names, name]);
        keepTimes();
        return;
      }
      if (existing?.kind === 'dir') throw this.error(`cannot copy ${host} to ${guest}: a directory is there`);
      const key = `${stat.dev}:${stat.ino}`;
      const first = stat.nlink > 1 ? linked.get(key) : undefined;
      if (existing) await this.guest.unlink(guest);
      copied.push(guest);
      if (first) {
        await this.guest.link(first, guest);
        return;
      }
      if (stat.isSymbolicLink()) {
        await this.guest.symlink(fs.readlinkSync(host), guest);
        await owned(true);
      } else if (stat.isFile()) {
        await this.guest.writeFile(guest, hostChunks(host, stat.size), { mode: stat.mode & 0o7777, fresh: true });
        await owned(false);
      } else {
        throw new UbdcowError('usage', `--copy-in: ${host} is a device, FIFO or socket, which ubdcow customize cannot create`, { file: host });
      }
      keepTimes();
      if (stat.nlink > 1) linked.set(key, guest);
    };
    const top = path.basename(path.resolve(from));
    await copy(from, joinGuest(toDir, top), false, [top]);
    return copied;
  }

  private async sshInject(user: string, key: SshKeySource | undefined): Promise<string[]> {
    const passwd = (await this.guest.stat('/etc/passwd')) ? (await this.guest.readFile('/etc/passwd')).toString('utf8') : '';
    const entry = passwd
      .split('\n')
      .map((line) => line.split(':'))
      .find((fields) => fields[0] === user && fields.length >= 7);
    if (!entry) throw this.error(`--ssh-inject ${user}: no such user in the guest's /etc/passwd`);
    const uid = Number(entry[2]);
    const gid = Number(entry[3]);
    const home = entry[5]!;
    if (!home.startsWith('/') || (await this.guest.stat(home))?.kind !== 'dir') throw this.error(`--ssh-inject ${user}: the home directory ${home} is not a directory in the guest`);
    const keyText = readKey(key).trim();
    if (keyText === '' || keyText.includes('\n')) throw new UbdcowError('usage', `--ssh-inject ${user}: the key must be one non-empty line`);
    const sshDir = joinGuest(home, '.ssh');
    const changed: string[] = [];
    if (!(await this.guest.stat(sshDir))) {
      await this.guest.mkdir(sshDir, 0o700);
      await this.guest.chown(sshDir, uid, gid);
      changed.push(sshDir);
    }
    const keys = joinGuest(sshDir, 'authorized_keys');
    const existing = await this.guest.stat(keys);
    const content = existing ? (await this.guest.readFile(keys)).toString('utf8') : '';
    if (content.split('\n').some((line) => line.trim() === keyText)) return changed;
    const prefix = content.length > 0 && !content.endsWith('\n') ? '\n' : '';
    await this.guest.writeFile(keys, [Buffer.from(`${prefix}${keyText}\n`)], { append: true, mode: 0o600 });
    if (!existing) await this.guest.chown(keys, uid, gid);
    changed.push(keys);
    return changed;
  }
}

/** The key text: from a host file, a string, or the current user's default public key. */
function readKey(key: SshKeySource | undefined): string {
  if (key && 'string' in key) return key.string;
  const candidates = key ? [key.file] : ['id_ed25519.pub', 'id_ecdsa.pub', 'id_rsa.pub'].map((name) => path.join(os.homedir(), '.ssh', name));
  for (const file of candidates) {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch (err) {
      if (key) throw fromSystemError(err, file, 'read the ssh key');
    }
  }
  throw new UbdcowError('usage', `--ssh-inject: no public key found in ${path.join(os.homedir(), '.ssh')} (id_ed25519.pub, id_ecdsa.pub, id_rsa.pub); give one with USER:file:KEYFILE or USER:string:KEY`);
}
