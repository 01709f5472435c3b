// flagproxy console: live updates. The page is complete without this script (every action is a
// form); with it, a store change (Server-Sent Events from <prefix>/console/events) fetches the
// current view again and swaps its <main> in, unless a form in it is being edited. The stream is
// closed on pagehide, so a page kept in the back/forward cache holds no connection, and opened
// again when such a page is shown.
"use strict";
(function () {
  const url = document.body.dataset.events;
  const status = document.getElementById("live");
  let source = null;
  let fetching = false;
  let again = false;

  function editing() {
    const active = document.activeElement;
    return active && active.closest("main form") && active.matches("input, textarea, select");
  }

  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const response = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) return;
      const html = await response.text();
      const next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
      const main = document.querySelector("main");
      if (next && main && !editing() && !main.querySelector("[role=alert]")) {
        main.replaceWith(next);
        status.textContent = "Updated (store version " + next.dataset.version + ")";
      } else if (next && main) {
        main.dataset.version = next.dataset.version;
        status.textContent = "The flags changed: reload to see the change";
      }
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }

  function open() {
    if (source || !url) return;
    source = new EventSource(url);
    source.addEventListener("message", refresh);
    source.addEventListener("open", () => { document.body.dataset.live = "open"; });
  }

  function close() {
    if (source) { source.close(); source = null; }
    document.body.dataset.live = "closed";
  }

  window.addEventListener("pagehide", close);
  window.addEventListener("pageshow", (event) => { if (event.persisted) { open(); refresh(); } });
  open();
})();
