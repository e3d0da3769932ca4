// The run page's loss curves: poll the run's metrics.jsonl through /ui/api/runs/<name>/metrics every 2 s
// while it trains and redraw the SVG, so the curve grows without reloading the page.
"use strict";

(function () {
  const box = document.getElementById("loss");
  if (!box) return;
  const plot = document.getElementById("loss-plot");
  const latest = document.getElementById("loss-latest");
  const badge = document.getElementById("run-state");
  const SVG = "http://www.w3.org/2000/svg";
  const W = 820, H = 320, M = { left: 56, right: 16, top: 14, bottom: 38 };
  let records = [];

  function node(name, attrs, parent, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, value);
    if (text !== undefined) element.textContent = text;
    parent.appendChild(element);
    return element;
  }

  // About `count` round tick values between lo and hi (1, 2 or 5 times a power of ten apart).
  function ticks(lo, hi, count) {
    const raw = (hi - lo) / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function series(key) {
    return records.filter((r) => typeof r[key] === "number" && typeof r.step === "number").map((r) => [r.step, r[key]]);
  }

  function draw() {
    const train = series("loss"), evals = series("eval_loss"), exact = series("eval_exact_match");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "loss curves");
    const all = train.concat(evals);
    if (!all.length && exact.length) all.push(...exact.map((p) => [p[0], 0]));
    if (!all.length) {
      node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg, "no metrics.jsonl lines yet");
      plot.replaceChildren(svg);
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    for (const p of exact) { x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]); }
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const pad = (y1 - y0 || Math.abs(y1) || 1) * 0.06;
    y0 -= pad; y1 += pad;
    const x = (v) => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
    const y = (v) => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);

    for (const v of ticks(y0, y1, 5)) {
      node("line", { x1: M.left, x2: W - M.right, y1: y(v), y2: y(v), class: "grid" }, svg);
      node("text", { x: M.left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, svg, String(v));
    }
    for (const v of ticks(x0, x1, 8).filter(Number.isInteger)) {
      node("line", { x1: x(v), x2: x(v), y1: M.top, y2: H - M.bottom, class: "grid" }, svg);
      node("text", { x: x(v), y: H - M.bottom + 15, "text-anchor": "middle", class: "tick" }, svg, String(v));
    }
    node("text", { x: (W + M.left) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" }, svg, "step");
    node("text", { x: 14, y: (H - M.bottom) / 2, "text-anchor": "middle", class: "axis-label",
                   transform: `rotate(-90 14 ${(H - M.bottom) / 2})` }, svg, "loss");

    const line = (points) => points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    if (train.length) node("polyline", { class: "train", points: line(train) }, svg);
    if (evals.length) {
      node("polyline", { class: "eval", points: line(evals) }, svg);
      for (const p of evals) node("circle", { class: "eval-point", cx: x(p[0]), cy: y(p[1]), r: 3.5 }, svg);
    }
    // Exact match of greedy answers (train.eval_accuracy) on its own axis, 0 to 100%, at the right.
    if (exact.length) {
      const ya = (v) => H - M.bottom - v * (H - M.top - M.bottom);
      for (const v of [0, 0.5, 1]) {
        node("text", { x: W - M.right + 2, y: ya(v) + 4, "text-anchor": "start", class: "tick accuracy-tick" }, svg,
             `${Math.round(v * 100)}%`);
      }
      node("polyline", { class: "accuracy", points: exact.map((p) => `${x(p[0]).toFixed(1)},${ya(p[1]).toFixed(1)}`)
        .join(" ") }, svg);
      for (const p of exact) node("circle", { class: "accuracy-point", cx: x(p[0]), cy: ya(p[1]), r: 3.5 }, svg);
    }
    const legend = node("g", { class: "legend", transform: `translate(${W - M.right - 190}, ${M.top + 8})` }, svg);
    node("rect", { x: 0, y: -8, width: 14, height: 3, class: "legend-train" }, legend);
    node("text", { x: 20, y: -2 }, legend, `train loss (${train.length})`);
    node("rect", { x: 0, y: 10, width: 14, height: 3, class: "legend-eval" }, legend);
    node("text", { x: 20, y: 16 }, legend, `eval loss (${evals.length})`);
    if (exact.length) {
      node("rect", { x: 0, y: 28, width: 14, height: 3, class: "legend-accuracy" }, legend);
      node("text", { x: 20, y: 34 }, legend, `exact match, right axis (${exact.length})`);
    }
    plot.replaceChildren(svg);

    const last = (key) => { const s = series(key); return s.length ? s[s.length - 1][1] : null; };
    const parts = [`step ${all.reduce((m, p) => Math.max(m, p[0]), 0)}`];
    if (last("loss") !== null) parts.push(`train loss ${last("loss").toFixed(4)}`);
    if (last("eval_loss") !== null) parts.push(`eval loss ${last("eval_loss").toFixed(4)}`);
    if (last("eval_exact_match") !== null) parts.push(`exact match ${(100 * last("eval_exact_match")).toFixed(0)}%`);
    if (last("learning_rate") !== null) parts.push(`lr ${last("learning_rate").toExponential(2)}`);
    if (last("tokens_per_second") !== null) parts.push(`${Math.round(last("tokens_per_second"))} tokens/s`);
    latest.textContent = parts.join(" · ");
  }

  // Validation by rule, field or label (eval_recall:<rule>, eval_field:<name>, ...) at the last eval steps:
  // which behaviour the model has not learned yet, updated as the run logs eval passes.
  const SHOWN_STEPS = 6;
  function drawDetail() {
    const box = document.getElementById("detail");
    if (!box) return;
    const evals = records.filter((r) => typeof r.eval_loss === "number").slice(-SHOWN_STEPS);
    const keys = [...new Set(evals.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("eval_") && k.includes(":"))))];
    box.textContent = "";
    if (!keys.length) {
      const empty = document.createElement("p");
      empty.className = "muted";
      empty.textContent = "no per-rule, per-field or per-label scores logged (train.eval_accuracy, eval.scorer)";
      box.appendChild(empty);
      return;
    }
    const table = document.createElement("table");
    table.id = "detail-table";
    const head = table.createTHead().insertRow();
    for (const label of ["score", ...evals.map((r) => `step ${r.step}`)]) {
      const th = document.createElement("th");
      th.textContent = label;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const key of keys) {
      const row = body.insertRow();
      row.insertCell().textContent = key.slice("eval_".length);
      for (const r of evals) {
        const cell = row.insertCell();
        cell.className = "num";
        cell.textContent = typeof r[key] === "number" ? r[key].toFixed(2) : "–";
      }
    }
    box.appendChild(table);
  }

  function showState(state) {
    if (!badge || !state || badge.textContent === state) return;
    badge.textContent = state;
    badge.className = `state state-${state}`;
  }

  async function poll() {
    let wait = 2000;
    try {
      const response = await fetch(`${box.dataset.metrics}?after=${records.length}`, { cache: "no-store" });
      if (response.ok) {
        const data = await response.json();
        if (data.reset || data.records.length) {
          records = data.reset ? data.records : records.concat(data.records);
          draw();
          drawDetail();
        }
        showState(data.state);
        // A finished or stopped run is looked at less often: it only changes if it is resumed.
        if (data.state !== "training") wait = 10000;
      }
    } catch (error) {
      // The server restarting, or the network gone for a moment: try again on the next tick.
    }
    setTimeout(poll, wait);
  }

  draw();
  drawDetail();
  poll();
})();
