/**
 * "Did you mean …?": the one rule by which the options of `DatabaseConfig` and the command
 * line's commands, flags, modules and environments suggest a name for a typo.
 *
 * @module
 */

/**
 * The one of `choices` closest to `input`, when it is close enough to be a typo of it.
 *
 * The rule: the distance is the optimal string alignment distance (insertions, deletions,
 * substitutions and swaps of two neighbours each count 1) between the lower-cased words; a
 * choice that starts with `input` (two or more characters, case kept) counts 1, so that a
 * word cut short finds its whole. The closest choice (the first of equals) is suggested
 * when its distance is at most a third of its length (at least 1, at most 3) and less than
 * its length.
 *
 * @param input What was typed.
 * @param choices The names it may have meant.
 * @returns The suggestion, or `undefined` when no choice is close enough.
 */
export function suggest(input: string, choices: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const choice of choices) {
    const distance = choice.startsWith(input) && input.length >= 2
      ? 1
      : editDistance(input.toLowerCase(), choice.toLowerCase());
    if (distance < bestDistance) {
      best = choice;
      bestDistance = distance;
    }
  }
  const limit = Math.max(1, Math.min(3, Math.floor((best?.length ?? 0) / 3)));
  return best !== undefined && bestDistance <= limit && bestDistance < best.length
    ? best
    : undefined;
}

/** Optimal string alignment distance: insertions, deletions, substitutions, swaps. */
export function editDistance(a: string, b: string): number {
  let before: number[] = [];
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        current[j] = Math.min(current[j], before[j - 2] + 1);
      }
    }
    before = previous;
    previous = current;
  }
  return previous[b.length];
}
