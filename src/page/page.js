// Steward's host page: while the page is visible, its body is fetched
// again every two seconds (at most one request at a time) and swapped in.
// Nothing runs while the page is hidden, and nothing when none is open.
// Hovering a chart shows the values under the pointer, read back from the
// drawn lines and the chart's scale (the figure's data-* attributes).
"use strict";
(function () {
  const main = document.getElementById("live");
  if (!main) return;
  const W = 640;
  const H = 120;
  let busy = false;
  // The chart under the pointer (its index) and where, kept across swaps.
  let hover = null;

  function fmt(unit, v) {
    if (unit === "bytes") return (v / 1073741824).toFixed(2) + " GiB";
    if (unit === "cores" || unit === "gpus") return v.toFixed(2) + " " + unit;
    return String(Math.round(v));
  }

  function clock(s) {
    return new Date(s * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  // The line's point nearest to x (points are in x order).
  function nearest(line, x) {
    const pts = (line.getAttribute("points") || "").trim().split(/\s+/);
    if (!pts.length || !pts[0]) return null;
    let lo = 0;
    let hi = pts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (+pts[mid].split(",")[0] < x) lo = mid + 1;
      else hi = mid;
    }
    const at = (i) => pts[i].split(",").map(Number);
    const p = at(lo);
    if (lo > 0) {
      const q = at(lo - 1);
      if (x - q[0] < p[0] - x) return q;
    }
    return p;
  }

  function show(fig, clientX) {
    const svg = fig.querySelector("svg");
    const r = svg.getBoundingClientRect();
    if (!r.width) return;
    const x = Math.min(Math.max(((clientX - r.left) / r.width) * W, 0), W);
    const top = +fig.dataset.top;
    const unit = fig.dataset.unit;
    const parts = [];
    let px = x;
    for (const line of fig.querySelectorAll("polyline")) {
      const p = nearest(line, x);
      if (!p) continue;
      px = p[0];
      const v = Math.max(((H - p[1]) / (H - 4)) * top, 0);
      parts.push((line.dataset.legend || line.dataset.field || "") + " " + fmt(unit, v));
    }
    const t0 = +fig.dataset.t0;
    const t1 = +fig.dataset.t1;
    if (!parts.length || !Number.isFinite(t0) || !Number.isFinite(t1)) return;
    // A drawn point covers `bucket` seconds (its counts are their totals).
    const bucket = +fig.dataset.bucket || 1;
    let tip = fig.querySelector(".tip");
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "tip";
      tip.setAttribute("role", "status");
      fig.appendChild(tip);
    }
    const t = Math.round(t0 + (px / W) * (t1 - t0));
    tip.dataset.t = String(t);
    const span = bucket > 1 ? " (+" + bucket + " s)" : "";
    tip.textContent = clock(t) + span + " · " + parts.join(" · ");
    let cursor = svg.querySelector("line.cursor");
    if (!cursor) {
      cursor = document.createElementNS(svg.namespaceURI, "line");
      cursor.setAttribute("class", "cursor");
      cursor.setAttribute("y1", "0");
      cursor.setAttribute("y2", String(H));
      svg.appendChild(cursor);
    }
    cursor.setAttribute("x1", String(px));
    cursor.setAttribute("x2", String(px));
  }

  function charts() {
    return Array.from(main.querySelectorAll("figure.chart"));
  }

  main.addEventListener("pointermove", (e) => {
    const fig = e.target instanceof Element ? e.target.closest("figure.chart") : null;
    if (!fig) {
      if (hover) clear();
      return;
    }
    hover = { index: charts().indexOf(fig), x: e.clientX };
    show(fig, e.clientX);
  });

  function clear() {
    hover = null;
    for (const t of main.querySelectorAll(".chart .tip, .chart line.cursor")) t.remove();
  }
  main.addEventListener("pointerleave", clear);

  async function refresh() {
    if (busy || document.visibilityState !== "visible") return;
    busy = true;
    try {
      // The same view (range, chosen dates) as the page was asked for.
      const query = new URLSearchParams(location.search);
      query.set("fragment", "1");
      const r = await fetch("/dashboard?" + query.toString(), {
        cache: "no-store",
        credentials: "same-origin",
      });
      // The session ended (or the agent restarted): the login form.
      if (r.status === 401 || r.status === 403) {
        location.reload();
        return;
      }
      if (r.ok) {
        main.innerHTML = await r.text();
        const fig = hover && charts()[hover.index];
        if (fig) show(fig, hover.x);
      }
    } catch (e) {
      // The agent may be restarting: the next tick tries again.
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, 2000);
})();
