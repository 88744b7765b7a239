// hopwatch web UI: the service map (cytoscape), hop and endpoint details, the flow table with
// hubble observe's filters and live follow (server-sent events). Everything comes from this
// server's /api (the collector's store); nothing is loaded from elsewhere.
"use strict";

const REFRESH_MS = 2000;
const MAX_ROWS = 1000;
const FAILING_ERROR_RATIO = 0.05;

const $ = (sel) => document.querySelector(sel);
const state = {
  hops: [],
  nodes: {},
  selected: null, // {kind: "hop"|"endpoint", id}
  layoutKey: "",
  follow: null, // EventSource
  flows: [], // newest first
};

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

function ms(ns) {
  if (ns == null) return "–";
  const v = ns / 1e6;
  if (v >= 1000) return (v / 1000).toFixed(2) + " s";
  if (v >= 10) return v.toFixed(0) + " ms";
  if (v >= 1) return v.toFixed(1) + " ms";
  return (ns / 1e3).toFixed(0) + " µs";
}
const rate = (r) => (r >= 10 ? r.toFixed(0) : r >= 1 ? r.toFixed(1) : r.toFixed(2));
const pct = (x) => (x == null ? "–" : (x * 100).toFixed(x < 0.1 ? 1 : 0) + "%");
const esc = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const endpointName = (e) => (e.namespace ? `${e.namespace}/${e.name}` : e.name);

function slowNs() {
  return Number($("#slow").value) * 1e6;
}

/** healthy, slow (p99 above the threshold) or failing (errors or drops). */
function health(h) {
  if ((h.error_ratio ?? 0) >= FAILING_ERROR_RATIO || h.drops_total > 0) return "failing";
  const p99 = Math.max(h.client_latency?.p99_ns ?? 0, h.server_latency?.p99_ns ?? 0);
  return p99 >= slowNs() ? "slow" : "ok";
}
const p99Of = (h) => Math.max(h.client_latency?.p99_ns ?? 0, h.server_latency?.p99_ns ?? 0);

async function api(path) {
  const resp = await fetch(path, { cache: "no-store" });
  const text = await resp.text();
  if (!resp.ok) throw new Error(text.trim() || resp.statusText);
  return JSON.parse(text);
}

function setStatus(text) {
  $("#status").textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Theme
// ---------------------------------------------------------------------------------------------

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function isDark() {
  const t = document.documentElement.dataset.theme;
  if (t) return t === "dark";
  return window.matchMedia("(prefers-color-scheme: dark)").matches;
}

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  const dark = isDark();
  $("#theme").setAttribute("aria-pressed", String(dark));
  if (cy) cy.style(mapStyle());
}

// ---------------------------------------------------------------------------------------------
// Service map
// ---------------------------------------------------------------------------------------------

let cy = null;

function mapStyle() {
  const fg = cssVar("--fg"), muted = cssVar("--muted"), bg = cssVar("--bg");
  return [
    {
      selector: "node",
      style: {
        label: "data(label)", color: fg, "font-size": 11, "text-valign": "bottom", "text-margin-y": 4,
        "background-color": cssVar("--panel"), "border-width": 2, "border-color": cssVar("--accent"),
        width: 34, height: 34, "text-wrap": "wrap", "text-max-width": 140,
        "text-background-color": bg, "text-background-opacity": 0.8, "text-background-padding": 1,
      },
    },
    {
      selector: "node.group",
      style: {
        label: "data(label)", "text-valign": "top", "text-halign": "center", "font-weight": 600,
        "background-color": cssVar("--group-bg"), "background-opacity": 0.6, "border-width": 1,
        "border-color": cssVar("--border"), "border-style": "dashed", shape: "round-rectangle", padding: 18,
        color: muted,
      },
    },
    { selector: "node.kind-ip", style: { shape: "diamond" } },
    { selector: "node.kind-dns", style: { shape: "round-tag" } },
    {
      selector: "edge",
      style: {
        width: "data(width)", "curve-style": "bezier", "target-arrow-shape": "triangle",
        "line-color": cssVar("--ok"), "target-arrow-color": cssVar("--ok"), label: "data(label)",
        "font-size": 10, color: fg, "text-wrap": "wrap", "text-rotation": "autorotate",
        "text-outline-color": bg, "text-outline-width": 2.5, "arrow-scale": 1.1,
      },
    },
    { selector: "edge.slow", style: { "line-color": cssVar("--slow"), "target-arrow-color": cssVar("--slow") } },
    {
      selector: "edge.failing",
      style: { "line-color": cssVar("--failing"), "target-arrow-color": cssVar("--failing"), "line-style": "solid" },
    },
    {
      selector: "edge.slowest",
      style: { "font-weight": 700, "underlay-color": cssVar("--slow"), "underlay-opacity": 0.25, "underlay-padding": 5 },
    },
    {
      selector: ":selected",
      style: { "overlay-color": cssVar("--accent"), "overlay-opacity": 0.18, "overlay-padding": 6 },
    },
  ];
}

function groupOf(endpoint) {
  const by = $("#group").value;
  if (by === "namespace") return endpoint.namespace ? `ns: ${endpoint.namespace}` : null;
  if (by === "node") {
    const node = state.nodes[endpointName(endpoint)];
    return node ? `node: ${node}` : "node: elsewhere";
  }
  return null;
}

function elementsOf(hops) {
  const nodes = new Map();
  const groups = new Set();
  const edges = [];
  const slowest = hops.reduce((best, h) => (h.requests > 0 && (!best || p99Of(h) > p99Of(best)) ? h : best), null);
  for (const h of hops) {
    for (const e of [h.source, h.destination]) {
      const id = endpointName(e);
      if (nodes.has(id)) continue;
      const group = groupOf(e);
      if (group) groups.add(group);
      nodes.set(id, {
        group: "nodes",
        data: { id: "ep:" + id, endpoint: id, label: e.name, kind: e.kind, parent: group ? "grp:" + group : undefined },
        classes: "endpoint kind-" + e.kind,
      });
    }
    const lines = [];
    const proto = h.protocol === h.transport ? `${h.transport}/${h.port}` : `${h.protocol} :${h.port}`;
    if (h.requests > 0) {
      lines.push(`${proto} · ${rate(h.requests_per_second)} req/s · ${pct(h.error_ratio)} err`);
      lines.push(`p99 client ${ms(h.client_latency?.p99_ns)} · server ${ms(h.server_latency?.p99_ns)}`);
    } else if (h.connects > 0) {
      lines.push(`${proto} · ${h.connects} conns · connect p99 ${ms(h.connect_latency?.p99_ns)}`);
    } else {
      lines.push(proto);
    }
    if (h.drops_total > 0) lines.push(`${h.drops_total} drops`);
    const hl = health(h);
    edges.push({
      group: "edges",
      data: {
        id: "hop:" + h.id, hop: h.id, source: "ep:" + endpointName(h.source), target: "ep:" + endpointName(h.destination),
        label: lines.join("\n"), width: Math.min(8, 1.5 + Math.log10(1 + h.requests_per_second + h.connects)),
        health: hl,
      },
      classes: hl + (h === slowest && hl !== "ok" ? " slowest" : ""),
    });
  }
  const groupEls = [...groups].map((g) => ({ group: "nodes", data: { id: "grp:" + g, label: g }, classes: "group" }));
  return [...groupEls, ...nodes.values(), ...edges];
}

/** The whole map in view, but never magnified past 1.2 (a few endpoints would fill it). */
function fitMap() {
  cy.fit(undefined, 30);
  if (cy.zoom() > 1.2) {
    cy.zoom(1.2);
    cy.center();
  }
}

function renderMap() {
  const els = elementsOf(state.hops);
  const key = els.filter((e) => e.group === "nodes").map((e) => e.data.id + ">" + (e.data.parent ?? "")).sort().join("|");
  if (!cy) {
    cy = cytoscape({
      container: $("#map"), elements: [], style: mapStyle(), wheelSensitivity: 0.3, minZoom: 0.2, maxZoom: 3,
      boxSelectionEnabled: false,
    });
    cy.on("tap", "edge", (ev) => selectHop(ev.target.data("hop")));
    cy.on("tap", "node.endpoint", (ev) => selectEndpoint(ev.target.data("endpoint")));
    new ResizeObserver(() => cy.resize()).observe($("#map"));
  }
  cy.batch(() => {
    if (key !== state.layoutKey) {
      cy.elements().remove();
      cy.add(els);
    } else {
      // Same endpoints: update the hops in place so the layout stays put.
      const want = new Set(els.filter((e) => e.group === "edges").map((e) => e.data.id));
      cy.edges().forEach((e) => { if (!want.has(e.id())) e.remove(); });
      for (const e of els.filter((x) => x.group === "edges")) {
        const have = cy.getElementById(e.data.id);
        if (have.empty()) cy.add(e);
        else { have.data(e.data); have.classes(e.classes); }
      }
    }
  });
  if (key !== state.layoutKey) {
    state.layoutKey = key;
    // Levels from the callers (endpoints nothing calls) to the called, left to right, as a
    // request travels; groups are boxes around their endpoints.
    const endpoints = cy.nodes(".endpoint");
    const roots = endpoints.filter((n) => n.incomers("edge").empty());
    const layout = {
      name: "breadthfirst", directed: true, roots: roots.nonempty() ? roots : undefined, padding: 30,
      spacingFactor: 1.1, avoidOverlap: true, nodeDimensionsIncludeLabels: true,
      transform: (_node, pos) => ({ x: pos.y * 1.8, y: pos.x * 0.7 }),
    };
    endpoints.union(cy.edges()).layout(layout).run();
    fitMap();
  }
  if (state.selected?.kind === "hop") cy.getElementById("hop:" + state.selected.id).select();
}

function renderHopList() {
  const rows = [...state.hops].sort((a, b) => p99Of(b) - p99Of(a));
  const tbody = $("#hop-list tbody");
  tbody.replaceChildren(
    ...rows.map((h) => {
      const tr = document.createElement("tr");
      tr.className = "health-" + health(h);
      tr.dataset.hop = h.id;
      tr.tabIndex = 0;
      tr.setAttribute("aria-selected", String(state.selected?.kind === "hop" && state.selected.id === h.id));
      tr.innerHTML =
        `<td><span class="visually-hidden">${health(h)}: </span>${esc(endpointName(h.source))} → ${esc(endpointName(h.destination))}:${h.port}</td>` +
        `<td>${esc(h.protocol)}</td><td class="num">${rate(h.requests_per_second)}</td>` +
        `<td class="num">${pct(h.error_ratio)}</td><td class="num">${ms(h.client_latency?.p99_ns)}</td>` +
        `<td class="num">${ms(h.server_latency?.p99_ns)}</td><td class="num">${h.drops_total}</td>`;
      return tr;
    }),
  );
}

async function refreshHops() {
  try {
    const v = await api(`/api/hops?since=${$("#since").value}`);
    state.hops = v.hops;
    state.nodes = v.nodes;
    // The list first: its height sets the map's, which the layout fits into.
    renderHopList();
    renderMap();
    const span = v.window_seconds >= 90 ? `${Math.round(v.window_seconds / 60)} min` : `${Math.round(v.window_seconds)} s`;
    setStatus(`${v.hops.length} hops from ${v.flows} flows over the last ${span} · ${new Date().toLocaleTimeString()}`);
    if (state.selected?.kind === "endpoint") renderEndpoint(state.selected.id);
  } catch (e) {
    setStatus("cannot load hops: " + e.message);
  }
}

// ---------------------------------------------------------------------------------------------
// Details: a hop, an endpoint
// ---------------------------------------------------------------------------------------------

function histogramSvg(client, server) {
  const bounds = [...new Set([...client, ...server].map((b) => b[0] ?? Infinity))].sort((a, b) => a - b);
  if (bounds.length === 0) return "<p class=hint>No exchanges measured on this hop.</p>";
  const count = (list, le) => (list.find((b) => (b[0] ?? Infinity) === le) || [0, 0])[1];
  const ct = client.reduce((s, b) => s + b[1], 0) || 1, st = server.reduce((s, b) => s + b[1], 0) || 1;
  const share = bounds.map((le) => [count(client, le) / ct, count(server, le) / st]);
  const max = Math.max(...share.flat(), 0.01);
  const W = 420, H = 140, pad = 18, bw = Math.max(4, Math.min(28, (W - 20) / bounds.length / 2 - 2));
  let bars = "";
  bounds.forEach((le, i) => {
    const x = 10 + i * (2 * bw + 6);
    const [c, s] = share[i];
    const ch = (c / max) * (H - 2 * pad), sh = (s / max) * (H - 2 * pad);
    bars += `<rect class="client" x="${x}" y="${H - pad - ch}" width="${bw}" height="${ch}"><title>client ≤ ${ms(le)}: ${count(client, le)}</title></rect>`;
    bars += `<rect class="server" x="${x + bw}" y="${H - pad - sh}" width="${bw}" height="${sh}"><title>server ≤ ${ms(le)}: ${count(server, le)}</title></rect>`;
    if (bounds.length <= 8 || i % Math.ceil(bounds.length / 8) === 0)
      bars += `<text x="${x}" y="${H - 4}">≤${le === Infinity ? "∞" : ms(le)}</text>`;
  });
  const width = Math.max(W, 20 + bounds.length * (2 * bw + 6));
  return `<svg viewBox="0 0 ${width} ${H}" role="img" aria-label="Latency histogram: share of exchanges per bucket, client side and server side">${bars}</svg>`;
}

function latencyRow(name, l) {
  if (!l) return `<dt>${name}</dt><dd>–</dd>`;
  return `<dt>${name}</dt><dd>p50 ${ms(l.p50_ns)} · p90 ${ms(l.p90_ns)} · p99 ${ms(l.p99_ns)} · max ${ms(l.max_ns)} (${l.count})</dd>`;
}

function tallyList(t) {
  const entries = Object.entries(t || {});
  if (entries.length === 0) return "none";
  return entries.map(([k, n]) => `${esc(k)} ${n}`).join(", ");
}

async function selectHop(id) {
  state.selected = { kind: "hop", id };
  renderHopList();
  const aside = $("#detail");
  aside.innerHTML = `<h2 id="detail-title">Hop</h2><p class="hint">Loading ${esc(id)}…</p>`;
  try {
    const v = await api(`/api/hop?since=${$("#since").value}&id=${encodeURIComponent(id)}`);
    const h = v.hop;
    const hl = health(h);
    const flows = v.flows.map((r) => flowRowHtml(r.flow)).join("");
    aside.innerHTML = `
      <h2 id="detail-title"><button type="button" class="link" data-endpoint="${esc(endpointName(h.source))}">${esc(endpointName(h.source))}</button>
        → <button type="button" class="link" data-endpoint="${esc(endpointName(h.destination))}">${esc(endpointName(h.destination))}</button>:${h.port}
        <span class="badge ${hl}">${hl}</span></h2>
      <dl>
        <dt>Protocol</dt><dd>${esc(h.protocol)} over ${h.transport} (reported by ${h.reported_by.join(" and ")})</dd>
        <dt>Requests</dt><dd>${h.requests} (${rate(h.requests_per_second)}/s), ${h.errors} errors (${pct(h.error_ratio)}), ${h.timeouts} timeouts</dd>
        ${latencyRow("Client latency", h.client_latency)}
        ${latencyRow("Server latency", h.server_latency)}
        ${latencyRow("Connect", h.connect_latency)}
        <dt>Connections</dt><dd>${h.connects} opened, ${h.open_connections} open; failures: ${tallyList(h.connect_failures)}</dd>
        <dt>Retransmits</dt><dd>${h.retransmits} (resets ${h.resets})</dd>
        <dt>Drops</dt><dd>${h.drops_total}${h.drops_total ? ": " + tallyList(h.drops) : ""}</dd>
        <dt>Bytes</dt><dd>${h.bytes_to_server} to server, ${h.bytes_to_client} to client</dd>
      </dl>
      <h3>Latency histogram <span class="key client"></span>client <span class="key server"></span>server</h3>
      <div class="histogram">${histogramSvg(v.histograms.client, v.histograms.server)}</div>
      <h3>Connect latency</h3>
      <div class="histogram">${histogramSvg(v.histograms.connect, [])}</div>
      <h3>Recent flows <small>(${v.flows.length}, newest first)</small></h3>
      <div class="table-wrap"><table class="hop-flows"><thead><tr><th>Time</th><th>Source</th><th>Destination</th><th>Type</th><th>Verdict</th><th>Summary</th></tr></thead>
      <tbody>${flows}</tbody></table></div>`;
    aside.querySelectorAll("button[data-endpoint]").forEach((b) => b.addEventListener("click", () => selectEndpoint(b.dataset.endpoint)));
    aside.querySelectorAll(".hop-flows tbody tr").forEach((tr, i) => {
      tr.tabIndex = 0;
      const open = () => { showTab("flows"); showFlow(v.flows[i]); };
      tr.addEventListener("click", open);
      tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
    });
  } catch (e) {
    aside.innerHTML = `<h2 id="detail-title">Hop</h2><p role="alert">${esc(e.message)}</p>`;
  }
}

function selectEndpoint(name) {
  state.selected = { kind: "endpoint", id: name };
  renderHopList();
  renderEndpoint(name);
}

function renderEndpoint(name) {
  const out = state.hops.filter((h) => endpointName(h.source) === name);
  const inn = state.hops.filter((h) => endpointName(h.destination) === name);
  const item = (h, other) =>
    `<li><button type="button" class="link" data-hop="${esc(h.id)}">${esc(endpointName(other))}:${h.port}</button>
     <span class="badge ${health(h)}">${health(h)}</span> ${rate(h.requests_per_second)} req/s, p99 ${ms(p99Of(h) || null)}, ${pct(h.error_ratio)} err, ${h.drops_total} drops</li>`;
  const node = state.nodes[name];
  $("#detail").innerHTML = `
    <h2 id="detail-title">${esc(name)}</h2>
    <p class="hint">${node ? "seen on node " + esc(node) : "not on a node this collector hears from"}</p>
    <h3>Hops in (${inn.length})</h3><ul>${inn.map((h) => item(h, h.source)).join("") || "<li>none</li>"}</ul>
    <h3>Hops out (${out.length})</h3><ul>${out.map((h) => item(h, h.destination)).join("") || "<li>none</li>"}</ul>`;
  $("#detail").querySelectorAll("button[data-hop]").forEach((b) => b.addEventListener("click", () => selectHop(b.dataset.hop)));
}

// ---------------------------------------------------------------------------------------------
// Flows
// ---------------------------------------------------------------------------------------------

function side(flow, which) {
  const ep = flow[which] || {};
  const ip = flow.IP?.[which] ?? "";
  const l4 = flow.l4?.TCP || flow.l4?.UDP || {};
  const port = l4[which + "_port"];
  const proc = flow[which + "_process"]?.comm;
  const name = ep.pod_name ? (ep.namespace ? ep.namespace + "/" : "") + ep.pod_name : proc || "";
  const addr = port ? `${ip}:${port}` : ip;
  return name ? `${name} (${addr})` : addr;
}

/** The path of an absolute URL (the table already shows the destination). */
function urlPath(url) {
  const m = /^[a-z]+:\/\/[^/]*(\/.*)?$/i.exec(url);
  return m ? m[1] || "/" : url;
}

function summary(f) {
  if (f.l7) {
    const l7 = f.l7;
    let what = l7.protocol || "l7";
    if (l7.http) what += ` ${l7.http.method ?? ""} ${urlPath(l7.http.url ?? "")} ${l7.http.code ?? ""}`;
    if (l7.dns) what += ` ${l7.dns.query ?? ""} ${l7.dns.rcode ?? ""}`;
    if (l7.postgres) what += ` ${l7.postgres.command ?? ""}`;
    if (l7.redis) what += ` ${l7.redis.command ?? ""}`;
    if (l7.error) what += ` error ${l7.error}`;
    return `${what} ${l7.timed_out ? "timed out" : ms(l7.latency_ns)}`;
  }
  if (f.verdict === "DROPPED") return `drop ${f.kernel_drop_reason ?? ""}`;
  const t = f.tcp_stats || {};
  const ev = (f.socket_event || "").toLowerCase();
  if (ev === "connect") return `connect ${ms(t.connect_latency_ns)}`;
  if (ev === "connect_failed") return `connect failed ${t.error ?? ""}`;
  if (ev === "close") return `close after ${ms(t.duration_ns)}, ${t.bytes_sent ?? 0}B sent, ${t.bytes_received ?? 0}B received`;
  return ev;
}

function timeOf(f) {
  const d = new Date(f.time);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function flowRowHtml(f) {
  const type = f.Type === "L7" ? "L7" : f.socket_event ? f.socket_event.toLowerCase() : f.Type;
  return `<td class="mono">${timeOf(f)}</td><td>${esc(side(f, "source"))}</td><td>${esc(side(f, "destination"))}</td>` +
    `<td>${esc(type ?? "")}</td><td class="verdict-${esc(f.verdict ?? "")}">${esc(f.verdict ?? "")}</td><td>${esc(summary(f))}</td>`;
}

function filterParams() {
  const p = new URLSearchParams();
  for (const tok of $("#filter").value.trim().split(/\s+/).filter(Boolean)) {
    // `to-port:9090`, also as `--to-port=9090`; the value keeps its own `:` and `=`.
    const m = /^(!?)(?:--)?([a-z][a-z0-9-]*)[:=](.*)$/i.exec(tok);
    p.append("f", m ? `${m[1]}${m[2]}:${m[3]}` : tok.replace(/^(!?)--/, "$1"));
  }
  if ($("#verdict").value) p.append("f", "verdict:" + $("#verdict").value);
  return p;
}

function flowRow(resp, fresh) {
  const tr = document.createElement("tr");
  tr.tabIndex = 0;
  tr.innerHTML = flowRowHtml(resp.flow);
  if (fresh) tr.classList.add("fresh");
  tr._resp = resp;
  return tr;
}

async function loadFlows() {
  const p = filterParams();
  p.set("number", "200");
  $("#flow-error").hidden = true;
  try {
    const v = await api("/api/flows?" + p);
    state.flows = v.flows.reverse();
    $("#flows tbody").replaceChildren(...state.flows.map((r) => flowRow(r, false)));
  } catch (e) {
    $("#flow-error").textContent = e.message;
    $("#flow-error").hidden = false;
    $("#flows tbody").replaceChildren();
  }
  if ($("#follow").checked) startFollow();
}

function startFollow() {
  stopFollow();
  const es = new EventSource("/api/flows/follow?" + filterParams());
  es.addEventListener("flow", (ev) => {
    const resp = JSON.parse(ev.data);
    const tbody = $("#flows tbody");
    tbody.prepend(flowRow(resp, true));
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  });
  es.onerror = () => setStatus("follow: connection lost, retrying");
  state.follow = es;
}

function stopFollow() {
  if (state.follow) state.follow.close();
  state.follow = null;
}

async function showFlow(resp) {
  const f = resp.flow;
  const aside = $("#flow-detail");
  const trace = f.trace_context?.parent?.trace_id;
  aside.innerHTML = `<h2 id="flow-detail-title">Flow</h2>
    <p>${esc(side(f, "source"))} → ${esc(side(f, "destination"))}<br>${esc(summary(f))}</p>
    ${trace ? `<h3>Trace ${esc(trace)}</h3><div class="waterfall" aria-live="polite">Loading…</div>` : ""}
    <h3>JSON</h3><pre class="flow-json">${esc(JSON.stringify(resp, null, 2))}</pre>`;
  aside.focus();
  if (trace) {
    try {
      const v = await api(`/api/flows?number=1000&f=trace-id:${encodeURIComponent(trace)}`);
      aside.querySelector(".waterfall").innerHTML = waterfall(v.flows.map((r) => r.flow));
    } catch (e) {
      aside.querySelector(".waterfall").textContent = e.message;
    }
  }
}

/** ns since the epoch of an RFC 3339 time with up to nanoseconds (Date keeps milliseconds). */
function nsOf(time) {
  const m = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(.*)$/.exec(String(time));
  if (!m) return 0;
  const frac = (m[2] || "").padEnd(9, "0").slice(0, 9);
  return Date.parse(m[1] + m[3]) * 1e6 + Number(frac);
}

/** Flows sharing a trace id, ordered by start, each a bar over the span they cover. */
function waterfall(flows) {
  const spans = flows.map((f) => {
    const end = nsOf(f.time);
    const dur = f.l7?.latency_ns ?? 0;
    return { f, start: end - dur, end };
  }).sort((a, b) => a.start - b.start);
  if (spans.length === 0) return "<p>No flows carry this trace id (yet).</p>";
  const t0 = spans[0].start, t1 = Math.max(...spans.map((s) => s.end));
  const total = Math.max(1, t1 - t0);
  const rows = spans.map((s) => {
    const left = ((s.start - t0) / total) * 100, width = Math.max(0.5, ((s.end - s.start) / total) * 100);
    const server = s.f.traffic_direction === "INGRESS";
    const label = `${server ? "server" : "client"} side → ${side(s.f, "destination")}`;
    return `<div class="row"><span class="label" title="${esc(side(s.f, "source"))} → ${esc(side(s.f, "destination"))}: ${esc(summary(s.f))}">${esc(label)}</span>
      <span class="lane"><span class="bar${server ? " server" : ""}" style="left:${left}%;width:${width}%" title="${esc(summary(s.f))}"></span></span></div>`;
  }).join("");
  return `<p class="hint">Spans are not stitched into a trace yet: these are the ${spans.length} flows sharing the trace id, in time order (bar: the exchange's latency; <span class="key client"></span>client side <span class="key server"></span>server side).</p>${rows}`;
}

// ---------------------------------------------------------------------------------------------
// Tabs, keyboard, start
// ---------------------------------------------------------------------------------------------

function showTab(name) {
  for (const t of ["map", "flows"]) {
    const on = t === name;
    $("#tab-" + t).setAttribute("aria-selected", String(on));
    $("#tab-" + t).tabIndex = on ? 0 : -1;
    $("#view-" + t).hidden = !on;
  }
  if (name === "map" && cy) { cy.resize(); fitMap(); }
  if (name === "flows" && !state.flowsLoaded) { state.flowsLoaded = true; loadFlows(); }
}

function activateRow(tbody, handler) {
  tbody.addEventListener("click", (ev) => { const tr = ev.target.closest("tr"); if (tr) handler(tr); });
  tbody.addEventListener("keydown", (ev) => {
    const tr = ev.target.closest("tr");
    if (!tr) return;
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); handler(tr); }
    if (ev.key === "ArrowDown") { ev.preventDefault(); tr.nextElementSibling?.focus(); }
    if (ev.key === "ArrowUp") { ev.preventDefault(); tr.previousElementSibling?.focus(); }
  });
}

function start() {
  applyTheme(localStorage.getItem("hopwatch-theme"));
  $("#theme").addEventListener("click", () => {
    const next = isDark() ? "light" : "dark";
    localStorage.setItem("hopwatch-theme", next);
    applyTheme(next);
  });
  $("#tab-map").addEventListener("click", () => showTab("map"));
  $("#tab-flows").addEventListener("click", () => showTab("flows"));
  document.querySelector('[role="tablist"]').addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
      const next = $("#tab-map").getAttribute("aria-selected") === "true" ? "flows" : "map";
      showTab(next);
      $("#tab-" + next).focus();
    }
  });
  for (const id of ["#since", "#group", "#slow"]) $(id).addEventListener("change", () => { state.layoutKey = ""; refreshHops(); });
  activateRow($("#hop-list tbody"), (tr) => { selectHop(tr.dataset.hop); $("#detail").focus(); });
  activateRow($("#flows tbody"), (tr) => {
    for (const r of $("#flows tbody").querySelectorAll('tr[aria-selected="true"]')) r.removeAttribute("aria-selected");
    tr.setAttribute("aria-selected", "true");
    showFlow(tr._resp);
  });
  $("#flow-filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadFlows(); });
  $("#verdict").addEventListener("change", loadFlows);
  $("#follow").addEventListener("change", () => ($("#follow").checked ? startFollow() : stopFollow()));
  refreshHops();
  setInterval(() => { if (!document.hidden && !$("#view-map").hidden) refreshHops(); }, REFRESH_MS);
}

// For the browser test and for poking around in the console.
window.hopwatchUi = { state, get cy() { return cy; }, refreshHops, loadFlows };
start();
