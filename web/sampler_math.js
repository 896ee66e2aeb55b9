// Pure checks for the "Infinity Sampler" node's per-scale lists (cfg_list, tau_list), mirrored from
// infinity_core/sampler.py parse_list and nodes/sampler_node.py: a list is numbers separated by
// commas and/or spaces, each a Python-style float literal and finite; a non-empty list must have
// exactly one value per scale of the schedule. No DOM, no ComfyUI imports: tests run this file with
// Node and compare it with the Python parser. ComfyUI imports every .js under web/ as an
// extension; this one only defines functions.

// Python float() syntax: digits with single underscores between them, optional fraction and exponent,
// or inf/infinity/nan (which parse_list then refuses as not finite).
const DIGITS = String.raw`\d(?:_?\d)*`;
const PY_FLOAT = new RegExp(
  String.raw`^[+-]?(?:(?:(?:${DIGITS})?\.${DIGITS}|${DIGITS}\.?)(?:[eE][+-]?${DIGITS})?|inf|infinity|nan)$`, "i");

function pyRepr(s) {
  return s.includes("'") && !s.includes('"') ? `"${s}"` : `'${s.replace(/'/g, "\\'")}'`;
}

// What parse_list accepts as a number: plain ASCII decimals (no '_', no inf/nan).
const PLAIN_NUMBER = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/** parse_list("3, 3, 2.5") -> {values: [3, 3, 2.5]} or {error: "..."} (same rules as Python). */
export function parseList(text, name = "list") {
  const str = String(text ?? "");
  const split = (t) => t.split(/\s+/).filter((u) => u.length > 0);
  let items = str.includes(",")
    ? str.split(",").map((t) => t.trim()).flatMap((t) => { const u = split(t); return u.length ? u : [""]; })
    : split(str);
  if (items.length && items[items.length - 1] === "" && str.trimEnd().endsWith(",")) items = items.slice(0, -1);
  const values = [];
  for (let i = 0; i < items.length; i++) {
    const item = items[i];
    if (item === "") return { error: `${name}: item ${i + 1} is empty (two commas in a row?)` };
    const v = PY_FLOAT.test(item) ? Number(item.replace(/_/g, "").replace(/^([+-]?)inf(inity)?$/i, "$1Infinity")) : null;
    if (v !== null && !Number.isFinite(v)) return { error: `${name}: item ${i + 1} (${pyRepr(item)}) is not a finite number` };
    if (v === null || !PLAIN_NUMBER.test(item)) return { error: `${name}: item ${i + 1} (${pyRepr(item)}) is not a number` };
    values.push(v);
  }
  if (values.length === 0) return { error: `${name} is empty` };
  return { values };
}

/**
 * {problem, hint} for one per-scale list input, or null when it is fine. An empty (or blank) list
 * means "use the scalar" and is always fine. `scales` may be null when the schedule is not known here.
 */
export function perScaleCheck(text, name, scales, scalarName) {
  if (String(text ?? "").trim() === "") return null;
  const hint = `give ${scales ?? "one"} number${scales === 1 ? "" : "s"} separated by commas (one per scale), ` +
    `or leave ${name} empty to use ${scalarName}`;
  const parsed = parseList(text, name);
  if (parsed.error) return { problem: parsed.error, hint };
  if (scales != null && parsed.values.length !== scales) {
    return { problem: `${name} has ${parsed.values.length} values but the scale schedule has ${scales} scales`,
             hint: `give exactly ${scales} numbers separated by commas, or leave ${name} empty to use ${scalarName}` };
  }
  if (name === "tau_list" && parsed.values.some((v) => v <= 0)) return { problem: `${name}: every tau must be > 0`, hint };
  return null;
}

/** The problem and its hint as one sentence, or null. */
export function perScaleProblem(text, name, scales, scalarName) {
  const c = perScaleCheck(text, name, scales, scalarName);
  return c ? `${c.problem}: ${c.hint}` : null;
}

/** [{input, problem, hint, message}] for a sampler's cfg_list / tau_list against a scale count. */
export function samplerProblems(inputs, scales) {
  const out = [];
  for (const [name, scalar] of [["cfg_list", "cfg"], ["tau_list", "tau"]]) {
    const value = inputs?.[name];
    if (typeof value !== "string") continue; // linked from another node: checked by the server
    const c = perScaleCheck(value, name, scales, scalar);
    if (c) out.push({ input: name, ...c, message: `${c.problem}: ${c.hint}` });
  }
  return out;
}

/** Short status of a per-scale list for display on the node. */
export function listStatus(text, name, scales, scalarName) {
  if (String(text ?? "").trim() === "") return `${name}: empty (${scalarName} on every scale)`;
  const problem = perScaleProblem(text, name, scales, scalarName);
  if (problem) return `⚠ ${problem}`;
  const n = parseList(text, name).values.length;
  return `${name}: ${n} values ✓`;
}
