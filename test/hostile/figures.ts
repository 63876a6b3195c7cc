/**
 * The reliability tests record what they tried and what happened into
 * test-results/reliability/<mode>/<section>.json (mode: default, or heavy with UBDCOW_HEAVY=1);
 * scripts/reliability-report.ts turns those into docs/reliability.md. One file per test file, so
 * test files running in parallel never race.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repoRoot } from '../helpers/tools.js';

export const FIGURES_DIR = path.join(repoRoot, 'test-results', 'reliability');

/** UBDCOW_HEAVY=1 runs many more cases. */
export const HEAVY = process.env.UBDCOW_HEAVY === '1';

export interface FigureSection {
  /** Section title in the report. */
  title: string;
  /** Free-form notes printed under the title. */
  notes?: string[];
  /** Rows of a table: column name -> value. */
  rows: Array<Record<string, string | number>>;
  /** Summary counts. */
  totals: Record<string, number>;
  /** Anything that went wrong, one line each (empty when all held). */
  failures: string[];
  /** Bugs found and reported but not fixed yet: what, how many cases showed it, one example. */
  knownBugs?: Array<{ description: string; cases: number; example: string }>;
}

/** What one section's JSON file holds: its figures and when, how and where they were recorded. */
export interface FigureRecord extends FigureSection {
  section: string;
  /** ISO time. */
  recordedAt: string;
  mode: 'default' | 'heavy';
  /** Node version. */
  node: string;
}

export function recordFigures(section: string, figures: FigureSection): void {
  const dir = path.join(FIGURES_DIR, HEAVY ? 'heavy' : 'default');
  fs.mkdirSync(dir, { recursive: true });
  const record: FigureRecord = {
    section,
    recordedAt: new Date().toISOString(),
    mode: HEAVY ? 'heavy' : 'default',
    node: process.version,
    ...figures,
  };
  fs.writeFileSync(path.join(dir, `${section}.json`), `${JSON.stringify(record, null, 2)}\n`);
}

/** Counts by key, for building table rows. */
export class Tally<K extends string = string> {
  readonly counts = new Map<K, Record<string, number>>();

  add(key: K, column: string, by = 1): void {
    const row = this.counts.get(key) ?? {};
    row[column] = (row[column] ?? 0) + by;
    this.counts.set(key, row);
  }

  rows(keyName: string, columns: string[]): Array<Record<string, string | number>> {
    return [...this.counts].map(([key, row]) => {
      const out: Record<string, string | number> = { [keyName]: key };
      for (const column of columns) out[column] = row[column] ?? 0;
      return out;
    });
  }

  total(column: string): number {
    let sum = 0;
    for (const row of this.counts.values()) sum += row[column] ?? 0;
    return sum;
  }
}
