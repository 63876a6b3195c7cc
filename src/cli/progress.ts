import { createRequire } from 'node:module';
import { formatBytes } from './format.js';

/** Receives (doneBytes, totalBytes) as a long operation goes; `stop` ends the display. */
export interface ByteProgress {
  update(doneBytes: number, totalBytes: number): void;
  stop(): void;
}

/** -p forces the bar, --no-progress hides it; by default it shows only when stderr is a terminal. */
export function progressWanted(flag: boolean | undefined, stream: NodeJS.WriteStream = process.stderr): boolean {
  return flag ?? Boolean(stream.isTTY);
}

const require = createRequire(import.meta.url);

const silent: ByteProgress = { update: () => undefined, stop: () => undefined };

/** A progress bar on stderr showing bytes done, total, rate and time left. */
export function createByteProgress(label: string, enabled: boolean, stream: NodeJS.WriteStream = process.stderr): ByteProgress {
  if (!enabled) return silent;
  // Loaded only when a bar is shown: most runs show none, and loading it adds ~10 ms to start-up.
  const cliProgress = require('cli-progress') as typeof import('cli-progress');
  const bar = new cliProgress.SingleBar({
    stream,
    format: `${label} [{bar}] {percentage}% | {doneText} / {totalText} | {rateText} | ETA {eta_formatted}`,
    barCompleteChar: '#',
    barIncompleteChar: '.',
    hideCursor: Boolean(stream.isTTY),
    // Forced on a pipe: print a line now and then instead of redrawing.
    noTTYOutput: !stream.isTTY,
    notTTYSchedule: 1000,
    etaBuffer: 50,
  });
  const startedAt = Date.now();
  let started = false;
  const payload = (done: number, total: number) => {
    const seconds = (Date.now() - startedAt) / 1000;
    return {
      doneText: formatBytes(done),
      totalText: formatBytes(total),
      rateText: seconds > 0 ? `${formatBytes(Math.round(done / seconds))}/s` : '-',
    };
  };
  return {
    update(done, total) {
      if (!started) {
        bar.start(total, done, payload(done, total));
        started = true;
        return;
      }
      bar.setTotal(total);
      bar.update(done, payload(done, total));
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/**
 * Runs `work` with a progress bar (shown as `progressWanted(flag)` says) fed by the callback it is
 * given, and takes the bar down however the work ends.
 */
export async function withByteProgress<T>(label: string, flag: boolean | undefined, work: (onProgress: (done: number, total: number) => void) => Promise<T>): Promise<T> {
  const progress = createByteProgress(label, progressWanted(flag));
  try {
    return await work((done, total) => progress.update(done, total));
  } finally {
    progress.stop();
  }
}
