// Steward's host page: while the page is visible, its body is fetched
// again every two seconds (at most one request at a time) and swapped in.
// Nothing runs while the page is hidden, and nothing when none is open.
"use strict";
(function () {
  const main = document.getElementById("live");
  if (!main) return;
  let busy = false;
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
      if (r.ok) main.innerHTML = await r.text();
    } catch (e) {
      // The agent may be restarting: the next tick tries again.
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, 2000);
})();
