// Headless Chromium check of ComfyUI-Infinity in the real ComfyUI frontend (playwright-core + Debian's
// chromium; run by tests/test_comfy_browser.py, which starts the server).
//
//   node check_workflows.mjs --url http://127.0.0.1:PORT --workflows DIR --api DIR --out DIR
//                            [--run NAME[,NAME...]] [--validate NAME] [--chromium PATH]
//
// For every UI-format workflow in --workflows it: loads it the way the page does (app.loadGraphData),
// records node types the frontend reports missing, compares the widget values it shows with the file,
// converts it as "Queue" would (app.graphToPrompt) and compares with the API twin in --api, and saves a
// screenshot. --run NAMES queues those workflows from the page and waits for them (and reads the reports
// the extension shows on Infinity Text Encode and Infinity Edit); --validate NAME puts a
// wrong-length cfg_list on that workflow's sampler and checks the extension refuses to queue it
// (nothing reaches the server). Console errors and page errors are collected throughout. Every
// request that leaves loopback is aborted. Prints one JSON object (also written to OUT/result.json).
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const args = {};
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a.startsWith("--")) args[a.slice(2)] = process.argv[i + 1] && !process.argv[i + 1].startsWith("--") ? process.argv[++i] : true;
}
const url = args.url;
const out = args.out;
const runs = typeof args.run === "string" ? args.run.split(",") : [];
fs.mkdirSync(out, { recursive: true });
const t0 = Date.now();
const result = { url, workflows: {}, console: [], pageErrors: [], blocked: [], httpErrors: [], ok: false };

async function api(pathname, init) {
  const r = await fetch(url + pathname, init);
  return r.headers.get("content-type")?.includes("json") ? r.json() : r.text();
}

await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });

const browser = await chromium.launch({
  executablePath: args.chromium || process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
  await context.route((u) => !/^(http|ws)s?:\/\/(127\.0\.0\.1|localhost)(:|\/)/.test(u.href), (route) => {
    result.blocked.push(route.request().url());
    return route.abort();
  });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") result.console.push(m.text()); });
  page.on("pageerror", (e) => result.pageErrors.push(String(e?.stack || e)));
  result.httpErrors = [];
  page.on("response", (resp) => { if (resp.status() >= 400) result.httpErrors.push(`${resp.status()} ${resp.url()}`); });

  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 90000 });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas, null, { timeout: 90000 });
  await page.waitForFunction(() => window.ComfyUIInfinity?.loaded, null, { timeout: 30000 });
  result.extensionLoaded = true;
  result.tableError = await page.evaluate(() => window.ComfyUIInfinity.tableError);
  await page.evaluate(() => {
    window.__infinityMissing = [];
    const original = window.app.showMissingNodesError.bind(window.app);
    window.app.showMissingNodesError = (types) => { window.__infinityMissing.push(...types); return original(types); };
  });

  const files = fs.readdirSync(args.workflows).filter((f) => f.endsWith(".json")).sort();
  for (const file of files) {
    const name = path.basename(file, ".json");
    const ui = JSON.parse(fs.readFileSync(path.join(args.workflows, file), "utf8"));
    const twin = JSON.parse(fs.readFileSync(path.join(args.api, file), "utf8"));
    const r = { file };
    await page.evaluate(() => { window.__infinityMissing.length = 0; });
    await page.evaluate(async ([wf, n]) => { await window.app.loadGraphData(wf, true, true, n); }, [ui, name]);
    await page.waitForTimeout(600);
    const state = await page.evaluate(() => {
      const nodes = window.app.graph._nodes ?? window.app.graph.nodes;
      const registered = window.LiteGraph.registered_node_types;
      return {
        missing: [...window.__infinityMissing],
        unregistered: nodes.filter((n) => !registered[n.type]).map((n) => n.type),
        nodes: nodes.map((n) => ({
          id: n.id, type: n.type,
          widgets: n.serialize().widgets_values ?? [],  // what saving the workflow would write
          info: n.__infinityInfoEl?.textContent ?? null,
        })),
      };
    });
    r.missing = [...new Set([...state.missing.map((m) => (typeof m === "string" ? m : m.type)), ...state.unregistered])];
    r.widgetMismatch = [];
    for (const node of ui.nodes) {
      const got = state.nodes.find((n) => n.id === node.id);
      if (!got) { r.widgetMismatch.push({ id: node.id, problem: "not in graph" }); continue; }
      const want = node.widgets_values ?? [];
      if (JSON.stringify(got.widgets.slice(0, want.length)) !== JSON.stringify(want)) {
        r.widgetMismatch.push({ id: node.id, type: node.type, want, got: got.widgets });
      }
    }
    r.info = Object.fromEntries(state.nodes.filter((n) => n.info != null).map((n) => [n.type, n.info]));
    const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const strip = (g) => Object.fromEntries(Object.entries(g).map(([k, v]) => [k, { class_type: v.class_type, inputs: v.inputs }]));
    r.promptMatchesTwin = JSON.stringify(strip(prompt)) === JSON.stringify(strip(twin));
    if (!r.promptMatchesTwin) r.prompt = prompt;
    r.extensionErrors = await page.evaluate((p) => window.ComfyUIInfinity.promptErrors(p), prompt);
    await page.evaluate(() => { try { window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch (e) {} });
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(out, `${name}.png`) });

    if (args.validate === name) {
      // a cfg_list that does not fit the schedule is refused before anything is sent
      const before = Object.keys(await api("/history")).length;
      const shown = await page.evaluate(async () => {
        const sampler = (window.app.graph._nodes ?? window.app.graph.nodes).find((n) => n.type === "InfinitySampler");
        const w = sampler.widgets.find((x) => x.name === "cfg_list");
        const keep = w.value;
        w.value = "3, 3, 3";
        w.callback?.(w.value);
        const info = sampler.__infinityInfoEl?.textContent;
        const queued = await window.app.queuePrompt(0, 1);
        const rejected = window.ComfyUIInfinity.lastRejected;
        w.value = keep;
        w.callback?.(w.value);
        return { info, queued, rejected, infoAfter: sampler.__infinityInfoEl?.textContent };
      });
      await page.waitForTimeout(500);
      await page.screenshot({ path: path.join(out, `${name}_refused.png`) });
      const queue = await api("/queue");
      r.validation = { ...shown, historyGrew: Object.keys(await api("/history")).length !== before,
                       queueLength: queue.queue_running.length + queue.queue_pending.length };
      await page.keyboard.press("Escape");
    }
    if (runs.includes(name)) {
      const before = new Set(Object.keys(await api("/history")));
      await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
      const deadline = Date.now() + 300000;
      let entry = null;
      while (Date.now() < deadline && !entry) {
        const h = await api("/history");
        const id = Object.keys(h).find((k) => !before.has(k) && h[k].status?.completed !== undefined &&
                                          ["success", "error"].includes(h[k].status?.status_str));
        if (id) entry = h[id];
        else await new Promise((res) => setTimeout(res, 250));
      }
      r.runFromPage = entry ? entry.status.status_str : "timeout";
      r.runOutputs = entry ? entry.outputs : null;
      await page.waitForTimeout(1500);
      const report = (type) => page.evaluate((t) => {
        const n = (window.app.graph._nodes ?? window.app.graph.nodes).find((x) => x.type === t);
        return n?.__infinityInfoEl?.textContent ?? null;
      }, type);
      r.textEncodeInfo = await report("InfinityTextEncode");
      r.editInfo = await report("InfinityEdit");
      await page.screenshot({ path: path.join(out, `${name}_ran.png`) });
    }
    result.workflows[name] = r;
  }
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack || e);
} finally {
  await browser.close();
  result.seconds = (Date.now() - t0) / 1000;
  fs.writeFileSync(path.join(out, "result.json"), JSON.stringify(result, null, 2));
  console.log(JSON.stringify(result));
}
