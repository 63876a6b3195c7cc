#!/usr/bin/env node
/*
 * Writes man/ubdcow.1 from the same help text `ubdcow --help` and `ubdcow COMMAND --help` print,
 * so the manual cannot drift from the program. Run by `npm run build`, after tsc; package.json's
 * "man" field makes `npm install -g` install it.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bin = path.join(root, 'bin', 'ubdcow');
const { version } = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
const { commands } = await import(path.join(root, 'dist', 'cli', 'registry.js'));

const help = (args) => execFileSync(process.execPath, [bin, ...args, '--help'], { encoding: 'utf8', env: { ...process.env, COLUMNS: '80' } });

/** Text shown as it is: roff must not read a leading dot or quote, or a backslash, as markup. */
function verbatim(text) {
  const lines = text
    .replace(/\\/g, '\\e')
    .split('\n')
    .map((line) => (/^[.']/.test(line) ? `\\&${line}` : line));
  return ['.nf', ...lines, '.fi'].join('\n');
}

const names = commands.map((command) => String(command.command).split(' ')[0]).filter((name) => name !== '$0');
const sections = [
  `.TH UBDCOW 1 "" "ubdcow ${version}" "User Commands"`,
  '.SH NAME',
  'ubdcow \\- copy-on-write disk images in the User-Mode Linux ubd format',
  '.SH SYNOPSIS',
  '.B ubdcow',
  '.I command',
  '[options]',
  '.SH DESCRIPTION',
  verbatim(help([]).trimEnd()),
  '.SH COMMANDS',
];
for (const name of names) sections.push(`.SS ${name}`, verbatim(help([name]).trimEnd()));
sections.push(
  '.SH SEE ALSO',
  '.BR uml_mkcow (1),',
  '.BR uml_moo (1),',
  '.BR qemu-img (1)',
  '',
  'The README and docs/ folder of the package describe the format, the engine and the JSON output.',
);
fs.mkdirSync(path.join(root, 'man'), { recursive: true });
// Written aside and renamed, so a reader (npm pack in a test) never sees half a page.
const page = path.join(root, 'man', 'ubdcow.1');
fs.writeFileSync(`${page}.${process.pid}`, `${sections.join('\n')}\n`);
fs.renameSync(`${page}.${process.pid}`, page);
