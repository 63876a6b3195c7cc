/*
 * `npm run bench`: the engine benchmark (bench/engine.ts), then the workflow benchmark
 * (bench/workflow.ts), the NBD benchmark (bench/nbd.ts), the guest-file benchmark
 * (bench/guestfs.ts), the customize benchmark (bench/customize.ts) and the fleet benchmark
 * (bench/fleet.ts), each when it exists. Each runs in its own process so one's heap and open
 * files cannot skew another. Arguments are passed to all.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repoRoot } from './util.js';

function runBench(name: string, args: string[]): number {
  const file = path.join(repoRoot, 'bench', name);
  if (!fs.existsSync(file)) {
    console.log(`\nbench/${name} is missing: skipped.`);
    return 0;
  }
  console.log(`\n=== bench/${name} ===\n`);
  const result = spawnSync('npx', ['tsx', file, ...args], { cwd: repoRoot, stdio: 'inherit' });
  if (result.error) {
    console.error(`bench/${name}: could not start: ${result.error.message}`);
    return 1;
  }
  if (result.status !== 0) console.error(`bench/${name} failed (exit ${result.status ?? result.signal})`);
  return result.status ?? 1;
}

const args = process.argv.slice(2);
const statuses = ['engine.ts', 'workflow.ts', 'nbd.ts', 'guestfs.ts', 'customize.ts', 'fleet.ts'].map((name) => runBench(name, args));
process.exitCode = statuses.some((status) => status !== 0) ? 1 : 0;
