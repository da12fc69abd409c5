// The dashboard: polls the daemon's own JSON endpoints (/status, /stats,
// /requests/recent) and draws them. No framework, no build step; every value
// from the daemon is put in the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 600;
const BUCKET_S = 30;
const SHOWN_REQUESTS = 50;

const state = { last: 0, requests: [], key: sessionStorage.getItem("contextpilotd-key") || "" };

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function get(path) {
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("the API key is needed");
  }
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response.json();
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

const ms = (v) => (v === null || v === undefined ? "–" : (v >= 10000 ? (v / 1000).toFixed(1) + " s" : Math.round(v) + " ms"));

function duration(s) {
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function renderStatus(status) {
  const badge = $("state");
  badge.textContent = status.state;
  badge.className = "badge " + status.state;
  $("headline").textContent = `${status.model.path.split("/").pop()} · up ${duration(status.uptime_s)} · v${status.version} on ${status.listen}`;
  const p = status.plan;
  $("plan").textContent = `plan: ${p.slots} slot${p.slots === 1 ? "" : "s"} × ${p.ctx_per_slot} tokens, ${p.concurrency} at once, ${p.threads} threads, -ngl ${p.gpu_layers}` +
    (status.cost ? ` · prefill ${status.cost.profile.prefill_ms_per_token.toFixed(3)} ms/token (${status.cost.profile.source})` : "");
  state.msPerToken = status.cost ? status.cost.profile.prefill_ms_per_token : null;
  $("c-saved-sub").textContent = status.cost && status.cost.profile.source !== "default"
    ? "at the measured (or configured) prefill speed" : "at rough figures: not measured yet";

  const models = $("models").tBodies[0];
  models.replaceChildren(...(status.models || []).map((m) => {
    const tr = el("tr");
    tr.dataset.model = m.name;
    const until = m.in_use > 0 ? `in use by ${m.in_use}` : (m.unloads_in_s === null ? "stays loaded" : `unloads in ${Math.round(m.unloads_in_s)} s`);
    for (const v of [m.name, m.state, bytes(m.size_bytes), `${m.slots} × ${m.ctx_per_slot}`, m.busy, m.queued, until]) tr.append(el("td", v));
    return tr;
  }));

  $("slots-model").textContent = status.models && status.models.length > 1 ? `(${status.models[0].name})` : "";
  $("slots").replaceChildren(...(status.slots || []).map((s) => {
    const box = el("div", null, "slot" + (s.busy ? " busy" : ""));
    box.dataset.slot = s.id;
    box.append(el("div", `slot ${s.id} · ${s.busy ? "busy" : "idle"}`, "id"));
    const holds = s.tokens === 0 ? "empty" : `${s.tokens} tokens` + (s.documents ? `, ${s.documents} document${s.documents === 1 ? "" : "s"}` : "");
    box.append(el("div", holds, "what"));
    box.append(el("div", `${s.hits} hit${s.hits === 1 ? "" : "s"} · worth ${ms(s.value_ms)}`, "what"));
    return box;
  }));

  const tail = (status.child && status.child.stderr_tail) || [];
  $("log").textContent = tail.slice(-40).join("\n");
  $("c-gpu-sub").textContent = status.gpu_sampling || "";
}

function renderStats(stats) {
  $("c-requests").textContent = stats.total_queries;
  $("c-errors").textContent = `${stats.errors} errors, ${stats.retried} retried`;
  const reuse = stats.cache_reuse;
  $("c-reuse").textContent = reuse.token_weighted_reuse_pct.toFixed(1) + " %";
  $("c-reuse-sub").textContent = `${reuse.reused_tokens_total} of ${reuse.prompt_tokens_total} tokens`;
  $("c-ttft").textContent = stats.ttft_ms ? ms(stats.ttft_ms.p50) : "–";
  $("c-latency").textContent = stats.latency_ms ? `latency p50 ${ms(stats.latency_ms.p50)}, p95 ${ms(stats.latency_ms.p95)}` : "";
  if (state.msPerToken) $("c-saved").textContent = ms(reuse.reused_tokens_total * state.msPerToken);
}

function decisionOf(r) {
  if (r.reorder) return r.reorder.reordered ? `reordered ${r.reorder.documents} docs` : `kept ${r.reorder.documents} docs`;
  if (r.slot_decision) return `slot: ${r.slot_decision.choice}, predicted ${ms(r.slot_decision.predicted_ms)}`;
  return "";
}

function renderRequests(fresh) {
  const body = $("requests").tBodies[0];
  for (const r of fresh) {
    const tr = el("tr", null, "new");
    tr.dataset.queryId = r.query_id;
    const time = new Date(r.timestamp).toLocaleTimeString();
    const cached = r.cache_reuse ? `${r.cache_reuse.reused_tokens} / ${r.cache_reuse.total_prompt_tokens}` : (r.prompt_tokens ?? "–");
    const cells = [time, r.query_id, r.model, r.path, r.status_code, ms(r.ttft_ms), cached, r.slot_id ?? "–", decisionOf(r)];
    cells.forEach((v, i) => tr.append(el("td", v, i === 4 ? (r.status_code >= 400 ? "bad" : "ok") : undefined)));
    body.prepend(tr);
  }
  while (body.rows.length > SHOWN_REQUESTS) body.deleteRow(-1);
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const now = Date.now() / 1000;
  const buckets = Array.from({ length: WINDOW_S / BUCKET_S }, () => ({ prompt: 0, cached: 0 }));
  for (const r of state.requests) {
    const age = now - Date.parse(r.timestamp) / 1000;
    if (age < 0 || age >= WINDOW_S || !r.cache_reuse) continue;
    const b = buckets[buckets.length - 1 - Math.floor(age / BUCKET_S)];
    b.prompt += r.cache_reuse.total_prompt_tokens;
    b.cached += r.cache_reuse.reused_tokens;
  }
  const pad = 24, w = (width - pad * 2) / buckets.length;
  const savedMs = buckets.map((b) => (state.msPerToken ? b.cached * state.msPerToken : 0));
  const maxSaved = Math.max(1, ...savedMs);
  g.strokeStyle = style.getPropertyValue("--line");
  g.beginPath(); g.moveTo(pad, height - pad); g.lineTo(width - pad, height - pad); g.stroke();
  buckets.forEach((b, i) => {
    const share = b.prompt ? b.cached / b.prompt : 0;
    const h = share * (height - pad * 2);
    g.fillStyle = style.getPropertyValue("--reuse");
    g.fillRect(pad + i * w + 2, height - pad - h, w / 2 - 3, h);
    const hs = (savedMs[i] / maxSaved) * (height - pad * 2);
    g.fillStyle = style.getPropertyValue("--saved");
    g.fillRect(pad + i * w + w / 2, height - pad - hs, w / 2 - 3, hs);
  });
  g.fillStyle = style.getPropertyValue("--dim");
  g.font = "11px sans-serif";
  g.fillText("100 %", 0, pad - 6);
  if (maxSaved > 1) g.fillText(`${ms(maxSaved)} saved`, width - pad - 90, pad - 6);
  g.fillText("−10 min", pad, height - 6);
  g.fillText("now", width - pad - 20, height - 6);
}

async function tick() {
  try {
    const [status, stats, recent] = await Promise.all([
      get("/status"), get("/stats"), get(`/requests/recent?after=${state.last}`),
    ]);
    renderStatus(status);
    renderStats(stats);
    if (recent.requests.length) {
      state.requests = state.requests.concat(recent.requests).slice(-500);
      renderRequests(recent.requests);
    }
    state.last = recent.last;
    drawChart();
    $("footer").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    const badge = $("state");
    badge.textContent = "unreachable";
    badge.className = "badge down";
    $("footer").textContent = String(e.message || e);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key").value;
  sessionStorage.setItem("contextpilotd-key", state.key);
  $("key-form").hidden = true;
  tick();
});

tick();
setInterval(tick, POLL_MS);
