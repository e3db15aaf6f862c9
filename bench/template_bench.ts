import { expandTemplate } from "../src/template.ts";

const SQL = "SELECT id, email FROM {{tables.users}} WHERE id = $1";
const precomputed = new Map<string, string>([[
  SQL,
  'SELECT id, email FROM "app".users WHERE id = $1',
]]);
let counter = 0;

Deno.bench({
  name: "Map.get of a precomputed query",
  group: "template",
  baseline: true,
  fn(): void {
    if (precomputed.get(SQL) === undefined) throw new Error("Cannot run the baseline: key missing");
  },
});

Deno.bench({
  name: "expandTemplate() cached expansion",
  group: "template",
  fn(): void {
    if (expandTemplate(SQL, "app").length === 0) throw new Error("Cannot expand: empty result");
  },
});

Deno.bench({
  name: "expandTemplate() uncached expansion",
  group: "template",
  fn(): void {
    const unique = `${SQL} -- ${counter++}`;
    if (expandTemplate(unique, "app").length === 0) throw new Error("Cannot expand: empty result");
  },
});
