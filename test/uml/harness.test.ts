/**
 * The UML harness itself: a hung guest is killed whole at its timeout, killGuests leaves nothing
 * behind, kernel parameters reach /init, and a failing /init body is reported as such.
 */
import * as fs from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { UmlLab, markersNamed, missingUmlTools, processesInGroup, umlSuiteTitle, umlTestTimeout } from './harness.js';

const missing = missingUmlTools();

const sleeper = `
mark waiting
sleep 300
`;

describe.skipIf(missing.length > 0)(umlSuiteTitle('UML test harness', missing), () => {
  let lab: UmlLab;

  beforeAll(() => {
    lab = UmlLab.create();
  });
  afterEach(() => lab.killGuests());
  afterAll(async () => {
    const dir = lab?.dir;
    await lab?.dispose();
    if (dir) expect(fs.existsSync(dir)).toBe(false);
  });

  it('a guest that hangs is killed with its whole process group at the timeout', async () => {
    const guest = await lab.boot(sleeper, { disks: {}, timeoutMs: 4000 });
    expect(await guest.waitForMarker('waiting')).toEqual(['waiting']);
    expect(processesInGroup(guest.pid).length).toBeGreaterThan(1);
    const result = await guest.done;
    expect(result.timedOut).toBe(true);
    expect(result.bodyStatus).toBeUndefined();
    expect(processesInGroup(guest.pid)).toEqual([]);
  }, umlTestTimeout);

  it('killGuests (what afterEach calls) ends a running guest and all its processes', async () => {
    const guest = await lab.boot(sleeper, { disks: {} });
    await guest.waitForMarker('waiting');
    await lab.killGuests();
    const result = await guest.done;
    expect(result.timedOut).toBe(false);
    expect(result.bodyStatus).toBeUndefined();
    expect(processesInGroup(guest.pid)).toEqual([]);
  }, umlTestTimeout);

  it('kernel parameters reach /init as environment variables; a failing step stops the body', async () => {
    const result = await lab.run('mark value "$SCENARIO_VALUE"\nfalse\nmark not-reached', {
      disks: {},
      env: { SCENARIO_VALUE: 'forty-two' },
    });
    expect(markersNamed(result, 'value')).toEqual([['forty-two']]);
    expect(markersNamed(result, 'not-reached')).toEqual([]);
    expect(result.bodyStatus).toBe(1);
    expect(result.timedOut).toBe(false);
  }, umlTestTimeout);
});
