// ComfyUI-Infinity frontend extension.
// On every "Infinity Scale Schedule" node it shows, live as the widgets change, the image size the
// node will output, its number of scales and its token count. The arithmetic is in
// schedule_math.js and the table in schedules.json (both mirror infinity_core/schedules.py; tests
// check them against the running node), so no server round trip is needed.
import { app } from "../../scripts/app.js";
import { MODE_SIZE, computeSchedule } from "./schedule_math.js";

const EXTENSION = "ComfyUI-Infinity.ScaleSchedule";
const NODE_CLASS = "InfinityScaleSchedule";
const INFO_WIDGET = "schedule_info";
const WATCHED = ["mode", "aspect_ratio", "tier", "width", "height"];

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
  const text = describeNode(node);
  if (el.textContent !== text) el.textContent = text;
  node.setDirtyCanvas?.(true, false);
}

function attachInfo(node) {
  if (node.__infinityInfoEl) return;
  const el = document.createElement("div");
  el.className = "comfyui-infinity-schedule-info";
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
  if (typeof node.addDOMWidget === "function") {
    const widget = node.addDOMWidget(INFO_WIDGET, "infinity_schedule_info", el, {
      serialize: false, // display only: never in widgets_values nor in the API prompt
      hideOnZoom: false,
      margin: 4, // the element gets the widget height minus twice this
      getValue: () => el.textContent,
      setValue: () => {},
      getMinHeight: () => 46,
      getMaxHeight: () => 46,
    });
    widget.serialize = false;
  }
  for (const w of node.widgets ?? []) {
    if (!WATCHED.includes(w.name)) continue;
    const cb = w.callback;
    w.callback = function (...args) {
      const r = cb?.apply(this, args);
      refresh(node);
      return r;
    };
  }
  refresh(node);
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
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
    // For browser checks and debugging: window.ComfyUIInfinity.describe(node)
    window.ComfyUIInfinity = { loaded: true, tableError: TABLE_ERROR, describe: describeNode };
  },
});
