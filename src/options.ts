/**
 * Run-time checks of the option objects the library's functions take. TypeScript catches a
 * misspelt key at compile time, plain JavaScript does not: `commitCow(cow, { out: 'x.img' })`
 * would silently merge in place. Every exported function that takes options checks them here
 * against a record of its option type's keys, which the compiler keeps complete.
 */
import { UbdcowError } from './errors.js';

/** Every key of T, each `true`: the compiler flags a key missing from or foreign to T. */
export type OptionKeys<T> = { readonly [K in keyof Required<T>]: true };

export function checkOptions<T extends object>(functionName: string, options: T | undefined, known: OptionKeys<T>): void {
  if (options === undefined) return;
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new UbdcowError('usage', `${functionName}: options must be an object, got ${options === null ? 'null' : Array.isArray(options) ? 'an array' : typeof options}`);
  }
  const names = Object.keys(known);
  for (const key of Object.keys(options)) {
    if (Object.prototype.hasOwnProperty.call(known, key)) continue;
    const near = names.find((name) => close(name, key));
    const hint = near ? `did you mean "${near}"? ` : '';
    throw new UbdcowError('usage', `${functionName}: unknown option "${key}" (${hint}known options: ${names.join(', ')})`);
  }
}

/** One name contains the other, or they are one or two edits apart. */
function close(a: string, b: string): boolean {
  const x = a.toLowerCase();
  const y = b.toLowerCase();
  if (x.includes(y) || y.includes(x)) return true;
  return editDistance(x, y) <= 2;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}
