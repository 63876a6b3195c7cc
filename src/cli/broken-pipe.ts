/*
 * A closed pipe on stdout (`ubdcow inspect X | head -1`, `| true`) is the reader saying "enough",
 * not an error (issue 15 item 3). Node ignores SIGPIPE, so a write to a pipe nobody reads fails
 * with EPIPE, emitted as an 'error' event on process.stdout; with no listener that event is an
 * uncaught exception: a stack trace and exit 1. Installed once at start-up, this listener turns
 * EPIPE into silence: the rest of the output is dropped, the command's work runs to its end (a
 * `check --repair` is finished, never left half-done, because commands print only after their
 * work) and its exit status stands (0, or diff's and check's answer 1). `cat`, `read` and `get`,
 * which stream, also stop early; `serve` keeps serving after its "listening" line found no reader.
 * Any other error on stdout is reported in one line, with the command's failure status.
 */

/** The failure status for the stream's current command; one listener per stream, however often main() runs in a process. */
const statusFor = new WeakMap<NodeJS.WriteStream, { errorExitCode: number }>();

/** `errorExitCode`: the status for any other stdout error (2 for diff, check, ls and get, else 1). */
export function quietOnBrokenPipe(errorExitCode: number, stream: NodeJS.WriteStream = process.stdout, errors: NodeJS.WriteStream = process.stderr): void {
  const known = statusFor.get(stream);
  if (known) {
    known.errorExitCode = errorExitCode;
    return;
  }
  const state = { errorExitCode };
  statusFor.set(stream, state);
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') return;
    errors.write(`ubdcow: standard output: cannot write: ${err.message}\n`);
    process.exitCode = state.errorExitCode;
  });
  // Warnings and errors sent to a closed pipe (`2>&1 | true`) have nowhere else to go.
  errors.on('error', () => undefined);
}
