// The dashboard: poll /dashboard/data every second, fill the tiles and tables, draw SVG charts.
"use strict";

const TIER_COLORS = ["#6ea8fe", "#35c48b", "#c792ea", "#4fd1c5", "#f78c6c", "#ffcb6b"];
const CHART = { w: 560, h: 220, left: 46, right: 10, top: 10, bottom: 22 };
const tierColor = {};

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmt(x, digits) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? fmt(s * 1000, 0) + " ms" : fmt(s, 2) + " s";
}

function utc(t) {
  return new Date(t * 1000).toISOString().slice(11, 16);
}

function utcDay(t) {
  return new Date(t * 1000).toISOString().slice(5, 10);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// series: [{values, color, dash, fill}] over times `t`; bands: [[t0, t1]] shaded; x spans `span` seconds to `now`.
function lineChart(svg, t, series, now, span, bands) {
  const c = CHART, iw = c.w - c.left - c.right, ih = c.h - c.top - c.bottom;
  const top = niceMax(Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v !== null))) * 1.1);
  const x = (ti) => c.left + ((ti - (now - span)) / span) * iw;
  const y = (v) => c.top + ih - (Math.min(v, top) / top) * ih;
  let out = "";
  for (const [a, b] of bands) {
    const x0 = Math.max(c.left, x(a)), x1 = Math.min(c.left + iw, x(b));
    if (x1 > x0) out += `<rect x="${x0}" y="${c.top}" width="${x1 - x0}" height="${ih}" fill="var(--event)"/>`;
  }
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4, yy = y(v);
    out += `<line class="grid" x1="${c.left}" x2="${c.left + iw}" y1="${yy}" y2="${yy}"/>`;
    out += `<text class="axis" x="${c.left - 6}" y="${yy + 3}" text-anchor="end">${fmt(v, Number.isInteger(v) ? 0 : 1)}</text>`;
  }
  for (let m = 0; m <= span / 60; m++) {
    const xx = x(now - m * 60);
    out += `<text class="axis" x="${xx}" y="${c.h - 6}" text-anchor="middle">${m === 0 ? "now" : "-" + m + "m"}</text>`;
  }
  for (const s of series) {
    const pts = t.map((ti, i) => [ti, s.values[i]]).filter(([ti, v]) => v !== null && ti >= now - span);
    if (!pts.length) continue;
    const d = pts.map(([ti, v], i) => `${i ? "L" : "M"}${x(ti).toFixed(1)},${y(v).toFixed(1)}`).join("");
    if (s.fill) {
      const base = c.top + ih;
      out += `<path d="${d}L${x(pts[pts.length - 1][0]).toFixed(1)},${base}L${x(pts[0][0]).toFixed(1)},${base}Z" fill="${s.color}" opacity="0.15"/>`;
    }
    out += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2" ${s.dash ? 'stroke-dasharray="6 4"' : ""}/>`;
  }
  svg.innerHTML = out;
}

function render(data) {
  const span = 300;
  document.getElementById("model").textContent = "model " + data.model;
  document.getElementById("clock").textContent = new Date(data.now * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  document.getElementById("window").textContent = fmt(data.window_s, 0);
  const tot = data.totals, pw = data.power;
  document.getElementById("kpi-tps").textContent = fmt(tot.tokens_per_s, 1);
  document.getElementById("kpi-ttft").textContent = seconds(tot.ttft_p50_s);
  document.getElementById("kpi-power").textContent = fmt(pw.watts, 1) + " / " + fmt(pw.budget_w, 0) + " W";
  document.getElementById("kpi-power-source").textContent =
    pw.source + (pw.static_cap_w ? " · static cap " + fmt(pw.static_cap_w, 0) + " W" : "");
  document.getElementById("kpi-jpt").textContent = fmt(tot.joules_per_token, 3);
  document.getElementById("kpi-usd").textContent = "$" + fmt(tot.usd_per_mtok, 3);
  document.getElementById("kpi-energy-usd").textContent = "$" + fmt(tot.energy_usd_per_mtok, 4);

  data.tiers.forEach((tier, i) => { tierColor[tier.name] = tierColor[tier.name] || TIER_COLORS[i % TIER_COLORS.length]; });
  document.querySelector("#tiers tbody").innerHTML = data.tiers.map((t) => `<tr>
    <td><span class="swatch" style="background:${tierColor[t.name]}"></span>${esc(t.name)}</td>
    <td><span class="tag ${t.admitted ? "ok" : "shed"}">${t.admitted ? "admitted" : "shed"}</span></td>
    <td>${t.running}</td><td>${t.queued}</td><td>${t.shed}</td><td>${fmt(t.tokens_per_s, 1)}</td><td>${seconds(t.ttft_p50_s)}</td>
    <td>${fmt(t.joules_per_token, 3)}</td><td>${t.usd_per_mtok === null ? "–" : "$" + fmt(t.usd_per_mtok, 3)}</td></tr>`).join("");
  document.querySelector("#workers tbody").innerHTML = data.workers.map((w) => `<tr>
    <td>${esc(w.model)} ${w.worker}</td><td>${fmt(w.power_share_w, 1)} W</td><td>${w.token_budget}</td>
    <td>${w.pace_w === null ? "–" : fmt(w.pace_w, 1) + " W"}</td></tr>`).join("");
  document.querySelector("#events tbody").innerHTML = data.events.map((e) => `<tr>
    <td>${esc(e.name || "(unnamed)")}</td><td>${esc(e.source)}</td><td>${utcDay(e.start_s)} ${utc(e.start_s)}–${utc(e.end_s)}</td>
    <td>${fmt(e.cut_fraction * 100, 0)}%</td><td>${fmt(e.cut_now * 100, 0)}%</td>
    <td><span class="tag ${e.state === "over" || e.state === "upcoming" ? "ok" : "shed"}">${esc(e.state)}</span></td></tr>`).join("");
  document.getElementById("no-events").style.display = data.events.length ? "none" : "block";

  const h = data.history;
  lineChart(document.getElementById("chart-tokens"), h.t,
    data.tiers.map((t) => ({ values: h.tokens_per_s[t.name] || [], color: tierColor[t.name] })), data.now, span, []);
  document.getElementById("legend-tokens").innerHTML = data.tiers.map((t) =>
    `<span><i style="background:${tierColor[t.name]}"></i>${esc(t.name)}</span>`).join("");
  const bands = data.events.map((e) => [e.start_s - e.ramp_s, e.end_s + e.ramp_s]);
  lineChart(document.getElementById("chart-power"), h.t,
    [{ values: h.power_w, color: "#f5a524", fill: true }, { values: h.budget_w, color: "#ef4f6b", dash: true }],
    data.now, span, bands);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/dashboard/data", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    status.textContent = "live";
    status.className = "pill live";
  } catch (e) {
    status.textContent = "no data (" + e.message + ")";
    status.className = "pill down";
  }
}

poll();
setInterval(poll, 1000);
