// The chat page: keeps the conversation in memory and streams each reply from /v1/chat/completions.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  const statusEl = $("status"), modelEl = $("model");
  const settings = ["system", "temperature", "top_p", "max_tokens", "api_key"];
  let history = [];        // [{role, content}] of finished turns
  let controller = null;   // AbortController of the reply being streamed
  const HISTORY_KEY = "ptune.history";  // a reload (or a slip of F5) must not lose the conversation

  for (const id of settings) {  // settings live in this tab only
    const saved = sessionStorage.getItem("ptune." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => sessionStorage.setItem("ptune." + id, $(id).value));
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api_key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setStatus(text, isError) {
    statusEl.textContent = text || "";
    statusEl.classList.toggle("error", !!isError);
  }

  // Follow a growing reply only while the user is at the bottom: one who scrolled up to read stays there.
  function atBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 30;
  }

  function toBottom() { messagesEl.scrollTop = messagesEl.scrollHeight; }

  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    el.textContent = text;  // text only: a reply can never inject markup
    messagesEl.appendChild(el);
    return el;
  }

  function saveHistory() {
    try { sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history)); } catch (e) { /* storage full: memory only */ }
  }

  function restoreHistory() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
      const valid = (m) => m && ["user", "assistant"].includes(m.role) && typeof m.content === "string";
      if (Array.isArray(saved)) history = saved.filter(valid);
    } catch (e) { history = []; }
    for (const m of history) addMessage(m.role, m.content);
    toBottom();
  }

  class Failure extends Error {}  // a failure already put in the user's terms

  async function failureOf(response) {
    let message = response.status + " " + response.statusText, code = null;
    try {
      const body = await response.json();
      code = body.error && body.error.code;
      message = (body.error && body.error.message) || (typeof body.detail === "string" && body.detail)
        || JSON.stringify(body);
    } catch (e) { /* not JSON (a proxy's page): the status line says it */ }
    if (response.status === 401) {
      $("settings").open = true;
      return new Failure("the server needs an API key, or refused this one: enter it under Settings");
    }
    if (code === "context_length_exceeded") message += "; Clear starts a new, shorter conversation";
    if (response.status === 503) message += " (the server is busy)";
    return new Failure(message);
  }

  async function loadHealth() {
    try {
      const r = await fetch("/health", { headers: headers() });
      if (!r.ok && r.status !== 401) throw new Error("/health answered " + r.status + " " + r.statusText);
      if (r.status === 401) {
        modelEl.textContent = "this server needs an API key: enter it under Settings";
        modelEl.classList.add("error");
        $("settings").open = true;
        return;
      }
      const h = await r.json();
      modelEl.classList.remove("error");
      modelEl.dataset.checkpoint = h.checkpoint || "";
      modelEl.textContent = h.checkpoint
        ? "checkpoint " + h.checkpoint + (h.step !== null && h.step !== undefined ? " (step " + h.step + ")" : "")
        : "base model " + h.base + " (no prefix)";
      modelEl.title = "base " + h.base + ", template " + h.template + ", " + h.device;
      $("max_tokens").max = h.max_new_tokens;
      if (parseInt($("max_tokens").value, 10) > h.max_new_tokens) $("max_tokens").value = h.max_new_tokens;
    } catch (e) {
      modelEl.textContent = "cannot reach the server: " + e;
      modelEl.classList.add("error");
    }
  }

  function numberOf(id) {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : null;
  }

  // Server-sent events: "data: <json>" lines, events separated by a blank line.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) yield data;
      }
    }
  }

  async function send(text) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, { role: "user", content: text });
    const request = { messages: messages, stream: true };
    const t = numberOf("temperature"), p = numberOf("top_p"), m = parseInt($("max_tokens").value, 10);
    if (t !== null) request.temperature = t;
    if (p !== null) request.top_p = p;
    if (Number.isInteger(m) && m > 0) request.max_tokens = m;

    const asked = addMessage("user", text);
    const out = addMessage("assistant", "");
    toBottom();
    out.classList.add("pending");
    out.dataset.chunks = "0";
    let reply = "", finish = null, ended = false;
    controller = new AbortController();
    sendBtn.disabled = true;
    stopBtn.disabled = false;
    setStatus("generating…");
    try {
      let r;
      try {
        r = await fetch("/v1/chat/completions", {
          method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
        });
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new Failure("cannot reach the server (" + e.message + "): is it still running?");
      }
      if (!r.ok) throw await failureOf(r);
      try {
        for await (const data of sseEvents(r.body)) {
          if (data === "[DONE]") { ended = true; break; }
          const event = JSON.parse(data);
          if (event.error) throw new Failure(event.error.message);
          const choice = event.choices && event.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            const follow = atBottom();
            reply += choice.delta.content;
            out.textContent = reply;
            out.dataset.chunks = String(parseInt(out.dataset.chunks, 10) + 1);
            if (follow) toBottom();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      } catch (e) {
        if (e.name === "AbortError" || e instanceof Failure) throw e;
        if (e instanceof SyntaxError) throw new Failure("the server sent an event that is not JSON: " + e.message);
        throw new Failure("the connection to the server was lost in the middle of the reply (" + e.message + ")");
      }
      // Without [DONE] the stream was cut short (a server or proxy that gave up): the reply may be partial.
      if (!ended) throw new Failure("the reply was cut off: the server closed the stream before its end");
      history.push({ role: "user", content: text }, { role: "assistant", content: reply });
      saveHistory();
      setStatus(finish === "length" ? "stopped at the token limit" : "");
    } catch (e) {
      // The turn is not in the history: say so on it, so the page shows what the model will be sent.
      asked.classList.add("dropped");
      out.classList.add("dropped");
      asked.title = out.title = "not in the history: the model will not see this turn";
      if (e.name === "AbortError") {
        if (out.isConnected) setStatus("stopped; this turn is not kept in the history");  // (not after Clear)
      } else {
        const follow = atBottom();
        out.classList.add("error");
        out.textContent = reply + (reply ? "\n" : "") + "[error] " + e.message;
        if (follow) toBottom();
        setStatus(e.message, true);
        // Give the words back: the user can send them again without typing them anew.
        if (!input.value.trim()) input.value = text;
      }
    } finally {
      out.classList.remove("pending");
      out.dataset.done = "true";
      controller = null;
      sendBtn.disabled = false;
      stopBtn.disabled = true;
      input.focus();
    }
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (!text.trim() || controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    saveHistory();
    messagesEl.textContent = "";
    setStatus("history cleared");
  });
  $("api_key").addEventListener("change", loadHealth);

  restoreHistory();
  loadHealth();
  input.focus();
})();
