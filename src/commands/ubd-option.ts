/**
 * What the kernel's `ubdN=COW,BACKING` option can express. The option is split at the first comma
 * and the kernel command line at white space, so a path holding either cannot be named there; the
 * way out is to start UML with `ubdN=COW` alone (the header holds the backing path) or to name
 * the file through a symlink without those characters.
 */

const unsayable = /[,\s]/;

/** Warnings for a new COW whose paths `ubdN=COW,BACKING` cannot carry; empty when both can. */
export function ubdOptionWarnings(cowPath: string, storedBackingPath: string): string[] {
  const warnings: string[] = [];
  if (unsayable.test(cowPath)) {
    warnings.push(
      `${cowPath}: the path holds a comma or white space, which the kernel's ubd0=COW,BACKING option cannot express ` +
        `(UML fails with "Failed to initialize ubd device"); name the COW through a symlink without them`,
    );
  }
  if (unsayable.test(storedBackingPath)) {
    warnings.push(
      `${storedBackingPath}: the backing path holds a comma or white space, which ubd0=COW,BACKING cannot express; ` +
        `start UML with ubd0=${unsayable.test(cowPath) ? 'COW' : cowPath} alone (the header holds the backing path)`,
    );
  }
  return warnings;
}
