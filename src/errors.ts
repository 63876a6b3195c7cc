/**
 * Messages name files, and a file name (or a backing path read from a damaged header) may hold
 * control characters; escaped, every message stays one line on a terminal.
 */
export function oneLine(message: string): string {
  return message.replace(/[\x00-\x1f\x7f]/g, (c) =>
    c === '\n' ? '\\n' : c === '\t' ? '\\t' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
  );
}

/** Node's errno codes (ENOENT, EACCES, ...), carried over as they are by fromSystemError. */
export type SystemErrorCode = `E${Uppercase<string>}` | 'io';

/** Codes of CowFormatError: a header, geometry or file-length fact that is not what it must be. */
export type FormatErrorCode =
  | 'bad-magic'
  | 'bad-version'
  | 'bad-sector-size'
  | 'bad-alignment'
  | 'bad-cow-format'
  | 'backing-empty'
  | 'backing-nul'
  | 'backing-unterminated'
  | 'backing-too-long'
  | 'too-large'
  | 'out-of-range'
  | 'empty'
  | 'truncated-header'
  | 'truncated-bitmap'
  | 'truncated';

/**
 * Every `code` a UbdcowError can carry. Stable: scripts and the CLI's callers match on them.
 * `truncated`: a file (the COW's data area, or the backing file) ends before data it must hold;
 * `backing-mismatch`: the backing file's size or mtime is not what the header recorded (or, for
 * import and convert, the base's size is not the disk's).
 */
export type UbdcowErrorCode =
  | FormatErrorCode
  | SystemErrorCode
  | 'usage'
  | 'not-a-file'
  | 'not-a-cow'
  | 'no-backing'
  | 'backing-missing'
  | 'backing-unreadable'
  | 'backing-not-a-file'
  | 'backing-mismatch'
  | 'backing-differs'
  | 'backing-is-cow'
  | 'exists'
  | 'same-file'
  | 'output-is-cow'
  | 'shared-backing'
  | 'commit-interrupted'
  | 'bad-journal'
  | 'locked'
  | 'closed'
  | 'read-only'
  | 'uncovered'
  | 'missing-tool'
  | 'tool-failed'
  | 'in-use'
  | 'no-fs'
  | 'corrupt-fs'
  | 'unsupported-fs'
  | 'no-partition'
  | 'not-found'
  | 'not-a-dir'
  | 'not-a-symlink'
  | 'symlink-loop'
  | 'which-partition'
  | 'kernel-bitmap-overlap'
  | 'unclean-fs'
  | 'guest-op-failed'
  | 'customize-interrupted';

/**
 * Errors that reach users. Every failure the CLI reports is one of these, so it can print one line
 * (no stack trace) and pick the exit code; anything else is a bug and is reported as such.
 */
export class UbdcowError extends Error {
  /** Stable machine-readable kind, e.g. "bad-magic", "truncated", "backing-mismatch". */
  readonly code: UbdcowErrorCode;
  /** The file the problem is about, when there is one. */
  readonly file?: string;

  constructor(code: UbdcowErrorCode, message: string, options: { file?: string; cause?: unknown } = {}) {
    super(oneLine(message), options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UbdcowError';
    this.code = code;
    this.file = options.file;
  }
}

/** A header or geometry problem: names the field, the value found and what was expected. */
export class CowFormatError extends UbdcowError {
  declare readonly code: FormatErrorCode;
  readonly field: string;
  readonly value: string;
  readonly expected: string;

  constructor(code: FormatErrorCode, field: string, value: unknown, expected: string, file?: string) {
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
    return new UbdcowError(code as SystemErrorCode, `${file}: cannot ${action}: ${what} (${code})`, { file, cause: err });
  }
  return new UbdcowError('io', `${file}: cannot ${action}: ${String((err as Error)?.message ?? err)}`, {
    file,
    cause: err,
  });
}

/*
 * Factories for the conditions several modules report, so each has one code and one wording.
 */

/**
 * A read of `file` from byte `readFrom` got only `got` bytes, but the file must hold data up to
 * byte `neededUpTo`: the COW's data area (or the backing file, `what` says which) was cut short.
 * The one way every reader reports it; a short file never reads as zeros.
 */
export function fileEndsEarly(file: string, readFrom: number, got: number, neededUpTo: number, what: string): CowFormatError {
  // A read that got nothing only proves the file ends at or before where it started.
  return fileTooShort(file, got > 0 ? readFrom + got : `at most ${readFrom}`, neededUpTo, what);
}

/** fileEndsEarly when the file's length is known. */
export function fileTooShort(file: string, length: number | string, neededUpTo: number, what: string): CowFormatError {
  return new CowFormatError('truncated', 'file length', length, `at least ${neededUpTo} bytes (${what})`, file);
}

/**
 * [offset, offset + length) is not a range of whole bytes inside a disk of `size` bytes. `file`
 * names the disk; `action` says what was asked ("read", "write").
 */
export function outOfRange(file: string, action: string, offset: number, length: number, size: number): UbdcowError {
  const request = `${action} of ${length} bytes at offset ${offset}`;
  let why: string;
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0)) why = 'expected non-negative whole numbers';
  else if (offset > size) why = `is outside the disk (0 to ${size} bytes)`;
  else why = `is outside the disk (0 to ${size} bytes): at most ${size - offset} bytes fit there`;
  return new UbdcowError('out-of-range', `${file}: ${request}: ${why}`, { file });
}

/** Throws outOfRange unless offset and length are non-negative safe integers ending within `size`. */
export function checkByteRange(file: string, action: string, offset: number, length: number, size: number): void {
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= size)) {
    throw outOfRange(file, action, offset, length, size);
  }
}

/** The interrupted in-place commit whose journal is found: what to tell, and what to run. */
export function commitInterrupted(cowPath: string, journalPath: string, suffix = ''): UbdcowError {
  return new UbdcowError('commit-interrupted', interruptedCommitText(cowPath, journalPath, suffix), { file: cowPath });
}

export function interruptedCommitText(cowPath: string, journalPath: string, suffix = ''): string {
  return `${cowPath}: an in-place commit was interrupted (${journalPath} exists); run \`ubdcow commit ${cowPath}\` again to finish it${suffix}`;
}

/** `file` has no COW magic where a COW is needed; `consequence` says what that means here. */
export function notACow(file: string, consequence: string): UbdcowError {
  return new UbdcowError('not-a-cow', `${file}: is not a UML COW file (no COW magic)${consequence}`, { file });
}

/** `file` is something other than what is needed (`expected`): a directory, a FIFO, ... */
export function notAFile(file: string, is: string, expected: string): UbdcowError {
  return new UbdcowError('not-a-file', `${file}: is ${is}, expected ${expected}`, { file });
}

/**
 * A backing file (or base) whose size or mtime is not what the COW, or the disk being imported,
 * needs: one code, `backing-mismatch`, wherever it is found. `file` is the file the message names first.
 */
export function backingMismatch(file: string, message: string): UbdcowError {
  return new UbdcowError('backing-mismatch', message, { file });
}

/** A usage mistake in the options (not about any file). */
export function usageError(message: string): UbdcowError {
  return new UbdcowError('usage', message);
}
