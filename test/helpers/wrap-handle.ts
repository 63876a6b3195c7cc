import type { FileHandleLike } from '../../src/io/file/file.js';

/** A handle that forwards everything to `handle` except the methods given in `overrides`. */
export function wrapHandle(handle: FileHandleLike, overrides: Partial<FileHandleLike>): FileHandleLike {
  return {
    fd: handle.fd,
    read: handle.read.bind(handle),
    write: handle.write.bind(handle),
    datasync: handle.datasync.bind(handle),
    sync: handle.sync.bind(handle),
    truncate: handle.truncate.bind(handle),
    stat: handle.stat.bind(handle),
    close: handle.close.bind(handle),
    ...overrides,
  };
}
