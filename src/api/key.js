// The key a page uses where the API has keys: asked for once when the API
// first answers 401, kept for this tab's session (sessionStorage), sent as
// a Bearer header, and traded for a short-lived ticket to open the stream,
// since a browser cannot put a header on a WebSocket. Where the API has no
// keys nothing is ever asked.
"use strict";

const StevedoreKey = (() => {
  const ITEM = "stevedore.apiKey";
  let asking = null;

  const get = () => sessionStorage.getItem(ITEM);

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const k = get();
    if (k) h.authorization = "Bearer " + k;
    return h;
  }

  // Shows the key form; resolves once a key was entered.
  function ask(message) {
    if (asking) return asking;
    asking = new Promise((resolve) => {
      const form = document.createElement("form");
      form.id = "key-form";
      form.className = "key-form";
      const label = document.createElement("label");
      label.htmlFor = "key-input";
      label.textContent = message;
      const input = document.createElement("input");
      input.id = "key-input";
      input.type = "password";
      input.autocomplete = "off";
      input.placeholder = "sk_…";
      const button = document.createElement("button");
      button.type = "submit";
      button.textContent = "Use key";
      form.append(label, input, button);
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const v = input.value.trim();
        if (!v) return;
        sessionStorage.setItem(ITEM, v);
        form.remove();
        asking = null;
        resolve(v);
      });
      document.body.prepend(form);
      input.focus();
    });
    return asking;
  }

  // fetch with the key; on 401 asks for a (new) key and tries again.
  async function authed(path, opts) {
    for (;;) {
      const o = Object.assign({}, opts || {});
      o.headers = headers(o.headers);
      const r = await fetch(path, o);
      if (r.status !== 401) return r;
      const had = get();
      sessionStorage.removeItem(ITEM);
      await ask(had ? "That API key was refused; enter another:" : "This API needs a key (read scope is enough):");
    }
  }

  // The stream URL, with a fresh ticket when a key is in use.
  async function streamUrl(path) {
    if (!get()) return path;
    const r = await authed("/v1/stream-tickets", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    if (!r.ok) return path;
    const t = await r.json();
    if (!t.ticket) return path;
    return path + (path.includes("?") ? "&" : "?") + "ticket=" + encodeURIComponent(t.ticket);
  }

  // Waits while the key form is open, so a reconnect uses the new key.
  const ready = () => asking || Promise.resolve();

  return { get, headers, ask, ready, fetch: authed, streamUrl };
})();
