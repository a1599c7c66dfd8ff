// The Nakshatra page: a chat that streams through the swarm, and a live view
// of the swarm. Plain JavaScript, served from the binary; no framework, no
// external URL. It talks to the same server that serves it:
//   GET  /nakshatra/swarm          every second: the swarm view + API stats
//   POST /v1/chat/completions      stream:true, read as server-sent events
// A key the server asks for (401) is kept in localStorage and sent as
// `Authorization: Bearer KEY`.
"use strict";

(() => {
  const KEY_STORE = "nakshatra.apiKey";
  const POLL_MS = 1000;
  // Cells per row of a strip before it wraps.
  const STRIP_COLUMNS = 48;

  const $ = (id) => document.getElementById(id);
  const el = {
    stats: $("stats"),
    error: $("error"),
    errorText: $("error-text"),
    errorClose: $("error-close"),
    auth: $("auth"),
    apiKey: $("api-key"),
    authForget: $("auth-forget"),
    transcript: $("transcript"),
    emptyChat: $("empty-chat"),
    chain: $("chain"),
    tps: $("tps"),
    finish: $("finish"),
    form: $("chat-form"),
    prompt: $("prompt"),
    model: $("model"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    swarmState: $("swarm-state"),
    models: $("models"),
    peers: $("peers").querySelector("tbody"),
  };

  const state = {
    // The conversation sent with each request: {role, content}.
    messages: [],
    // The AbortController of the answer streaming now, if any.
    abort: null,
    // Model ids of the last view, in order, for the model picker (null:
    // no view yet).
    modelIds: null,
    // Model sections of the strip view by model id.
    sections: new Map(),
  };

  // ---------------------------------------------------------------- helpers

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORE) || "";
    } catch (_) {
      return "";
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = storedKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function make(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function shortId(id, n) {
    id = String(id || "");
    n = n || 8;
    return id.length > n + 1 ? id.slice(0, n) + "…" : id;
  }

  // Peer ids all start with the same multihash prefix (12D3KooW...): the
  // tail tells them apart.
  function shortPeer(id) {
    id = String(id || "");
    return id.length > 9 ? "…" + id.slice(-8) : id;
  }

  function num(x, digits) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
  }

  function range(r) {
    return Array.isArray(r) && r.length === 2 ? r[0] + ".." + r[1] : "?";
  }

  // An HTTP error with the server's message (OpenAI's
  // {"error":{"message":...}}, Ollama's {"error":"..."}, or plain text).
  async function errorFrom(res) {
    let message = res.status + " " + (res.statusText || "error");
    try {
      const text = await res.text();
      let parsed = null;
      try {
        parsed = JSON.parse(text);
      } catch (_) {
        parsed = null;
      }
      if (parsed && parsed.error) {
        message =
          typeof parsed.error === "string"
            ? parsed.error
            : parsed.error.message || message;
      } else if (text.trim()) {
        message = text.trim().slice(0, 300);
      }
    } catch (_) {
      // keep the status line
    }
    const retry = res.headers.get("Retry-After");
    if (retry) message += " (retry in " + retry + " s)";
    if (res.status === 401) showAuth();
    const err = new Error(message);
    err.status = res.status;
    return err;
  }

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = "";
  }

  function showAuth() {
    if (!el.auth.hidden) return;
    el.auth.hidden = false;
    el.apiKey.value = storedKey();
    el.apiKey.focus();
  }

  // ------------------------------------------------------------ swarm view

  async function poll() {
    try {
      const res = await fetch("/nakshatra/swarm", {
        headers: headers(),
        cache: "no-store",
      });
      if (!res.ok) throw await errorFrom(res);
      render(await res.json());
    } catch (e) {
      el.swarmState.textContent = "swarm view unavailable: " + e.message;
      el.swarmState.className = "bad";
      el.models.classList.add("stale");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function render(data) {
    const view = (data && data.view) || {};
    const api = (data && data.api) || {};
    const models = Array.isArray(view.models) ? view.models : [];
    renderStats(api);
    renderModels(models);
    renderPeers(models);
    renderModelPicker(models);

    const age = api.view_age_s;
    const refresh = typeof api.refresh_s === "number" ? api.refresh_s : 2;
    const stale = typeof age === "number" && age > 3 * refresh + 2;
    el.models.classList.toggle("stale", stale);
    if (stale) {
      el.swarmState.textContent =
        "view not refreshed for " + num(age, 0) + " s";
      el.swarmState.className = "bad";
    } else {
      el.swarmState.textContent =
        models.length === 0
          ? "no model announced yet"
          : models.length + (models.length === 1 ? " model" : " models") +
            " · live";
      el.swarmState.className = "muted";
    }
  }

  function renderStats(api) {
    const fmt = {
      peers: (v) => num(v, 0),
      asks_in_flight: (v) => num(v, 0),
      sessions_open: (v) => num(v, 0),
      tokens_per_s: (v) => num(v, 1),
      view_age_s: (v) => num(v, 1) + " s",
    };
    for (const dd of el.stats.querySelectorAll("dd[data-stat]")) {
      const key = dd.dataset.stat;
      dd.textContent = key in api ? fmt[key](api[key]) : "–";
    }
  }

  function renderModels(models) {
    const seen = new Set();
    for (const m of models) {
      const id = String(m.id || "");
      const n = Math.max(0, Number(m.n_layers) || 0);
      seen.add(id);
      let sec = state.sections.get(id);
      if (!sec || sec.n !== n) {
        const fresh = modelSection(id, n);
        if (sec) sec.root.replaceWith(fresh.root);
        else el.models.appendChild(fresh.root);
        sec = fresh;
        state.sections.set(id, sec);
      }
      updateSection(sec, m);
    }
    for (const [id, sec] of state.sections) {
      if (!seen.has(id)) {
        sec.root.remove();
        state.sections.delete(id);
      }
    }
    // Keep the order of the view.
    for (const m of models) {
      const sec = state.sections.get(String(m.id || ""));
      if (sec) el.models.appendChild(sec.root);
    }
  }

  function modelSection(id, n) {
    const root = make("article", { class: "model", "data-model-id": id });
    const head = make("h3");
    head.appendChild(make("span", { class: "model-id", title: id }, shortId(id, 12)));
    const kind = make("span", { class: "muted" });
    head.appendChild(kind);
    const summary = make("p", { class: "coverage" });
    const strip = make("div", { class: "strip", role: "img" });
    strip.style.gridTemplateColumns =
      "repeat(" + Math.max(1, Math.min(n, STRIP_COLUMNS)) + ", minmax(0, 1fr))";
    const cells = [];
    for (let b = 0; b < n; b++) {
      const cell = make("div", {
        class: "block",
        "data-model": id,
        "data-block": b,
        "data-covered": "0",
        "data-holders": "0",
      });
      strip.appendChild(cell);
      cells.push(cell);
    }
    const axis = make("div", { class: "axis", "aria-hidden": "true" });
    axis.appendChild(make("span", {}, "0"));
    axis.appendChild(make("span", {}, String(n)));
    root.append(head, summary, strip, axis);
    return { root, n, kind, summary, strip, cells };
  }

  function updateSection(sec, m) {
    const coverage = Array.isArray(m.coverage) ? m.coverage : [];
    let covered = 0;
    sec.cells.forEach((cell, b) => {
      const holders = Array.isArray(coverage[b]) ? coverage[b] : [];
      const count = holders.length;
      if (count > 0) covered++;
      const c = count > 0 ? "1" : "0";
      if (cell.dataset.covered !== c) cell.dataset.covered = c;
      const h = String(Math.min(count, 3));
      if (cell.dataset.holders !== h) cell.dataset.holders = h;
      cell.title =
        "block " + b + ": " +
        (count === 0
          ? "uncovered"
          : count + (count === 1 ? " peer" : " peers") + " (" +
            holders.map(shortPeer).join(", ") + ")");
    });
    sec.kind.textContent =
      " " + (m.name ? m.name + " · " : "") + (m.arch || "?") + " · " + sec.n + " blocks";
    const gaps = Array.isArray(m.gaps) ? m.gaps : [];
    let text = covered + " of " + sec.n + " blocks covered";
    if (gaps.length) text += " · gaps " + gaps.map(range).join(", ");
    sec.summary.textContent = text;
    sec.summary.classList.toggle("bad", covered < sec.n);
    sec.strip.setAttribute(
      "aria-label",
      "Coverage of model " + shortId(sec.root.dataset.modelId, 12) + ": " + text
    );
  }

  function renderPeers(models) {
    const rows = [];
    for (const m of models) {
      for (const p of Array.isArray(m.peers) ? m.peers : []) {
        const tr = make("tr", {
          "data-model": m.id,
          "data-peer": p.peer_id,
          "data-range": range(p.range),
        });
        tr.appendChild(make("td", { class: "mono", title: m.id }, shortId(m.id, 6)));
        tr.appendChild(make("td", {}, range(p.range)));
        tr.appendChild(make("td", { class: "mono", title: p.peer_id }, shortPeer(p.peer_id)));
        tr.appendChild(make("td", { class: "state-" + (p.state || "unknown") }, p.state || "?"));
        tr.appendChild(make("td", {}, p.backend || "?"));
        tr.appendChild(make("td", { class: "num" }, num(p.throughput, 1) + " tok/s"));
        tr.appendChild(
          make("td", { class: "num" }, typeof p.rtt_ms === "number" ? num(p.rtt_ms, 2) + " ms" : "–")
        );
        const via =
          p.via === "direct" ? "direct" : p.via === "relay" ? "relayed" : "not connected";
        tr.appendChild(make("td", { class: "via-" + (p.via || "none") }, via));
        const max = Number(p.max_sessions);
        const free = Number(p.free_sessions);
        const used = isFinite(max) && isFinite(free) ? Math.max(0, max - free) : NaN;
        tr.appendChild(
          make(
            "td",
            { class: "num", title: isFinite(free) ? free + " free" : null },
            (isFinite(used) ? used : "?") + " of " + (isFinite(max) ? max : "?")
          )
        );
        rows.push(tr);
      }
    }
    if (rows.length === 0) {
      const tr = make("tr");
      tr.appendChild(make("td", { colspan: 9, class: "muted" }, "no peer serves a model"));
      rows.push(tr);
    }
    el.peers.replaceChildren(...rows);
  }

  // A model as people read it: its announced name and the start of its
  // id (names are hints; the id is what the chat asks for).
  function modelLabel(m) {
    const id = shortId(String(m.id || ""), 12);
    return m.name ? String(m.name) + " · " + id : id;
  }

  function renderModelPicker(models) {
    const ids = models.map((m) => String(m.id || ""));
    if (state.modelIds && ids.join(",") === state.modelIds.join(",")) return;
    state.modelIds = ids;
    const chosen = el.model.value;
    const options = [];
    if (ids.length <= 1) {
      options.push(make("option", { value: "" }, ids.length ? modelLabel(models[0]) : "none announced"));
    } else {
      for (const m of models) {
        const full = Array.isArray(m.gaps) && m.gaps.length === 0;
        options.push(
          make("option", { value: m.id }, modelLabel(m) + " (" + (m.arch || "?") + (full ? "" : ", partly covered") + ")")
        );
      }
    }
    el.model.replaceChildren(...options);
    if (ids.includes(chosen)) el.model.value = chosen;
  }

  // ------------------------------------------------------------------- chat

  // Server-sent events of a response body: yields each event's data.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          let line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length) yield data.join("\n");
            data = [];
          } else if (line.startsWith("data:")) {
            let v = line.slice(5);
            if (v.startsWith(" ")) v = v.slice(1);
            data.push(v);
          }
          // Comments (keep-alives) and other fields are ignored.
        }
      }
      buf += decoder.decode();
      if (buf.startsWith("data:")) data.push(buf.slice(5).trim());
      if (data.length) yield data.join("\n");
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function addTurn(role, text) {
    el.emptyChat.hidden = true;
    const turn = make("div", { class: "turn " + role });
    turn.appendChild(make("div", { class: "who" }, role === "user" ? "You" : "Swarm"));
    const body = make("div", { class: "text" }, text);
    turn.appendChild(body);
    el.transcript.appendChild(turn);
    el.transcript.scrollTop = el.transcript.scrollHeight;
    return body;
  }

  function showChain(chain) {
    const parts = [];
    chain.forEach((hop, i) => {
      if (i > 0) parts.push(make("span", { class: "arrow", "aria-hidden": "true" }, "→"));
      const chip = make("span", { class: "hop", title: hop.peer_id });
      chip.appendChild(make("span", { class: "mono" }, shortPeer(hop.peer_id)));
      chip.appendChild(document.createTextNode(" " + range(hop.range)));
      parts.push(chip);
    });
    el.chain.replaceChildren(...parts);
  }

  function setBusy(busy) {
    // Stop takes Send's place while an answer streams.
    el.send.disabled = busy;
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function readNumber(input, lo, hi, integer, what) {
    const v = Number(input.value);
    if (input.value.trim() === "" || !isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
      input.focus();
      throw new Error(what + " must be " + (integer ? "a whole number " : "a number ") + "from " + lo + " to " + hi);
    }
    return v;
  }

  async function send(ev) {
    ev.preventDefault();
    if (state.abort) return;
    const text = el.prompt.value.trim();
    if (!text) return;
    let temperature, maxTokens;
    try {
      temperature = readNumber(el.temperature, 0, 2, false, "Temperature");
      maxTokens = readNumber(el.maxTokens, 1, 1000000, true, "Max tokens");
    } catch (e) {
      showError(e.message);
      return;
    }
    clearError();
    state.messages.push({ role: "user", content: text });
    addTurn("user", text);
    const answer = addTurn("assistant", "");
    // The answer streaming now is #answer.
    const old = $("answer");
    if (old) old.removeAttribute("id");
    answer.id = "answer";
    answer.classList.add("streaming");
    el.prompt.value = "";
    el.chain.replaceChildren();
    el.tps.textContent = "waiting for the first token…";
    el.finish.textContent = "";

    const ctrl = new AbortController();
    state.abort = ctrl;
    setBusy(true);
    const body = {
      messages: state.messages,
      stream: true,
      temperature,
      max_tokens: maxTokens,
      stream_options: { include_usage: true },
    };
    if (el.model.value) body.model = el.model.value;

    const t0 = performance.now();
    let content = "";
    let pieces = 0;
    let tFirst = null;
    let finish = null;
    let usage = null;
    let stats = null;
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: ctrl.signal,
      });
      if (!res.ok) throw await errorFrom(res);
      if (!res.body) throw new Error("this browser cannot read a streamed response");
      let done = false;
      for await (const data of sseEvents(res.body)) {
        if (data === "[DONE]") {
          done = true;
          break;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          throw new Error("unreadable event from the server: " + data.slice(0, 200));
        }
        if (chunk.error) {
          throw new Error(typeof chunk.error === "string" ? chunk.error : chunk.error.message || "the answer broke off");
        }
        const nk = chunk.nakshatra;
        if (nk && Array.isArray(nk.chain)) showChain(nk.chain);
        if (nk && typeof nk.decode_tps === "number") stats = nk;
        const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
        if (choice) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            content += piece;
            answer.textContent = content;
            pieces++;
            const now = performance.now();
            if (tFirst === null) tFirst = now;
            const secs = (now - tFirst) / 1000;
            el.tps.textContent =
              pieces > 1 && secs > 0 ? num((pieces - 1) / secs, 1) + " tok/s" : "first token after " + num((now - t0) / 1000, 2) + " s";
            el.transcript.scrollTop = el.transcript.scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.usage) usage = chunk.usage;
      }
      if (!done) throw new Error("the stream ended before it was complete");
      if (stats) {
        el.tps.textContent =
          num(stats.decode_tps, 1) + " tok/s · first token after " + num(stats.ttft_s, 2) + " s";
      } else if (tFirst !== null && pieces > 1) {
        el.tps.textContent = num((pieces - 1) / ((performance.now() - tFirst) / 1000), 1) + " tok/s";
      }
      const bits = [];
      if (finish === "length") bits.push("stopped at the token limit");
      if (usage) bits.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " answer tokens");
      el.finish.textContent = bits.join(" · ");
      if (!content) answer.textContent = "(empty answer)";
    } catch (e) {
      if (e.name === "AbortError") {
        el.finish.textContent = "stopped";
      } else {
        answer.classList.add("failed");
        if (!content) answer.textContent = "(no answer)";
        if (el.tps.textContent.startsWith("waiting")) el.tps.textContent = "";
        showError(e.message);
      }
    } finally {
      answer.classList.remove("streaming");
      if (content) {
        state.messages.push({ role: "assistant", content });
      } else {
        // Nothing came back: forget the question, offer it again.
        state.messages.pop();
        if (!el.prompt.value) el.prompt.value = text;
      }
      state.abort = null;
      setBusy(false);
    }
  }

  // ----------------------------------------------------------------- wiring

  el.form.addEventListener("submit", send);
  el.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      el.form.requestSubmit();
    }
  });
  el.stop.addEventListener("click", () => {
    if (state.abort) state.abort.abort();
  });
  el.newChat.addEventListener("click", () => {
    if (state.abort) state.abort.abort();
    state.messages = [];
    for (const t of el.transcript.querySelectorAll(".turn")) t.remove();
    el.emptyChat.hidden = false;
    el.chain.replaceChildren();
    el.tps.textContent = "";
    el.finish.textContent = "";
    clearError();
    el.prompt.focus();
  });
  el.errorClose.addEventListener("click", clearError);
  el.auth.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = el.apiKey.value.trim();
    if (!key) return;
    try {
      localStorage.setItem(KEY_STORE, key);
    } catch (_) {
      showError("this browser does not allow storing the key");
      return;
    }
    el.auth.hidden = true;
    clearError();
  });
  el.authForget.addEventListener("click", () => {
    try {
      localStorage.removeItem(KEY_STORE);
    } catch (_) {
      // nothing stored
    }
    el.apiKey.value = "";
  });

  poll();
})();
