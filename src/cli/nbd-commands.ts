/* serve (NBD export), convert (to qcow2/raw/vmdk/vdi/vhdx through qemu-img) and import (back). */
import type { CommandModule } from 'yargs';
import { UbdcowError } from '../errors.js';
import { JSON_SCHEMA_VERSION, formatBytes, note, out, toJson, warn } from './format.js';
import { allocationUnitOf, withAllocationUnitOption } from './allocation-unit-option.js';

const serve: CommandModule = {
  command: 'serve <image>',
  describe: 'Serve a COW (or raw image) over NBD to qemu, qemu-img, nbdinfo, nbdcopy, nbd-client',
  builder: (y) =>
    withAllocationUnitOption(y)
      .positional('image', { type: 'string', describe: 'COW file (or raw image)', demandOption: true })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file instead of the one in the header' })
      .option('socket', { alias: 'k', type: 'string', describe: 'Listen on this Unix socket' })
      .option('port', { alias: 'p', type: 'number', describe: 'Listen on this TCP port (0: any free port)' })
      .option('bind', { type: 'string', default: '127.0.0.1', describe: 'Address to bind the TCP port to' })
      .option('read-only', { alias: 'r', type: 'boolean', describe: 'Export read-only (NBD_FLAG_READ_ONLY; writes get EPERM)' })
      .option('name', { alias: 'x', type: 'string', default: '', describe: 'Export name (the empty default name is accepted too)' })
      .option('sync', { type: 'boolean', describe: 'Every write durable before its reply (like ubdNs)' })
      .option('shared', { alias: 'e', type: 'number', default: 1, describe: 'Clients served at once; later ones wait for a free slot' })
      .option('queue', {
        type: 'number',
        default: 128,
        describe: 'Clients accepted beyond --shared: they finish the handshake and wait in arrival order for a slot; a connection beyond --shared + --queue is closed at once (logged with -v)',
      })
      .option('allocation', {
        choices: ['cow', 'merged'],
        default: 'cow',
        describe: 'base:allocation reports the COW\'s own sectors as data and the rest as holes (cow), or the disk as one image (merged: data where the COW or the backing file holds it, zeros where neither does; for qemu-img compare and whole-disk copies)',
      })
      .option('pid-file', { type: 'string', describe: 'Write the process id here once listening (removed on exit)' })
      .option('json', { type: 'boolean', describe: 'Print the "listening" line as JSON' })
      .option('verbose', { alias: 'v', type: 'boolean', describe: 'Log connections, protocol errors, clients queued or refused, handshake timeouts on stderr' })
      .conflicts('socket', 'port')
      .check((argv) => {
        if (argv.socket === undefined && argv.port === undefined) throw new UbdcowError('usage', 'give --socket PATH or --port N');
        if (argv.port !== undefined && !(Number.isInteger(argv.port) && (argv.port as number) >= 0 && (argv.port as number) <= 65535)) {
          throw new UbdcowError('usage', `--port ${argv.port}: expected a TCP port number (0 to 65535)`);
        }
        return true;
      })
      .example('$0 serve vm.cow --socket /tmp/vm.sock', 'then: qemu-img info nbd+unix:///?socket=/tmp/vm.sock')
      .example('$0 serve vm.cow --port 10809 --read-only', 'then: nbdinfo nbd://localhost'),
  handler: async (argv) => {
    const { serveImage } = await import('../commands/serve.js');
    const verbose = Boolean(argv.verbose);
    const allocationUnit = allocationUnitOf(argv);
    // Signals are caught from the start: a script may send one as soon as the pid file or the
    // "listening" line appears, and the lock must still be released cleanly.
    let early: string | undefined;
    let onSignal: ((signal: string) => void) | undefined;
    process.once('SIGINT', () => (onSignal ? onSignal('SIGINT') : (early ??= 'SIGINT')));
    process.once('SIGTERM', () => (onSignal ? onSignal('SIGTERM') : (early ??= 'SIGTERM')));
    const handle = await serveImage(String(argv.image), {
      backing: argv.backing as string | undefined,
      socket: argv.socket as string | undefined,
      port: argv.port as number | undefined,
      bind: argv.bind as string,
      readOnly: Boolean(argv['read-only']),
      name: argv.name as string,
      sync: Boolean(argv.sync),
      shared: argv.shared as number,
      queue: argv.queue as number,
      pidFile: argv['pid-file'] as string | undefined,
      allocation: argv.allocation as 'cow' | 'merged',
      allocationUnit,
      log: verbose ? (line) => process.stderr.write(`ubdcow serve: ${line}\n`) : undefined,
    });
    const stopped = new Promise<void>((resolve, reject) => {
      onSignal = (signal: string) => {
        onSignal = () => undefined;
        if (verbose) process.stderr.write(`ubdcow serve: ${signal}: finishing in-flight requests, flushing, closing\n`);
        handle.close().then(resolve, reject);
      };
      if (early) onSignal(early);
    });
    warn('serve', handle.warnings);
    const { address } = handle.server;
    if (argv.json) {
      out(JSON.stringify({ schemaVersion: JSON_SCHEMA_VERSION, listening: address, port: handle.server.port, socket: handle.server.socketPath, kind: handle.kind, size: handle.size, readOnly: handle.readOnly, name: argv.name, pid: process.pid }));
    } else {
      out(`listening on ${address} (${handle.kind} ${argv.image}, ${formatBytes(handle.size)}${handle.readOnly ? ', read-only' : ''}, export name "${argv.name}")`);
    }
    await stopped;
  },
};

const convert: CommandModule = {
  command: 'convert <image> <out>',
  describe: 'Convert a COW (or raw image) to raw, qcow2, vmdk, vdi or vhdx with qemu-img, over NBD',
  builder: (y) =>
    y
      .positional('image', { type: 'string', describe: 'COW file (or raw image)', demandOption: true })
      .positional('out', { type: 'string', describe: 'Image to write', demandOption: true })
      .option('O', { type: 'string', choices: ['raw', 'qcow2', 'vmdk', 'vdi', 'vhdx'], demandOption: true, describe: 'Output format' })
      .option('B', { type: 'string', describe: 'Make OUT a qcow2 overlay over this base holding only what the COW holds' })
      .option('backing', { alias: 'b', type: 'string', describe: 'Backing file of IMAGE instead of the one in its header' })
      .option('p', { type: 'boolean', describe: 'Show qemu-img\'s progress' })
      .option('force', { alias: 'f', type: 'boolean', describe: 'Replace OUT if it exists (never IMAGE, its backing file or BASE, by any name)' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 convert vm.cow vm.qcow2 -O qcow2', 'The whole disk as one qcow2 image')
      .example('$0 convert vm.cow vm.qcow2 -O qcow2 -B base.img', 'Only what the COW holds, as a qcow2 overlay over base.img'),
  handler: async (argv) => {
    const { convertImage } = await import('../commands/convert.js');
    const result = await convertImage(String(argv.image), String(argv.out), {
      format: argv.O as 'raw',
      base: argv.B as string | undefined,
      backing: argv.backing as string | undefined,
      progress: Boolean(argv.p),
      force: Boolean(argv.force),
    });
    warn('convert', result.warnings);
    if (argv.json) out(toJson(result));
    else note(`converted ${result.input} to ${result.output} (${result.format}${result.base ? `, overlay over ${result.base}` : ''}, ${formatBytes(result.size)})`);
  },
};

const importCommand: CommandModule = {
  command: 'import <source> <cow> <backing>',
  describe: 'Make a COW over BACKING holding only the 4 KiB pages where SOURCE (any qemu-readable image) differs',
  builder: (y) =>
    withAllocationUnitOption(y)
      .positional('source', { type: 'string', describe: 'Image to import (qcow2, raw, vmdk, ... anything qemu-img reads)', demandOption: true })
      .positional('cow', { type: 'string', describe: 'COW file to create', demandOption: true })
      .positional('backing', { type: 'string', describe: 'Backing file of the new COW (same size as SOURCE\'s disk)', demandOption: true })
      .option('force', { alias: 'f', type: 'boolean', describe: 'Replace COW if it exists (never SOURCE or BACKING, by any name)' })
      .option('p', { type: 'boolean', describe: 'Show qemu-img\'s progress while reading SOURCE' })
      .option('json', { type: 'boolean', describe: 'Print the result as JSON' })
      .example('$0 import vm.qcow2 vm.cow base.img', 'then: linux.uml ubd0=vm.cow,base.img ...'),
  handler: async (argv) => {
    const { importImage } = await import('../commands/import.js');
    const allocationUnit = allocationUnitOf(argv);
    const result = await importImage(String(argv.source), String(argv.cow), String(argv.backing), {
      force: Boolean(argv.force),
      progress: Boolean(argv.p),
      allocationUnit,
    });
    warn('import', result.warnings);
    if (argv.json) out(toJson(result));
    else note(`imported ${result.source} (${result.sourceFormat}) into ${result.cow} over ${result.backing}: ${result.sectors} sectors (${formatBytes(result.bytes)}) differ from the backing`);
  },
};

export const nbdCommands: CommandModule[] = [serve, convert, importCommand];
