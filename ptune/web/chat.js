// The chat page: keeps the conversation in memory and streams each reply from /v1/chat/completions.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  const statusEl = $("status"), modelEl = $("model");
  const settings = ["system", "temperature", "top_p", "max_tokens", "api_key"];
  let history = [];        // [{role, content}] of finished turns
  let controller = null;   // AbortController of the reply being streamed

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

  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    el.textContent = text;  // text only: a reply can never inject markup
    messagesEl.appendChild(el);
    el.scrollIntoView({ block: "end" });
    return el;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body.error && body.error.message) return body.error.message;
      if (typeof body.detail === "string") return body.detail;
      return JSON.stringify(body);
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  async function loadHealth() {
    try {
      const r = await fetch("/health", { headers: headers() });
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

    addMessage("user", text);
    const out = addMessage("assistant", "");
    out.classList.add("pending");
    out.dataset.chunks = "0";
    let reply = "", finish = null;
    controller = new AbortController();
    sendBtn.disabled = true;
    stopBtn.disabled = false;
    setStatus("generating…");
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
      });
      if (!r.ok) throw new Error(await errorText(r));
      for await (const data of sseEvents(r.body)) {
        if (data === "[DONE]") break;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          out.textContent = reply;
          out.dataset.chunks = String(parseInt(out.dataset.chunks, 10) + 1);
          out.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      history.push({ role: "user", content: text }, { role: "assistant", content: reply });
      setStatus(finish === "length" ? "stopped at the token limit" : "");
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus("stopped; this turn is not kept in the history");
      } else {
        out.classList.add("error");
        out.textContent = reply + (reply ? "\n" : "") + "[error] " + e.message;
        setStatus(e.message, true);
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
    messagesEl.textContent = "";
    setStatus("history cleared");
  });
  $("api_key").addEventListener("change", loadHealth);

  loadHealth();
  input.focus();
})();
