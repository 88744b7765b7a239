// The web UI in a real headless browser (Debian's chromium driven by playwright-core), against
// a real agent: run by the end-to-end test `ui` (hopwatch/tests/e2e/ui.rs), which starts the
// topology, the agent and the traffic and passes what it expects in the environment:
//
//   HOPWATCH_UI_URL          the UI, e.g. http://127.0.0.1:41234/
//   HOPWATCH_UI_EXPECT       JSON: {endpoints: [names], slow_hop: id, narrow: "flag:value",
//                            narrow_match: "text every narrowed row's destination has",
//                            trigger: [argv of a command making one new exchange],
//                            trigger_mark: "text that exchange's row shows"}
//   HOPWATCH_UI_SCREENSHOTS  directory for ui-map.png, ui-hop.png, ui-flows.png, ui-map-dark.png
//   HOPWATCH_CHROMIUM        the browser [default: /usr/bin/chromium]
//
// Prints one line per check; exits 1 with the reason on the first failure.

import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";

const fail = (msg) => {
  console.error(`browser test FAILED: ${msg}`);
  process.exit(1);
};

let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch (e) {
  fail(`cannot load playwright-core (${e.message}); \`cargo xtask test\` installs it with npm ci in hopwatch/ui`);
}
const executablePath = process.env.HOPWATCH_CHROMIUM || "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  fail(`no browser at ${executablePath}: \`cargo xtask test\` installs Debian's chromium`);
}
const url = process.env.HOPWATCH_UI_URL || fail("HOPWATCH_UI_URL is not set");
const expect = JSON.parse(process.env.HOPWATCH_UI_EXPECT || fail("HOPWATCH_UI_EXPECT is not set"));
const shots = process.env.HOPWATCH_UI_SCREENSHOTS || "target/ui-screenshots";
mkdirSync(shots, { recursive: true });

const ok = (msg) => console.log(`ok: ${msg}`);

async function until(what, timeoutMs, fn) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > deadline) fail(`${what} (not within ${timeoutMs} ms; last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// No traffic of the browser's own (component updates, DNS prefetch, safe browsing): the agent on
// this host would show it on the map next to the test's pods.
const quiet = [
  "--no-sandbox",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--dns-prefetch-disable",
  "--disable-domain-reliability",
  "--disable-features=OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,Translate",
  "--no-pings",
  // Names resolve to nothing without asking DNS (the UI is addressed by IP).
  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
];
const browser = await chromium.launch({ executablePath, headless: true, args: quiet });
try {
  // A laptop screen.
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, colorScheme: "light" });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(url.replace(/\/$/, ""))) external.push(r.url()); });
  await page.goto(url);

  // ---- the map shows the topology's endpoints, the slow hop highlighted ----
  const graph = () => page.evaluate(() => {
    const cy = window.hopwatchUi.cy;
    if (!cy) return null;
    return {
      endpoints: cy.nodes(".endpoint").map((n) => n.data("endpoint")),
      edges: cy.edges().map((e) => ({ hop: e.data("hop"), classes: e.classes(), label: e.data("label") })),
    };
  });
  // A threshold between the injected delay (every request on the slow hop takes at least
  // expect.slow_ms) and what a loaded machine adds to the fast hops (a delayed-ACK stall is 200 ms).
  await page.locator("#slow").selectOption(String(expect.threshold_ms));
  const g = await until(`the map shows ${expect.endpoints.join(", ")}`, 20000, async () => {
    const g = await graph();
    return g && expect.endpoints.every((e) => g.endpoints.includes(e)) && g.edges.some((e) => e.hop === expect.slow_hop) ? g : null;
  });
  ok(`map endpoints: ${g.endpoints.join(", ")}`);
  const slow = g.edges.find((e) => e.hop === expect.slow_hop);
  if (!slow.classes.includes("slow")) fail(`slow hop ${slow.hop} is not highlighted: classes ${slow.classes}`);
  // Only the topology's hops: the agent sees every connection on this host, other tests' too.
  const ours = (hop) => expect.endpoints.some((e) => hop.startsWith(e + " -> ")) && expect.endpoints.some((e) => hop.includes(" -> " + e + ":"));
  const others = g.edges.filter((e) => ours(e.hop) && e.hop !== expect.slow_hop && e.classes.includes("slow"));
  if (others.length) fail(`other hops marked slow too: ${others.map((e) => `${e.hop} (${e.label.replace(/\n/g, " | ")})`).join(", ")}`);
  if (!/p99 client \d/.test(slow.label) || !/req\/s/.test(slow.label)) fail(`slow hop label lacks req/s and p99: ${slow.label}`);
  ok(`slow hop highlighted: ${slow.hop} [${slow.classes.join(" ")}] ${slow.label.replace(/\n/g, " | ")}`);
  const requests = () => page.evaluate(() => window.hopwatchUi.state.hops.reduce((n, h) => n + h.requests, 0));
  const requestsAtStart = await requests();
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(shots, "ui-map.png") });

  // ---- click the slow edge: its histogram, connect latency, retransmits, drops, recent flows ----
  const at = await page.evaluate((id) => {
    const cy = window.hopwatchUi.cy;
    const p = cy.getElementById("hop:" + id).renderedMidpoint();
    const box = cy.container().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  }, expect.slow_hop);
  await page.mouse.click(at.x, at.y);
  await until("the hop detail opens on a click of the slow edge", 10000, () =>
    page.evaluate(() => {
      const d = document.querySelector("#detail");
      return d.querySelectorAll(".histogram rect.client").length > 0 && d.querySelectorAll(".hop-flows tbody tr").length > 0
        ? d.innerText
        : null;
    }),
  );
  const detail = await page.locator("#detail").innerText();
  for (const want of ["Client latency", "Server latency", "Connect", "Retransmits", "Drops", "Recent flows"]) {
    if (!detail.includes(want)) fail(`hop detail lacks ${want}`);
  }
  ok("hop detail: histogram, connect latency, retransmits, drops, recent flows");
  await page.screenshot({ path: join(shots, "ui-hop.png") });

  // ---- keyboard: the hop list reaches every hop ----
  await page.locator("#hop-list tbody tr").first().focus();
  await page.keyboard.press("ArrowDown");
  await page.keyboard.press("Enter");
  await until("Enter on a hop-list row opens that hop", 10000, () =>
    page.evaluate(() => {
      const sel = document.querySelector('#hop-list tbody tr[aria-selected="true"]');
      return sel && document.querySelector("#detail .histogram") ? sel.dataset.hop : null;
    }),
  );
  ok("keyboard: a hop-list row opens its hop with Enter");
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await until("Tab, Enter in the hop detail opens its source endpoint", 5000, () =>
    page.evaluate(() => /Hops in[\s\S]*Hops out/.test(document.querySelector("#detail").innerText)),
  );
  ok("keyboard: from a hop to its endpoint's hops in and out");

  // ---- click an endpoint: its hops in and out ----
  const endpoint = expect.slow_hop.split(" -> ")[0];
  const nodeAt = await page.evaluate((id) => {
    const cy = window.hopwatchUi.cy;
    const p = cy.getElementById("ep:" + id).renderedPosition();
    const box = cy.container().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  }, endpoint);
  await page.mouse.click(nodeAt.x, nodeAt.y);
  const hopsOut = await until(`a click on ${endpoint} lists its hops out`, 5000, () =>
    page.evaluate((name) => {
      const d = document.querySelector("#detail");
      return d.querySelector("h2")?.textContent.trim() === name ? d.innerText : null;
    }, endpoint),
  );
  const slowTarget = expect.slow_hop.split(" -> ")[1].split(":")[0];
  if (!hopsOut.includes(slowTarget)) fail(`${endpoint}'s hops out lack ${slowTarget}: ${hopsOut}`);
  ok(`endpoint ${endpoint}: hops in and out, ${slowTarget} among them`);

  // ---- flows: filters narrow the table ----
  await page.locator("#tab-flows").click();
  const rows = () => page.evaluate(() => [...document.querySelectorAll("#flows tbody tr")].map((tr) => tr.innerText));
  const all = await until("the flow table fills", 10000, async () => ((await rows()).length > 0 ? rows() : null));
  const matching = all.filter((r) => r.includes(expect.narrow_match)).length;
  if (matching === all.length) fail(`every flow already matches ${expect.narrow_match}: nothing to narrow`);
  await page.locator("#filter").fill(expect.narrow);
  await page.locator("#filter").press("Enter");
  const narrowed = await until(`filter ${expect.narrow} narrows the table`, 10000, async () => {
    const r = await rows();
    return r.length > 0 && r.every((x) => x.includes(expect.narrow_match)) ? r : null;
  });
  ok(`filter ${expect.narrow}: ${all.length} rows → ${narrowed.length}, all to ${expect.narrow_match}`);
  await page.locator("#verdict").selectOption("DROPPED");
  await until("verdict DROPPED with the filter leaves no forwarded row", 10000, async () => {
    const r = await rows();
    return r.every((x) => !x.includes("FORWARDED")) ? true : null;
  });
  ok("verdict filter combines with the text filter");
  await page.locator("#verdict").selectOption("");
  await until("the narrowed table is back", 10000, async () => ((await rows()).length > 0 ? true : null));

  // ---- follow: a new flow within a second ----
  await page.evaluate(() => {
    window.__added = [];
    new MutationObserver((muts) => {
      for (const m of muts) for (const n of m.addedNodes) if (n._resp) window.__added.push({ at: Date.now(), text: n.innerText, time: n._resp.flow.time });
    }).observe(document.querySelector("#flows tbody"), { childList: true });
  });
  await page.locator("#follow").check();
  await page.waitForTimeout(500);
  const before = Date.now();
  execFileSync(expect.trigger[0], expect.trigger.slice(1), { stdio: "ignore", timeout: 10000 });
  const seen = await until(`follow shows the new exchange (${expect.trigger_mark})`, 5000, () =>
    page.evaluate((mark) => window.__added.find((a) => a.text.includes(mark)), expect.trigger_mark),
  );
  // The flow's own time (when the exchange ended, on this host's clock) to its row on screen.
  const t = /\.(\d+)/.exec(seen.time);
  const flowMs = Date.parse(seen.time.replace(/\.\d+/, "")) + Number((t?.[1] ?? "0").padEnd(9, "0").slice(0, 9)) / 1e6;
  const lag = seen.at - flowMs;
  if (!(lag <= 1000)) fail(`follow showed the flow ${lag.toFixed(0)} ms after it happened (more than a second)`);
  ok(`follow: new flow on screen ${lag.toFixed(0)} ms after it happened (trigger took ${seen.at - before} ms end to end)`);

  // ---- a flow's JSON and its trace ----
  const traced = page.locator("#flows tbody tr", { hasText: expect.trigger_mark }).first();
  await traced.click();
  await until("the flow detail shows its JSON", 5000, () => page.evaluate(() => document.querySelector("#flow-detail .flow-json")?.textContent.includes('"flow"')));
  if (expect.trace_rows) {
    await until(`the trace waterfall shows ${expect.trace_rows} flows`, 10000, () =>
      page.evaluate((n) => document.querySelectorAll("#flow-detail .waterfall .row").length >= n, expect.trace_rows),
    );
    ok(`trace waterfall: flows sharing the trace id`);
  }
  await page.locator("#follow").uncheck();
  await page.screenshot({ path: join(shots, "ui-flows.png") });

  // ---- live refresh: back on the map, the hops have counted the traffic since ----
  await page.locator("#tab-map").click();
  const later = await until("the map refreshes with the traffic since", 6000, async () => {
    const n = await requests();
    return n > requestsAtStart ? n : null;
  });
  ok(`live refresh: ${requestsAtStart} → ${later} requests on the map's hops`);

  // ---- group by node ----
  await page.locator("#group").selectOption("node");
  await until("grouping by node puts the endpoints in a node box", 6000, () =>
    page.evaluate(() => window.hopwatchUi.cy.nodes(".group").map((g) => g.data("label")).some((l) => l.startsWith("node: "))),
  );
  ok("group by node");
  await page.locator("#group").selectOption("namespace");

  // ---- dark theme ----
  await page.locator("#theme").click();
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  if (dark === "rgb(255, 255, 255)") fail("the theme button did not switch to dark");
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(shots, "ui-map-dark.png") });
  ok(`dark theme: background ${dark}`);

  if (external.length) fail(`the page fetched from elsewhere: ${external.join(", ")}`);
  if (errors.length) fail(`errors in the page: ${errors.join(" | ")}`);
  ok("no page errors, nothing fetched from elsewhere");
} finally {
  await browser.close();
}
