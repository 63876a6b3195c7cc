/**
 * What the handshake agreed with one client: the value handshake.ts returns and request-loop.ts
 * serves by. Invariant: options are resolved once. The value is built in one step when the
 * client chooses the export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), is frozen, and is the only
 * negotiation state the transmission phase sees: nothing after the handshake re-decides it.
 */
import type { RequestContext } from './request-checks.js';

export interface Negotiated extends RequestContext {
  /** The export the client chose, as it named it (the empty name is the default export). */
  readonly exportName: string;
  /** NBD_FLAG_C_NO_ZEROES: the NBD_OPT_EXPORT_NAME reply left out its 124 zero bytes. */
  readonly noZeroes: boolean;
  /** The transmission flags advertised (NBD_FLAG_*): what the client may send. */
  readonly transmissionFlags: number;
}
