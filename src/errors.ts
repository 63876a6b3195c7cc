/**
 * Messages name files, and a file name (or a backing path read from a damaged header) may hold
 * control characters; escaped, every message stays one line on a terminal.
 */
export function oneLine(message: string): string {
  return message.replace(/[\x00-\x1f\x7f]/g, (c) =>
    c === '\n' ? '\\n' : c === '\t' ? '\\t' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
  );
}

/**
 * Errors that reach users. Every failure the CLI reports is one of these, so it can print one line
 * (no stack trace) and pick the exit code; anything else is a bug and is reported as such.
 */
export class UbdcowError extends Error {
  /** Stable machine-readable kind, e.g. "bad-magic", "truncated", "backing-mismatch". */
  readonly code: string;
  /** The file the problem is about, when there is one. */
  readonly file?: string;

  constructor(code: string, message: string, options: { file?: string; cause?: unknown } = {}) {
    super(oneLine(message), options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UbdcowError';
    this.code = code;
    this.file = options.file;
  }
}

/** A header or geometry problem: names the field, the value found and what was expected. */
export class CowFormatError extends UbdcowError {
  readonly field: string;
  readonly value: string;
  readonly expected: string;

  constructor(code: string, field: string, value: unknown, expected: string, file?: string) {
    const where = file ? `${file}: ` : '';
    super(code, `${where}${field} is ${String(value)}, expected ${expected}`, { file });
    this.name = 'CowFormatError';
    this.field = field;
    this.value = String(value);
    this.expected = expected;
  }

  /** The same error, attributed to a file (the pure codecs do not know file names). */
  inFile(file: string): CowFormatError {
    return new CowFormatError(this.code, this.field, this.value, this.expected, file);
  }
}

const friendlyErrno: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EISDIR: 'is a directory',
  ENOTDIR: 'not a directory',
  EEXIST: 'already exists',
  ENOSPC: 'no space left on device',
  EIO: 'input/output error',
  EROFS: 'read-only file system',
  EFBIG: 'file too large',
  EBUSY: 'device or resource busy',
  EAGAIN: 'resource temporarily unavailable',
  ENAMETOOLONG: 'file name too long',
  ERANGE: 'the current folder\'s path is longer than the system allows (PATH_MAX); run from a shorter folder or give absolute paths',
};

/** Turns a Node system error into a UbdcowError naming the file and the operation. */
export function fromSystemError(err: unknown, file: string, action: string): UbdcowError {
  if (err instanceof UbdcowError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code) {
    const what = friendlyErrno[code] ?? code;
    return new UbdcowError(code, `${file}: cannot ${action}: ${what} (${code})`, { file, cause: err });
  }
  return new UbdcowError('io', `${file}: cannot ${action}: ${String((err as Error)?.message ?? err)}`, {
    file,
    cause: err,
  });
}
