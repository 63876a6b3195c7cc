/**
 * Whether a transmission request may run, decided before it touches the device: the spec's error
 * value and a message for each refusal (unknown command, flags not valid for the command, a write
 * to a read-only export, a range past the end or above the maximum block size...). Pure.
 */
import * as P from './protocol.js';

/** Block size constraints: any alignment works (the engine copies up partial sectors). */
export const BLOCK_SIZES: P.BlockSizes = { minimum: 1, preferred: 4096, maximum: 32 << 20 };

/** The command flags each command accepts (READ's also depend on structured replies). */
const ALLOWED_FLAGS = new Map<number, number>([
  [P.CMD_WRITE, P.CMD_FLAG_FUA],
  [P.CMD_FLUSH, P.CMD_FLAG_FUA],
  [P.CMD_WRITE_ZEROES, P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE],
  [P.CMD_BLOCK_STATUS, P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE],
]);

/** What a check needs to know of the export and of what the handshake agreed (see negotiated.ts). */
export interface RequestContext {
  /** The export's size in bytes, as advertised. */
  readonly size: number;
  /** NBD_FLAG_READ_ONLY was advertised: writes are refused with EPERM. */
  readonly readOnly: boolean;
  /** Structured replies were agreed (NBD_OPT_STRUCTURED_REPLY). */
  readonly structured: boolean;
  /** The id of base:allocation when it was selected for this export (NBD_CMD_BLOCK_STATUS allowed); else undefined. */
  readonly baseAllocationId: number | undefined;
  /** The block size constraints the server enforces (advertised with NBD_OPT_GO/INFO). */
  readonly blockSizes: Readonly<P.BlockSizes>;
}

/** Why a request is refused, as an NBD error value and a message, or undefined when it may run. */
export function requestProblem(r: P.Request, c: RequestContext): { error: number; message: string } | undefined {
  const size = c.size;
  const end = r.offset + r.length;
  const mask = r.type === P.CMD_READ ? P.CMD_FLAG_FUA | (c.structured ? P.CMD_FLAG_DF : 0) : ALLOWED_FLAGS.get(r.type);
  if (mask === undefined) {
    const what = r.type === P.CMD_TRIM ? 'NBD_CMD_TRIM is not supported (not advertised)' : `unknown command ${r.type}`;
    return { error: P.NBD_EINVAL, message: what };
  }
  if ((r.flags & ~mask) !== 0) return { error: P.NBD_EINVAL, message: `command flags 0x${r.flags.toString(16)} are not valid for command ${r.type}` };
  const writes = r.type === P.CMD_WRITE || r.type === P.CMD_WRITE_ZEROES;
  if (writes && c.readOnly) return { error: P.NBD_EPERM, message: 'the export is read-only' };
  switch (r.type) {
    case P.CMD_FLUSH:
      if (r.offset !== 0 || r.length !== 0) return { error: P.NBD_EINVAL, message: 'NBD_CMD_FLUSH needs offset and length 0' };
      return undefined;
    case P.CMD_BLOCK_STATUS:
      if (c.baseAllocationId === undefined) return { error: P.NBD_EINVAL, message: 'no metadata context was selected' };
      if (r.length === 0) return { error: P.NBD_EINVAL, message: 'block status of 0 bytes' };
      if (end > size) return { error: P.NBD_EINVAL, message: `range ends at ${end}, past the export size ${size}` };
      return undefined;
    default:
      if (end > size) return { error: writes ? P.NBD_ENOSPC : P.NBD_EINVAL, message: `range ends at ${end}, past the export size ${size}` };
      if (r.length > c.blockSizes.maximum) return { error: P.NBD_EINVAL, message: `length ${r.length} is above the maximum block size ${c.blockSizes.maximum}` };
      return undefined;
  }
}
