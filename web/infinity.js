// ComfyUI-Infinity frontend extension.
// On every "Infinity Scale Schedule" node it shows, live as the widgets change, the image size the
// node will output, its number of scales and its token count. The arithmetic is in
// schedule_math.js and the table in schedules.json (both mirror infinity_core/schedules.py; tests
// check them against the running node), so no server round trip is needed.
// On every "Infinity Sampler" node it shows whether cfg_list / tau_list fit the connected schedule's
// number of scales, and before a prompt is queued it refuses one whose per-scale list has the wrong
// length (the same error display as the server's validation, without a round trip). On "Infinity
// Text Encode" it shows the token count the server reported (and any truncation); on "Infinity
// Edit" the report of its last run (the keep_scales k it used, the size, the mask, warnings).
import { app } from "../../scripts/app.js";
import { api, PromptExecutionError } from "../../scripts/api.js";
import { MODE_SIZE, computeSchedule } from "./schedule_math.js";
import { listStatus, samplerProblems } from "./sampler_math.js";

const EXTENSION = "ComfyUI-Infinity.ScaleSchedule";
const NODE_CLASS = "InfinityScaleSchedule";
const SAMPLER_CLASS = "InfinitySampler";
const TEXT_ENCODE_CLASS = "InfinityTextEncode";
const EDIT_CLASS = "InfinityEdit";
const INFO_WIDGET = "schedule_info";
const WATCHED = ["mode", "aspect_ratio", "tier", "width", "height"];
const SAMPLER_WATCHED = ["cfg_list", "tau_list"];

let TABLE = null;
let TABLE_ERROR = null;
try {
  const r = await fetch(new URL("./schedules.json", import.meta.url));
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  TABLE = await r.json();
} catch (e) {
  TABLE_ERROR = `schedules.json could not be loaded: ${e}`;
  console.warn(`[${EXTENSION}] ${TABLE_ERROR}`);
}

const fmt = (n) => Number(n).toLocaleString("en-US");

function widgetValue(node, name) {
  const w = node.widgets?.find((x) => x.name === name);
  // A widget converted to an input and linked has no value we can know here.
  const input = node.inputs?.find((i) => i.name === name || i.widget?.name === name);
  if (input && input.link != null) return undefined;
  return w?.value;
}

/** The two lines shown on the node, from its current widget values. */
export function describeNode(node) {
  if (!TABLE) return TABLE_ERROR ?? "schedule table not loaded";
  const values = Object.fromEntries(WATCHED.map((n) => [n, widgetValue(node, n)]));
  const used = values.mode === MODE_SIZE ? ["width", "height"] : ["aspect_ratio", "tier"];
  if (used.some((n) => values[n] === undefined)) return "size: set when the linked inputs arrive";
  const s = computeSchedule(TABLE, values);
  if (s.error) return `⚠ ${s.error}`;
  const from = values.mode === MODE_SIZE ? `${values.width}×${values.height} → ` : "";
  return `${from}${s.width}×${s.height} px · ${s.ratio} · ${s.tier}\n${s.scales} scales · ${fmt(s.tokens)} tokens`;
}

function refresh(node) {
  const el = node.__infinityInfoEl;
  if (!el) return;
  const text = node.__infinityDescribe ? node.__infinityDescribe(node) : describeNode(node);
  if (el.textContent !== text) el.textContent = text;
  node.setDirtyCanvas?.(true, false);
  if (node.type === NODE_CLASS || node.comfyClass === NODE_CLASS) refreshSamplers();
}

function refreshSamplers() {
  for (const n of app.graph?._nodes ?? app.graph?.nodes ?? []) {
    if ((n.comfyClass ?? n.type) === SAMPLER_CLASS && n.__infinityInfoEl) refresh(n);
  }
}

/** The node feeding input `name` of `node`, through legacy Reroute nodes; null when unlinked. */
function sourceNode(node, name) {
  let slot = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  let current = node;
  for (let hops = 0; slot >= 0 && hops < 32; hops++) {
    const src = current.getInputNode?.(slot);
    if (!src) return null;
    if ((src.comfyClass ?? src.type) !== "Reroute") return src;
    current = src;
    slot = 0;
  }
  return null;
}

/** Number of scales of the schedule connected to a sampler, or null when it cannot be known here. */
function samplerScales(node) {
  const src = sourceNode(node, "scale_schedule");
  if (!src || (src.comfyClass ?? src.type) !== NODE_CLASS || !TABLE) return null;
  const values = Object.fromEntries(WATCHED.map((n) => [n, widgetValue(src, n)]));
  const used = values.mode === MODE_SIZE ? ["width", "height"] : ["aspect_ratio", "tier"];
  if (used.some((n) => values[n] === undefined)) return null;
  const s = computeSchedule(TABLE, values);
  return s.error ? null : s.scales;
}

/** The lines shown on a sampler: the per-scale lists against the connected schedule. */
export function describeSampler(node) {
  const scales = samplerScales(node);
  const head = scales == null ? "schedule: connect an Infinity Scale Schedule to check the lists"
                              : `schedule: ${scales} scales`;
  const lines = [head];
  for (const [name, scalar] of [["cfg_list", "cfg"], ["tau_list", "tau"]]) {
    const v = widgetValue(node, name);
    lines.push(v === undefined ? `${name}: linked` : listStatus(v, name, scales, scalar));
  }
  return lines.join("\n");
}

/**
 * Problems of the Infinity samplers in an API prompt (what is about to be POSTed), as ComfyUI's
 * node_errors: {node id: {errors: [...], dependent_outputs: [], class_type}}. Uses only literal
 * values: a list or a schedule that comes from another node is left to the server.
 */
export function promptErrors(output) {
  const errors = {};
  if (!TABLE || !output) return errors;
  for (const [id, node] of Object.entries(output)) {
    if (node?.class_type !== SAMPLER_CLASS) continue;
    const link = node.inputs?.scale_schedule;
    const src = Array.isArray(link) ? output[String(link[0])] : null;
    let scales = null;
    if (src?.class_type === NODE_CLASS && WATCHED.every((n) => !Array.isArray(src.inputs?.[n]))) {
      const s = computeSchedule(TABLE, src.inputs);
      scales = s.error ? null : s.scales;
    }
    const problems = samplerProblems(node.inputs, scales);
    if (!problems.length) continue;
    errors[id] = {
      errors: problems.map((p) => ({
        type: "value_not_valid",
        message: `Infinity Sampler: ${p.problem}`,
        details: p.hint,
        extra_info: { input_name: p.input, input_config: null, received_value: node.inputs[p.input] },
      })),
      dependent_outputs: [],
      class_type: SAMPLER_CLASS,
    };
  }
  return errors;
}

let lastRejected = null;

/** Check every queued prompt before it leaves the page (all queue paths go through api.queuePrompt). */
function guardQueue() {
  if (api.__infinityGuarded) return;
  const original = api.queuePrompt;
  api.queuePrompt = async function (number, data, ...rest) {
    let nodeErrors = {};
    try {
      nodeErrors = promptErrors(data?.output);
    } catch (e) { // a bug here must never stop the user from queueing: the server checks again
      console.warn(`[${EXTENSION}] per-scale list check skipped: ${e}`);
    }
    if (Object.keys(nodeErrors).length) {
      lastRejected = { at: Date.now(), node_errors: nodeErrors };
      // the same shape as the server's HTTP 400, so the page shows it and marks the node the same way
      throw new PromptExecutionError({
        error: { type: "prompt_outputs_failed_validation", message: "Prompt outputs failed validation",
                 details: "", extra_info: {} },
        node_errors: nodeErrors,
      });
    }
    return original.call(this, number, data, ...rest);
  };
  api.__infinityGuarded = true;
}

function attachInfo(node, options = {}) {
  if (node.__infinityInfoEl) return;
  if (options.describe) node.__infinityDescribe = options.describe;
  const watched = options.watched ?? WATCHED;
  const el = document.createElement("div");
  el.className = options.className ?? "comfyui-infinity-schedule-info";
  el.style.cssText = [
    "font: 11px/1.4 ui-monospace, Menlo, Consolas, monospace",
    "color: var(--input-text, #ddd)",
    "background: var(--comfy-input-bg, rgba(0,0,0,.25))",
    "border-radius: 4px",
    "padding: 3px 6px",
    "white-space: pre-wrap",
    "overflow: hidden",
    "pointer-events: none",
    "box-sizing: border-box",
  ].join(";");
  node.__infinityInfoEl = el;
  const height = options.height ?? 46;
  if (typeof node.addDOMWidget === "function") {
    const widget = node.addDOMWidget(options.widgetName ?? INFO_WIDGET, "infinity_schedule_info", el, {
      serialize: false, // display only: never in widgets_values nor in the API prompt
      hideOnZoom: false,
      margin: 4, // the element gets the widget height minus twice this
      getValue: () => el.textContent,
      setValue: () => {},
      getMinHeight: () => height,
      getMaxHeight: () => height,
    });
    widget.serialize = false;
  }
  for (const w of node.widgets ?? []) {
    if (!watched.includes(w.name)) continue;
    const cb = w.callback;
    w.callback = function (...args) {
      const r = cb?.apply(this, args);
      refresh(node);
      return r;
    };
  }
  refresh(node);
}

const SAMPLER_INFO = { describe: describeSampler, watched: SAMPLER_WATCHED, widgetName: "sampler_info",
                       className: "comfyui-infinity-sampler-info", height: 62 };

/** Show the text a node's run reported (its `ui.text`) under the node. */
function hookReport(nodeType, { widgetName, className, height }) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message, ...rest) {
    const r = onExecuted?.apply(this, [message, ...rest]);
    const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
    if (text != null) {
      attachInfo(this, { describe: (n) => n.__infinityReport ?? "", watched: [], widgetName, className, height });
      this.__infinityReport = String(text);
      refresh(this);
    }
    return r;
  };
}

function hookSampler(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function (...args) {
    const r = onNodeCreated?.apply(this, args);
    attachInfo(this, SAMPLER_INFO);
    return r;
  };
  for (const hook of ["onConfigure", "onConnectionsChange"]) {
    const previous = nodeType.prototype[hook];
    nodeType.prototype[hook] = function (...args) {
      const r = previous?.apply(this, args);
      refresh(this);
      return r;
    };
  }
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === SAMPLER_CLASS) return hookSampler(nodeType);
    if (nodeData?.name === TEXT_ENCODE_CLASS) {
      return hookReport(nodeType, { widgetName: "token_info", className: "comfyui-infinity-token-info", height: 30 });
    }
    if (nodeData?.name === EDIT_CLASS) {
      return hookReport(nodeType, { widgetName: "edit_info", className: "comfyui-infinity-edit-info", height: 92 });
    }
    if (nodeData?.name !== NODE_CLASS) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      attachInfo(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      refresh(this); // widget values loaded from a saved workflow
      return r;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const r = onConnectionsChange?.apply(this, args);
      refresh(this);
      return r;
    };
  },
  setup() {
    guardQueue();
    // For browser checks and debugging: window.ComfyUIInfinity.describe(node) etc.
    window.ComfyUIInfinity = {
      loaded: true, tableError: TABLE_ERROR, describe: describeNode, describeSampler, promptErrors,
      get lastRejected() { return lastRejected; },
    };
  },
});
