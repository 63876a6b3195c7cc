/**
 * The door of src/nbd: what the rest of ubdcow (commands/serve.ts, the public index.ts) uses of
 * the NBD server. Invariant: code outside src/nbd imports this file only (dependency rule
 * `nbd-through-its-door`; tests may reach inside). Behind it: the pure wire codec (constants.ts,
 * protocol.ts, transmission.ts), and per connection the handshake, the negotiated options and
 * the request loop (see docs/architecture.md).
 */
export { serveNbd, type NbdServer } from './server.js';
export type { NbdBlockDevice, NbdServeOptions } from './server-state.js';
export type { FileRange } from './reply-writer.js';
export { BLOCK_SIZES } from './request-checks.js';
/** The base:allocation vocabulary of NbdBlockDevice.blockStatus. */
export { STATE_HOLE, STATE_ZERO } from './constants.js';
export type { StatusDescriptor } from './transmission.js';
