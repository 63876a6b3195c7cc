/* The truth for guest-file listings: e2fsprogs' own view of an ext image. */
import { runProgram } from '../uml/harness.js';

/** `debugfs ls -p` of every directory: path -> "type mode uid gid size". */
export async function debugfsListing(image: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const typeOf: Record<string, string> = { '4': 'dir', '10': 'file', '12': 'symlink' };
  const walk = async (dir: string) => {
    const listing = await runProgram('debugfs', ['-R', `ls -p ${dir}`, image]);
    for (const line of listing.stdout.split('\n')) {
      const parts = line.split('/');
      if (parts.length < 7) continue;
      const [, , modeText, uid, gid, name, size] = parts;
      if (name === '.' || name === '..' || name === '') continue;
      const mode = parseInt(modeText!, 8);
      const type = typeOf[(mode >> 12).toString(8)] ?? 'other';
      const p = dir === '/' ? `/${name}` : `${dir}/${name}`;
      out.set(p, `${type} ${(mode & 0o7777).toString(8)} ${uid} ${gid} ${type === 'dir' ? '' : size}`);
      if (type === 'dir') await walk(p);
    }
  };
  await walk('/');
  return out;
}

/** `ubdcow ls -R --json` output in the same form as debugfsListing: path -> "type mode uid gid size". */
export function lsJsonListing(stdout: string): Map<string, string> {
  const entries: Array<{ path: string; type: string; mode: number; uid: number; gid: number; size: number }> = JSON.parse(stdout).entries;
  return new Map(entries.map((e) => [e.path, `${e.type} ${e.mode.toString(8)} ${e.uid} ${e.gid} ${e.type === 'dir' ? '' : e.size}`]));
}
