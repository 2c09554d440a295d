// The dashboard: reads the JSON API (docs/api.md) every few seconds and draws it. No framework, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
const when = (seconds) => (seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "–");
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function rows(tbody, items, cells, empty) {
  tbody.innerHTML = items.length ? items.map((item) => `<tr>${cells(item)}</tr>`).join("")
    : `<tr><td class="muted" colspan="9">${empty}</td></tr>`;
}

function polyline(values, max, width, height, cls) {
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 4 - (v / max) * (height - 12)).toFixed(1)}`);
  return `<polyline class="${cls}" points="${points.join(" ")}"></polyline>`;
}

function drawIngest(ingest) {
  const accepted = ingest.buckets.map((b) => b.accepted / ingest.bucket_s);
  const rejected = ingest.buckets.map((b) => b.rejected / ingest.bucket_s);
  const max = Math.max(1, ...accepted, ...rejected);
  $("ingest").innerHTML = polyline(accepted, max, 800, 160, "accepted") + polyline(rejected, max, 800, 160, "rejected")
    + `<text x="6" y="14" font-size="11" fill="#6b7280">${max.toFixed(1)} /s</text>`;
  $("ingest").dataset.accepted = accepted.reduce((a, b) => a + b, 0) * ingest.bucket_s;
}

async function refreshOverview() {
  const o = await api("/api/overview");
  const rejected = Object.values(o.totals.rejected).reduce((a, b) => a + b, 0);
  const findings = Object.values(o.totals.findings_open).reduce((a, b) => a + b, 0);
  $("t-events").textContent = fmt(o.totals.events);
  $("t-rejected").textContent = fmt(rejected);
  $("t-findings").textContent = fmt(findings);
  $("t-devices").textContent = `${fmt(o.devices_online)} / ${fmt(o.devices)}`;
  $("t-batteries").textContent = fmt(o.batteries);
  drawIngest(o.ingest);
  rows($("reasons").tBodies[0], Object.entries(o.totals.rejected),
    ([reason, n]) => `<td>${esc(reason)}</td><td class="num">${fmt(n)}</td>`, "nothing rejected");
  rows($("kinds").tBodies[0], Object.entries(o.totals.findings_open),
    ([kind, n]) => `<td>${esc(kind)}</td><td class="num">${fmt(n)}</td>`, "no open finding");
  $("updated").textContent = `updated ${when(o.time)} UTC`;
}

async function refreshDevices() {
  const devices = await api("/api/devices");
  rows($("devices").tBodies[0], devices, (d) => `<td>${esc(d.device)}</td><td>${esc(d.role)}</td>`
    + `<td class="${esc(d.state)}">${esc(d.state)}${d.alarm ? ` <span class="bad">${esc(d.alarm)}</span>` : ""}</td>`
    + `<td>${when(d.last_event_at)}</td><td class="num">${fmt(d.backlog)}</td>`
    + `<td class="num">${d.lag_s === null ? "–" : d.lag_s.toFixed(1) + " s"}</td>`
    + `<td class="${esc(d.chain)}">${esc(d.chain)}</td><td class="num">${fmt(d.stored)}</td>`
    + `<td class="num">${fmt(d.quarantined)}</td>`, "no device enrolled");
}

async function refreshFindings() {
  const kind = $("findings-kind").value;
  const query = new URLSearchParams({ open: $("findings-open").checked ? "1" : "0", ...(kind ? { kind } : {}) });
  const found = await api(`/api/findings?${query}`);
  rows($("findings").tBodies[0], found, (f) => `<td>${esc(f.kind)}</td><td>${esc(f.subject)}</td>`
    + `<td>${esc(f.detail)}</td><td>${when(f.raised_at)}</td>`
    + `<td class="${f.resolved_at ? "ok" : "bad"}">${f.resolved_at ? "resolved" : "open"}</td>`, "no finding");
}

async function refreshRejects() {
  const reason = $("rejects-reason").value;
  const found = await api(`/api/rejects?${new URLSearchParams(reason ? { reason } : {})}`);
  rows($("rejects").tBodies[0], found, (r) => `<td>${when(r.received_at)}</td><td>${esc(r.reason)}</td>`
    + `<td>${esc(r.topic)}</td><td class="num">${fmt(r.size)}</td><td>${esc(r.detail)}</td>`, "nothing rejected");
}

function eventLine(e, code) {
  const f = e.fields;
  const what = {
    installed: () => `into ${f.vin}`,
    swapped: () => (f.code_out === code ? `out of ${f.vin} (slot ${f.slot_out})` : `into ${f.vin} (from slot ${f.slot_in})`),
    replaced: () => (f.code_out === code ? `out of ${f.vin}` : `into ${f.vin}`),
    vehicle_scrapped: () => `with ${f.vin}`,
    handed_over: () => `${f.from_entity} → ${f.to_entity} (${f.to_role})`,
    repurposed: () => `${f.code} → ${f.new_code}: ${f.application}`,
    recycled: () => `${f.mass_kg} kg`,
    maintenance: () => `${f.action}${f.findings ? ": " + f.findings : ""}`,
    produced: () => `${f.chemistry}, ${f.rated_capacity_ah} Ah`,
  }[e.type];
  return `<li><b>${esc(e.type)}</b> ${esc(what ? what() : "")} <span class="muted">${when(e.time_ms / 1000)} · ${esc(e.device)} #${e.seq}</span></li>`;
}

function healthChart(points, count) {
  const socs = points.filter((p) => p.soc_pct !== undefined).map((p) => p.soc_pct);
  if (socs.length < 2) return "";
  return `<svg id="health-chart" viewBox="0 0 400 120" preserveAspectRatio="none" role="img" aria-label="state of charge">`
    + polyline(socs, 100, 400, 120, "accepted") + `<text x="4" y="12" font-size="10" fill="#6b7280">SOC %, ${socs.length} of ${fmt(count)} readings</text></svg>`;
}

async function showBattery(code) {
  const target = $("battery");
  try {
    const t = await api(`/api/batteries/${encodeURIComponent(code)}?lifecycle=1`);
    const life = t.events;
    const where = t.vin ? `in ${t.vin}` : t.place ? `at ${t.place}` : "";
    target.innerHTML = `<p><b id="battery-state">${esc(t.state.replaceAll("_", " "))}</b> ${esc(where)}</p>`
      + `<ol class="timeline" id="battery-timeline">${life.map((e) => eventLine(e, t.code)).join("")}</ol>`
      + healthChart(t.health, t.health_count)
      + (t.findings.length ? `<p>findings: ${t.findings.map((f) => `<span class="${f.resolved_at ? "ok" : "bad"}">${esc(f.kind)}</span>`).join(", ")}</p>` : "");
  } catch (error) {
    target.innerHTML = `<p class="error">${esc(error.message)}</p>`;
  }
}

async function showVehicle(vin) {
  const target = $("vehicle");
  try {
    const v = await api(`/api/vehicles/${encodeURIComponent(vin)}`);
    target.innerHTML = `<p><b>${esc(v.state)}</b>; batteries: ${v.batteries.map(esc).join(", ") || "none"}</p>`
      + `<ol class="timeline">${v.events.filter((e) => e.type !== "health").map((e) => eventLine(e, null)).join("")}</ol>`
      + (v.findings.length ? `<p>findings: ${v.findings.map((f) => `<span class="bad">${esc(f.kind)}: ${esc(f.detail)}</span>`).join("; ")}</p>` : "");
  } catch (error) {
    target.innerHTML = `<p class="error">${esc(error.message)}</p>`;
  }
}

function options(select, values) {
  select.insertAdjacentHTML("beforeend", values.map((v) => `<option>${esc(v)}</option>`).join(""));
}

async function refresh() {
  try {
    await Promise.all([refreshOverview(), refreshDevices(), refreshFindings(), refreshRejects()]);
  } catch (error) {
    $("updated").textContent = `not updated: ${error.message}`;
  }
}

options($("findings-kind"), ["incomplete_scrapping", "double_installation", "not_in_vehicle", "unauthorised_receiver",
  "unaccounted", "late_report", "after_end_of_life", "invalid_code", "chain_break", "sequence_gap", "revoked_key"]);
options($("rejects-reason"), ["too_large", "bad_topic", "malformed", "unknown_key", "key_not_active", "key_revoked",
  "unsupported_algorithm", "bad_signature", "device_mismatch", "role_not_allowed", "schema", "sequence_reused"]);
$("battery-form").addEventListener("submit", (e) => { e.preventDefault(); showBattery($("battery-code").value.trim()); });
$("vehicle-form").addEventListener("submit", (e) => { e.preventDefault(); showVehicle($("vehicle-vin").value.trim()); });
$("findings-form").addEventListener("change", refreshFindings);
$("rejects-form").addEventListener("change", refreshRejects);
// The address the server prints carries the token in its fragment (#token=…), which never reaches the
// server, a proxy's log or a Referer: exchange it for the cookie once, and take it out of the address
// (and so out of the browser's history) before anything else happens.
async function login() {
  const match = location.hash.match(/^#token=(.+)$/);
  if (!match) return;
  history.replaceState(null, "", location.pathname + location.search);
  const response = await fetch("/login", {
    method: "POST", headers: { Authorization: `Bearer ${decodeURIComponent(match[1])}` }, credentials: "same-origin",
  });
  if (!response.ok) $("updated").textContent = "not logged in: open the address the server printed";
}

login().then(refresh);
setInterval(refresh, 5000);
