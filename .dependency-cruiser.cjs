/*
 * The dependency rules `npm test` enforces (npm run lint:deps): no import cycles, type-only
 * imports included, and the layers only import downwards:
 *   cli -> commands -> guestfs -> io, nbd -> format -> (nothing but errors/options)
 *   src/io is six folders, each entered through its index.ts only:
 *   journal -> engine -> bitmap -> image -> lock -> file (no cycles keeps that order).
 *   os (koffi bindings) is reached from io, and from nbd and cli for sendfile/splice to sockets
 *   and pipes; commands, guestfs and format go through io.
 * src/index.ts (the public API) may import any layer but cli. Outside src/nbd, src/nbd is reached
 * through its door, src/nbd/index.ts (tests may import its internals). docs/architecture.md explains them.
 */
module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'An import cycle (type-only imports count: they couple the modules all the same).',
      from: {},
      to: { circular: true },
    },
    {
      name: 'format-is-pure',
      severity: 'error',
      comment: 'src/format is pure: no I/O, no layer above it.',
      from: { path: '^src/format/' },
      to: { path: '^src/', pathNot: ['^src/format/', '^src/errors\\.ts$'] },
    },
    {
      name: 'os-only-below-io',
      severity: 'error',
      comment: 'The koffi bindings in src/os are reached through src/io (FileSystem, file-ops, locks); nbd and cli use them for sockets and pipes.',
      from: { path: '^src/', pathNot: ['^src/(io|os|nbd|cli)/'] },
      to: { path: '^src/os/' },
    },
    {
      name: 'io-below-commands',
      severity: 'error',
      comment: 'src/io serves the commands, the guest file systems and NBD; it never imports them.',
      from: { path: '^src/(io|os)/' },
      to: { path: '^src/(cli|commands|guestfs|nbd)/' },
    },
    {
      name: 'nbd-is-a-protocol',
      severity: 'error',
      comment: 'src/nbd speaks the protocol over any NbdBlockDevice; what is served is decided in commands/serve.ts.',
      from: { path: '^src/nbd/' },
      to: { path: '^src/(cli|commands|guestfs)/' },
    },
    {
      name: 'nbd-through-its-door',
      severity: 'error',
      comment: 'Outside src/nbd, the NBD server is reached through src/nbd/index.ts only (tests may reach inside).',
      from: { path: '^src/', pathNot: '^src/nbd/' },
      to: { path: '^src/nbd/', pathNot: '^src/nbd/index\\.ts$' },
    },
    {
      name: 'guestfs-below-commands',
      severity: 'error',
      from: { path: '^src/guestfs/' },
      to: { path: '^src/(cli|commands)/' },
    },
    {
      name: 'io-folder-doors-from-outside',
      severity: 'error',
      comment: 'Each folder of src/io (file, lock, image, bitmap, engine, journal) is entered through its index.ts only.',
      from: { path: '^src/', pathNot: '^src/io/' },
      to: { path: '^src/io/', pathNot: '^src/io/[^/]+/index\\.ts$' },
    },
    {
      name: 'io-folder-doors-between-folders',
      severity: 'error',
      comment: 'Inside src/io a file imports its own folder directly and another folder through that folder\'s index.ts only.',
      from: { path: '^src/io/([^/]+)/' },
      to: { path: '^src/io/', pathNot: ['^src/io/$1/', '^src/io/[^/]+/index\\.ts$'] },
    },
    {
      name: 'cli-on-top',
      severity: 'error',
      comment: 'Only the CLI imports the CLI: commands return data, src/cli prints it.',
      from: { path: '^src/', pathNot: '^src/cli/' },
      to: { path: '^src/cli/' },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    // Type-only imports are dependencies too (they vanish from the JavaScript, not from the design).
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    moduleSystems: ['es6'],
  },
};
