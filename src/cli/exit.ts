/**
 * Ends a command with an exit code that is an answer, not an error (diff: 1 = the images differ,
 * check: 1 = problems found). Exit codes: 0 success; 1 failure or that answer; 2 trouble for
 * diff and check.
 */
export class CliExit extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
  }
}
