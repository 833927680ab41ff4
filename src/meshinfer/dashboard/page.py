"""The dashboard's one web page: self-contained HTML with inline CSS and JavaScript (no CDN, no build step).

Contract: ``PAGE_HTML`` is served as is at the dashboard's root. The page polls ``api/swarm`` (relative, so it also
works under a prefix) every ``refresh_interval`` s of the payload (2 s before the first answer) and updates in place
without reloading: per model a block-coverage map (one cell per block, colour = the block's total online throughput
relative to the model's best block, hue = how many servers hold it, holes striped red), a table of servers (peer id,
public name, model, span, state, throughput, cache left, sessions, version, reports (claims), audits passed/failed
summed over clients' tallies (claims; inside ``meshinfer api`` also the gateway's own audits), round trip from the
dashboard's node) and swarm totals; a model whose document did not change keeps its DOM. States are explicit:
``body[data-state]`` is ``loading``, ``ok``, ``empty`` ("no models are being served"), ``error`` ("cannot reach the
swarm: ...", from the payload's ``error``) or ``offline`` (the dashboard itself does not answer). For tests: cells
carry ``data-block``/``data-servers``/ ``data-throughput``/``data-model-id``, rows
``data-peer-id``/``data-model-id``/``data-state``, and ``window.meshinfer`` counts renders and the last render's
milliseconds. All text is HTML-escaped.
"""

from __future__ import annotations

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshinfer swarm</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f7f8fa; --card: #fff; --bad: #c62828; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); }
  header { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; padding: 14px 24px;
           background: #151a26; color: #fff; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header .viewer { color: #aab2c5; font-size: 12px; margin-left: auto; }
  .pill { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #39415a; }
  body[data-state="ok"] .pill, body[data-state="empty"] .pill { background: #1f7a3f; }
  body[data-state="error"] .pill, body[data-state="offline"] .pill { background: var(--bad); }
  .pill.stale { background: #a86b00 !important; }
  main { max-width: 1280px; margin: 0 auto; padding: 16px 24px 40px; }
  .banner { padding: 10px 14px; border-radius: 6px; margin: 0 0 14px; }
  .banner.error { background: #fdecea; color: #8a1c1c; border: 1px solid #f5c2c0; }
  .banner.warn { background: #fff6e0; color: #7a5200; border: 1px solid #f1dca5; }
  .empty { padding: 40px; text-align: center; color: var(--muted); font-size: 16px; background: var(--card);
           border: 1px dashed #cfd4dc; border-radius: 8px; margin-bottom: 16px; }
  .totals { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px;
            margin-bottom: 16px; }
  .total { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
  .total b { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
  .total span { color: var(--muted); font-size: 12px; }
  .model { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
           margin-bottom: 14px; }
  .model h2 { font-size: 16px; margin: 0 0 2px; }
  .model .meta { color: var(--muted); font-size: 12px; margin-bottom: 8px; }
  .model .meta .bad { color: var(--bad); font-weight: 600; }
  #servers .bad { color: var(--bad); font-weight: 600; }
  .coverage { display: flex; flex-wrap: wrap; gap: 2px; }
  .cell { width: 26px; height: 26px; border-radius: 3px; font-size: 11px; display: flex; align-items: center;
          justify-content: center; font-variant-numeric: tabular-nums; color: #1d2330; }
  .cell.dark { color: #fff; }
  .cell.hole { background: repeating-linear-gradient(45deg, #fde2e2 0 4px, #f2a7a7 4px 8px);
               outline: 1px solid var(--bad); color: var(--bad); font-weight: 700; }
  .cell.idle { background: #d5d9e0; }
  .legend { display: flex; gap: 14px; flex-wrap: wrap; color: var(--muted); font-size: 12px; margin: 0 0 10px; }
  .legend i { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -2px;
              margin-right: 4px; outline: none; }
  table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line);
          border-radius: 8px; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; background: #fafbfc; }
  td.num, th.num { text-align: right; }
  td.mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
  tr[data-state="joining"] td.state { color: #a86b00; }
  tr[data-state="draining"] td.state { color: var(--bad); }
  tr[data-state="online"] td.state { color: #1f7a3f; }
  h2.section { font-size: 15px; margin: 20px 0 8px; }
  h2 .hint { font-weight: normal; font-size: 12px; color: #6b7280; }
  .scroll { overflow-x: auto; }
</style>
</head>
<body data-state="loading">
<header>
  <h1>meshinfer swarm</h1>
  <span id="status" class="pill">reading the swarm…</span>
  <span id="viewer" class="viewer"></span>
</header>
<main>
  <div id="error" class="banner error" hidden></div>
  <div id="warning" class="banner warn" hidden></div>
  <section id="totals" class="totals" aria-label="swarm totals"></section>
  <div id="empty" class="empty" hidden>no models are being served in this swarm yet</div>
  <div id="legend" class="legend" hidden>
    <span>each cell is a block; its number: servers holding it</span>
    <span><i class="cell hole"></i>no server (hole)</span>
    <span><i style="background:hsl(45 65% 62%)"></i>1 server</span>
    <span><i style="background:hsl(95 65% 62%)"></i>2 servers</span>
    <span><i style="background:hsl(140 65% 62%)"></i>3 or more</span>
    <span><i style="background:#d5d9e0"></i>none online</span>
    <span>darker: more tokens/s online than the model's other blocks</span>
  </div>
  <div id="models"></div>
  <section id="servers-section" hidden>
    <h2 class="section">servers</h2>
    <div class="scroll">
    <table id="servers">
      <thead><tr><th>peer id</th><th>name</th><th>model</th><th>span</th><th>state</th><th>weights</th>
        <th title="how others reach the server: public, hole-punched, or relayed (only through a relay)">reach</th>
        <th class="num">tokens/s</th><th class="num">cache left</th><th class="num">sessions</th>
        <th>version</th>
        <th class="num" title="peers that published a report naming this server (claims, unverified)">reports</th>
        <th class="num" title="audit windows passed / failed as reported by the clients' tallies (unverified claims);
          inside meshinfer api also this gateway's own audits">audits ✓/✗</th>
        <th class="num">round trip</th></tr></thead>
      <tbody></tbody>
    </table>
    </div>
  </section>
  <section id="credits-section" hidden>
    <h2 class="section">credits <span class="hint" id="credits-hint"></span></h2>
    <div class="scroll">
    <table id="credits">
      <thead><tr><th>peer id</th><th>name</th>
        <th class="num" title="block-tokens (one token through one block) this peer's receipts show it
          served">served</th>
        <th class="num" title="block-tokens this peer used, from the receipts it signed">used</th>
        <th class="num">credit</th><th class="num">sessions served / used</th>
        <th class="num" title="block-tokens served per hour, measured over the receipts of the last hour
          (no projection)">served / h (measured)</th></tr></thead>
      <tbody></tbody>
    </table>
    </div>
  </section>
</main>
<script>
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
  const esc = (v) => String(v === null || v === undefined ? "" : v).replace(/[&<>"']/g, (c) => ESC[c]);
  const num = (x, d) => (x === null || x === undefined || !isFinite(x)) ? "—" : Number(x).toFixed(d);
  const int = (x) => (x === null || x === undefined) ? "—" : Number(x).toLocaleString("en-US");
  const short = (id) => id.length > 16 ? id.slice(0, 6) + "…" + id.slice(-6) : id;
  const state = window.meshinfer = {renders: 0, lastRenderMs: null, polls: 0, payload: null};
  const modelEls = new Map();
  let rowsKey = null, totalsKey = null, interval = 2.0;

  function ranges(blocks) {
    const out = [];
    for (let i = 0; i < blocks.length; i++) {
      let j = i;
      while (j + 1 < blocks.length && blocks[j + 1] === blocks[j] + 1) j++;
      out.push(i === j ? String(blocks[i]) : blocks[i] + "–" + blocks[j]);
      i = j;
    }
    return out.join(", ");
  }

  function cell(m, i, best) {
    const n = m.block_servers[i] || 0, t = (m.block_throughput || [])[i] || 0;
    const attrs = ' data-block="' + i + '" data-servers="' + n + '" data-throughput="' + t +
      '" data-model-id="' + esc(m.model_id) + '" title="block ' + i + ": " + n + " server" + (n === 1 ? "" : "s") +
      ", " + num(t, 1) + ' tokens/s online"';
    if (n === 0) return '<div class="cell hole"' + attrs + '>0</div>';
    if (t <= 0) return '<div class="cell idle"' + attrs + ">" + n + "</div>";
    const hue = n === 1 ? 45 : n === 2 ? 95 : 140;
    const light = Math.round(84 - 44 * Math.min(1, t / (best || t)));
    return '<div class="cell' + (light < 58 ? " dark" : "") + '" style="background:hsl(' + hue + ' 65% ' + light +
      '%)"' + attrs + ">" + n + "</div>";
  }

  function modelHtml(m) {
    const best = Math.max(0, ...(m.block_throughput || [0]));
    const cells = [];
    for (let i = 0; i < m.num_blocks; i++) cells.push(cell(m, i, best));
    const missing = m.missing_blocks.length
      ? '<span class="bad">missing blocks ' + esc(ranges(m.missing_blocks)) + "</span>" : "every block served";
    return "<h2>" + esc(m.name) + "</h2>" +
      '<div class="meta"><span class="mono" title="' + esc(m.model_id) + '">' + esc(m.model_id.slice(0, 16)) +
      "</span> · " + esc(m.family) + " · " + m.num_blocks + " blocks · " + esc(m.dtype) + " · " +
      m.servers.length + " server" + (m.servers.length === 1 ? "" : "s") + " · weakest block " +
      num(m.bottleneck_throughput, 1) + " tokens/s · " + missing + (m.complete ? "" : " · (DHT read incomplete)") +
      '</div><div class="coverage" data-model-id="' + esc(m.model_id) + '">' + cells.join("") + "</div>";
  }

  function renderModels(models) {
    const box = $("models"), seen = new Set();
    models.forEach((m, index) => {
      seen.add(m.model_id);
      const key = JSON.stringify([m.name, m.num_blocks, m.block_servers, m.block_throughput, m.missing_blocks,
                                  m.complete, m.servers.length, m.bottleneck_throughput]);
      let entry = modelEls.get(m.model_id);
      if (!entry) {
        const el = document.createElement("section");
        el.className = "model";
        el.dataset.modelId = m.model_id;
        entry = {el: el, key: null};
        modelEls.set(m.model_id, entry);
      }
      if (entry.key !== key) { entry.el.innerHTML = modelHtml(m); entry.key = key; }
      if (box.children[index] !== entry.el) box.insertBefore(entry.el, box.children[index] || null);
    });
    for (const [id, entry] of modelEls) {
      if (!seen.has(id)) { entry.el.remove(); modelEls.delete(id); }
    }
  }

  function auditsCell(s) {
    let out = "";
    const a = s.audits;
    if (a) {
      out += '<span class="audits" title="as reported by ' + int(a.clients) + " client" + (a.clients === 1 ? "" : "s") +
        '; unverified claims">' + int(a.passed) + " / " + (a.failed ? '<span class="bad">' + int(a.failed) +
        "</span>" : "0") + "</span>";
    }
    const g = s.gateway_audits;
    if (g) {
      out += (out ? "<br>" : "") + '<span class="own-audits" title="this gateway&#39;s audits">' + int(g.passed) +
        " / " + (g.failed ? '<span class="bad">' + int(g.failed) + "</span>" : "0") + " (this gateway)</span>";
    }
    return out;
  }

  function renderRows(models) {
    const rows = [];
    for (const m of models) {
      for (const s of m.servers) {
        rows.push('<tr data-peer-id="' + esc(s.peer_id) + '" data-model-id="' + esc(m.model_id) +
          '" data-state="' + esc(s.state) + '"><td class="mono" title="' + esc(s.peer_id) + '">' +
          esc(short(s.peer_id)) + "</td><td>" + esc(s.public_name || "") + "</td><td>" + esc(m.name) +
          '</td><td class="mono">' + esc(s.span) + '</td><td class="state">' + esc(s.state) +
          '</td><td class="quant">' + esc(s.quant || "none") +
          (s.weight_bytes ? " · " + num(s.weight_bytes / 1e6, 1) + " MB" : "") + " · " + esc(s.device || "cpu") +
          '</td><td class="reach">' + esc(s.reachability || "public") + '</td><td class="num">' +
          num(s.throughput, 1) + '</td><td class="num">' + int(s.cache_tokens_left) + '</td><td class="num">' +
          int(s.sessions) + "</td><td>" + esc(s.software_version) + '</td><td class="num">' +
          ((s.reports || []).length ? '<span class="bad" title="' + esc(s.reports.join(", ")) + '">' +
           int(s.reports.length) + "</span>" : "") + '</td><td class="num">' +
          auditsCell(s) + '</td><td class="num">' +
          (s.rtt_ms === null || s.rtt_ms === undefined ? "—" : num(s.rtt_ms, 2) + " ms") + "</td></tr>");
      }
    }
    const key = rows.join("");
    if (key !== rowsKey) { document.querySelector("#servers tbody").innerHTML = key; rowsKey = key; }
    $("servers-section").hidden = rows.length === 0;
  }

  function renderTotals(t) {
    const items = [["models", t.models], ["servers", t.servers], ["online", t.online], ["peers", t.peers],
                   ["tokens/s online", num(t.throughput, 1)], ["sessions", t.sessions],
                   ["missing blocks", t.missing_blocks]];
    const html = items.map(([k, v]) => '<div class="total" data-total="' + esc(k) + '"><b>' + esc(v) +
                                       "</b><span>" + esc(k) + "</span></div>").join("");
    if (html !== totalsKey) { $("totals").innerHTML = html; totalsKey = html; }
  }

  function renderCredits(c) {
    const section = $("credits-section");
    const peers = (c && c.peers) || [];
    section.hidden = peers.length === 0;
    if (!c) return;
    const asked = Object.values(c.asked || {});
    const answered = asked.filter((v) => typeof v === "number").length;
    $("credits-hint").textContent = "from " + int(c.receipts) + " verified receipts of " + answered + " of " +
      asked.length + " servers; unit: block-tokens";
    $("credits").tBodies[0].innerHTML = peers.map((q) =>
      "<tr><td><code>" + esc(short(q.peer_id)) + "</code></td><td>" + esc(q.name || "") + '</td><td class="num">' +
      int(q.served) + '</td><td class="num">' + int(q.used) + '</td><td class="num">' + int(q.credit) +
      '</td><td class="num">' + int(q.sessions_served) + " / " + int(q.sessions_used) + '</td><td class="num">' +
      int(q.served_per_hour_measured) + "</td></tr>").join("");
  }

  function age(p) {
    if (p.updated_at === null || p.updated_at === undefined) return null;
    return Math.max(0, (p.served_at || p.updated_at) - p.updated_at);
  }

  function render(p) {
    const t0 = performance.now();
    state.payload = p;
    interval = p.refresh_interval || interval;
    const models = p.models || [];
    const loaded = p.updated_at !== null && p.updated_at !== undefined;
    const err = $("error");
    err.hidden = !p.error;
    if (p.error) err.textContent = "cannot reach the swarm: " + p.error;
    const warn = $("warning");
    warn.hidden = !(loaded && !p.error && !p.complete);
    warn.textContent = "some DHT reads timed out: the view may be incomplete";
    renderTotals(p.totals || {});
    renderModels(models);
    renderRows(models);
    renderCredits(p.credits);
    $("empty").hidden = !(loaded && models.length === 0 && !p.error);
    $("legend").hidden = models.length === 0;
    const st = p.error ? "error" : !loaded ? "loading" : models.length ? "ok" : "empty";
    document.body.dataset.state = st;
    const a = age(p), status = $("status");
    const stale = a !== null && a > 3 * interval + 2;
    status.classList.toggle("stale", stale && !p.error);
    status.textContent = st === "error" ? "swarm unreachable" : st === "loading" ? "reading the swarm…" :
      (stale ? "stale" : "live") + " · updated " + Math.round(a) + " s ago";
    $("viewer").textContent = p.viewer_peer_id ? "viewing from " + short(p.viewer_peer_id) : "";
    state.renders += 1;
    state.lastRenderMs = performance.now() - t0;
  }

  function offline(e) {
    document.body.dataset.state = "offline";
    const err = $("error");
    err.hidden = false;
    err.textContent = "cannot reach the dashboard server: " + (e && e.message ? e.message : e);
    $("status").textContent = "dashboard offline";
  }

  async function poll() {
    state.polls += 1;
    try {
      const r = await fetch("api/swarm", {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
    } catch (e) {
      offline(e);
    } finally {
      setTimeout(poll, Math.max(500, Math.min(interval, 2.0) * 1000));
    }
  }
  poll();
})();
</script>
</body>
</html>
"""
