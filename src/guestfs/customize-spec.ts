/**
 * The operations of `ubdcow customize`, with virt-customize's names and argument forms, and
 * their parsing from `--name VALUE` strings and from `--commands-from-file` lines (`name value`,
 * one a line, `#` comments, a trailing backslash continues a line). Parsing checks the form only;
 * whether paths exist is found out when the operation runs.
 */
import { UbdcowError } from '../errors.js';
import { guestPath } from './guest-writer.js';

export type SshKeySource = { file: string } | { string: string };

export type CustomizeOperation =
  | { op: 'upload'; from: string; to: string }
  | { op: 'copy-in'; from: string; toDir: string }
  | { op: 'write'; path: string; content: string }
  | { op: 'append-line'; path: string; line: string }
  | { op: 'mkdir'; path: string }
  | { op: 'delete'; path: string }
  | { op: 'move'; from: string; to: string }
  | { op: 'link'; target: string; links: string[] }
  | { op: 'chmod'; mode: number; path: string }
  | { op: 'chown'; uid: number; gid: number; path: string }
  | { op: 'touch'; path: string }
  | { op: 'truncate'; path: string }
  | { op: 'hostname'; name: string }
  | { op: 'ssh-inject'; user: string; key?: SshKeySource };

/** Every operation name, as the CLI option it is (`--upload` ...), in the order `--help` lists them. */
export const OPERATION_NAMES = [
  'upload',
  'copy-in',
  'write',
  'append-line',
  'mkdir',
  'delete',
  'move',
  'link',
  'chmod',
  'chown',
  'touch',
  'truncate',
  'hostname',
  'ssh-inject',
] as const;

export type OperationName = (typeof OPERATION_NAMES)[number];

export function isOperationName(name: string): name is OperationName {
  return (OPERATION_NAMES as readonly string[]).includes(name);
}

function usage(name: string, value: string, expected: string): UbdcowError {
  return new UbdcowError('usage', `--${name} ${JSON.stringify(value)}: expected ${expected}`);
}

/** Splits at the first colon: `A:B` (B may hold colons). */
function pair(name: string, value: string, expected: string): [string, string] {
  const at = value.indexOf(':');
  if (at <= 0 || at === value.length - 1) throw usage(name, value, expected);
  return [value.slice(0, at), value.slice(at + 1)];
}

/** The operation `--NAME VALUE` stands for. */
export function parseOperation(name: string, value: string): CustomizeOperation {
  const g = (path: string) => guestPath(path, `--${name}:`);
  switch (name) {
    case 'upload': {
      // The host file may hold colons; the guest path is after the last one (as virt-customize).
      const at = value.lastIndexOf(':');
      if (at <= 0 || at === value.length - 1) throw usage(name, value, 'HOSTFILE:GUESTPATH');
      return { op: 'upload', from: value.slice(0, at), to: g(value.slice(at + 1)) };
    }
    case 'copy-in': {
      const at = value.lastIndexOf(':');
      if (at <= 0 || at === value.length - 1) throw usage(name, value, 'HOSTPATH:GUESTDIR');
      return { op: 'copy-in', from: value.slice(0, at), toDir: g(value.slice(at + 1)) };
    }
    case 'write': {
      const at = value.indexOf(':');
      if (at <= 0) throw usage(name, value, 'GUESTFILE:CONTENT');
      return { op: 'write', path: g(value.slice(0, at)), content: value.slice(at + 1) };
    }
    case 'append-line': {
      const at = value.indexOf(':');
      if (at <= 0) throw usage(name, value, 'GUESTFILE:LINE');
      return { op: 'append-line', path: g(value.slice(0, at)), line: value.slice(at + 1) };
    }
    case 'mkdir':
    case 'delete':
    case 'touch':
    case 'truncate':
      if (value === '') throw usage(name, value, 'a guest path');
      return { op: name, path: g(value) };
    case 'move': {
      const [from, to] = pair(name, value, 'SOURCE:DEST');
      return { op: 'move', from: g(from), to: g(to) };
    }
    case 'link': {
      const parts = value.split(':');
      if (parts.length < 2 || parts.some((part) => part === '')) throw usage(name, value, 'TARGET:LINK[:LINK...]');
      // The target is stored as given (a relative symlink stays relative).
      return { op: 'link', target: parts[0]!, links: parts.slice(1).map(g) };
    }
    case 'chmod': {
      const [mode, path] = pair(name, value, 'PERMISSIONS:PATH (octal permissions, e.g. 0755:/usr/local/bin/tool)');
      if (!/^[0-7]{1,4}$/.test(mode)) throw usage(name, value, 'octal PERMISSIONS such as 0644 or 755');
      return { op: 'chmod', mode: parseInt(mode, 8), path: g(path) };
    }
    case 'chown': {
      const match = /^(\d+):(\d+):(.+)$/.exec(value);
      if (!match) throw usage(name, value, 'UID:GID:PATH (numeric ids)');
      return { op: 'chown', uid: Number(match[1]), gid: Number(match[2]), path: g(match[3]!) };
    }
    case 'hostname':
      if (!/^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$/.test(value)) throw usage(name, value, 'a host name (letters, digits, dots and hyphens)');
      return { op: 'hostname', name: value };
    case 'ssh-inject': {
      const match = /^([^:]+)(?::(file|string):(.+))?$/s.exec(value);
      if (!match) throw usage(name, value, 'USER, USER:file:KEYFILE or USER:string:KEY');
      const key = match[2] === 'file' ? { file: match[3]! } : match[2] === 'string' ? { string: match[3]! } : undefined;
      return { op: 'ssh-inject', user: match[1]!, key };
    }
    default:
      throw new UbdcowError('usage', `unknown customize operation ${JSON.stringify(name)} (one of: ${OPERATION_NAMES.join(', ')})`);
  }
}

/** The operations of a `--commands-from-file` file: `name value` (or `name:value`) per line. */
export function parseCommandsFile(text: string, file: string): CustomizeOperation[] {
  const operations: CustomizeOperation[] = [];
  const lines = text.replace(/\\\n/g, '').split('\n');
  lines.forEach((raw, index) => {
    const line = raw.replace(/^\s+/, '').replace(/\r$/, '');
    if (line === '' || line.startsWith('#')) return;
    const match = /^([a-z-]+)(?:\s+|:)?(.*)$/s.exec(line);
    const name = match?.[1] ?? '';
    if (!match || !isOperationName(name)) {
      throw new UbdcowError('usage', `${file}: line ${index + 1}: ${JSON.stringify(line.slice(0, 40))} does not start with an operation name (one of: ${OPERATION_NAMES.join(', ')})`, { file });
    }
    try {
      operations.push(parseOperation(name, match[2]!));
    } catch (err) {
      if (err instanceof UbdcowError) throw new UbdcowError('usage', `${file}: line ${index + 1}: ${err.message}`, { file });
      throw err;
    }
  });
  return operations;
}

/** How an operation reads on the command line (for messages and the dry run). */
export function describeOperation(operation: CustomizeOperation): string {
  switch (operation.op) {
    case 'upload': return `--upload ${operation.from}:${operation.to}`;
    case 'copy-in': return `--copy-in ${operation.from}:${operation.toDir}`;
    case 'write': return `--write ${operation.path}:${operation.content.length > 40 ? `${operation.content.slice(0, 40)}...` : operation.content}`;
    case 'append-line': return `--append-line ${operation.path}:${operation.line}`;
    case 'mkdir':
    case 'delete':
    case 'touch':
    case 'truncate': return `--${operation.op} ${operation.path}`;
    case 'move': return `--move ${operation.from}:${operation.to}`;
    case 'link': return `--link ${operation.target}:${operation.links.join(':')}`;
    case 'chmod': return `--chmod ${operation.mode.toString(8).padStart(4, '0')}:${operation.path}`;
    case 'chown': return `--chown ${operation.uid}:${operation.gid}:${operation.path}`;
    case 'hostname': return `--hostname ${operation.name}`;
    case 'ssh-inject': return `--ssh-inject ${operation.user}${operation.key ? ('file' in operation.key ? `:file:${operation.key.file}` : ':string:...') : ''}`;
  }
}
