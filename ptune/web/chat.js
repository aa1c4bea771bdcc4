// The chat page: keeps the conversation in memory and streams each reply from /v1/chat/completions.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const messagesEl = $("messages"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  const statusEl = $("status"), modelEl = $("model"), hintEl = $("hint");
  const settings = ["system", "temperature", "top_p", "max_tokens", "api_key"];
  let history = [];        // [{role, content}] of finished turns: a question, its answer, the next question…
  let turnEls = [];        // [question element, answer element] of each turn in the history, oldest first
  let leftOut = [];        // [{role, content}] of the turns left out for length: shown faded, never sent
  let controller = null;   // AbortController of the reply being streamed
  const HISTORY_KEY = "ptune.history";  // a reload (or a slip of F5) must not lose the conversation
  const LEFT_OUT_KEY = "ptune.leftOut";  // nor show the turns left out for length as if the model saw them
  const ASKED_KEY = "ptune.asked";  // nor the question whose reply it cut short: kept until the reply is done
  let leaving = false;  // the page is being unloaded: a reply cut short by it leaves its question for the next page

  for (const id of settings) {  // settings live in this tab only
    const saved = sessionStorage.getItem("ptune." + id);
    if (saved !== null) $(id).value = saved;
    // On each keystroke too: `change` waits for the field to be left, and a reload before that lost the value.
    for (const type of ["input", "change"]) {
      $(id).addEventListener(type, () => sessionStorage.setItem("ptune." + id, $(id).value));
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api_key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // What is wrong with the key, if a header cannot carry it (null where it can). fetch throws on a header value
  // past Latin-1 (a pasted curly apostrophe) or holding a line break, before any request: that read as a server
  // out of reach.
  function keyProblem() {
    const key = $("api_key").value.trim();
    const at = key.search(/[^\x01-\x09\x0b\x0c\x0e-\xff]/);
    if (at < 0) return null;
    const code = key.codePointAt(at).toString(16).toUpperCase().padStart(4, "0");
    return "the API key holds a character a header cannot carry (U+" + code + ", character " + (at + 1)
      + "): retype it under Settings";
  }

  const KEY_REFUSED = "the server needs an API key, or refused this one: enter it under Settings";
  const UNREACHABLE = "cannot reach the server";

  // `healthClears`: the line is about the key or about reaching the server, which /health answering puts right.
  function setStatus(text, isError, healthClears) {
    statusEl.textContent = text || "";
    statusEl.classList.toggle("error", !!isError);
    statusEl.dataset.healthClears = healthClears ? "true" : "";
  }

  // Follow a growing reply only while the user is at the bottom: one who scrolled up to read stays there.
  function atBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 30;
  }

  function toBottom() { messagesEl.scrollTop = messagesEl.scrollHeight; }

  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    el.dir = "auto";  // right-to-left text (Arabic, Hebrew) laid out as such, its punctuation at its end
    el.textContent = text;  // text only: a reply can never inject markup
    messagesEl.appendChild(el);
    return el;
  }

  // A reply with no text (the model ended it at once, or Stop came before its first word) would be an empty
  // bubble: it says so instead.
  function markEmpty(el, why) {
    const marker = document.createElement("span");
    marker.className = "marker";
    marker.textContent = why || "(empty reply)";
    el.textContent = "";
    el.appendChild(marker);
    el.classList.add("empty");
  }

  function keepTurn(question, answer, questionEl, answerEl) {
    history.push({ role: "user", content: question }, { role: "assistant", content: answer });
    turnEls.push([questionEl, answerEl]);
  }

  function notKept(els, why) {
    for (const el of els) {
      el.classList.add("dropped");
      el.title = "not in the history: " + why;
    }
  }

  // The oldest `n` turns leave the history (the server refused the conversation as too long): they stay on
  // the page, faded, under a note that says the model no longer sees them.
  function leaveOut(n) {
    const gone = turnEls.splice(0, n);
    leftOut.push(...history.splice(0, 2 * n));
    saveHistory();
    showLeftOut(gone);
  }

  function showLeftOut(gone) {
    const why = "the conversation grew too long for the model, which no longer sees this turn";
    for (const els of gone) notKept(els, why);
    let note = $("left-out");
    if (!note) {
      note = document.createElement("div");
      note.id = "left-out";
      note.className = "note";
      note.textContent = "↑ left out: the conversation grew too long for the model, which no longer sees the "
        + "turns above";
    }
    gone[gone.length - 1][1].after(note);
  }

  function hint(text) {
    hintEl.textContent = text || "";
    hintEl.hidden = !text;
  }

  function saveHistory() {
    try {
      sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history));
      sessionStorage.setItem(LEFT_OUT_KEY, JSON.stringify(leftOut));
    } catch (e) { /* storage full: memory only */ }
  }

  // Question-and-answer pairs of a stored list; an empty answer (an older page kept those) is skipped.
  function storedTurns(key) {
    let saved = [];
    try { saved = JSON.parse(sessionStorage.getItem(key) || "[]"); } catch (e) { /* unreadable: none */ }
    if (!Array.isArray(saved)) return [];
    const is = (m, role) => m && m.role === role && typeof m.content === "string";
    const pairs = [];
    for (let i = 0; i + 1 < saved.length; i++) {
      const [q, a] = [saved[i], saved[i + 1]];
      if (!is(q, "user") || !is(a, "assistant")) continue;
      if (a.content.trim()) pairs.push([q.content, a.content]);
      i++;
    }
    return pairs;
  }

  function keepAsked(text) {
    try {
      if (text === null) sessionStorage.removeItem(ASKED_KEY);
      else sessionStorage.setItem(ASKED_KEY, text);
    } catch (e) { /* storage full: a reload would lose it, as before */ }
  }

  // A reply cut short by a reload (or F5 by mistake): its question goes back to the input, to send again.
  function restoreAsked() {
    const asked = sessionStorage.getItem(ASKED_KEY);
    if (asked === null) return;
    keepAsked(null);
    if (!asked.trim() || input.value.trim()) return;
    input.value = asked;
    setStatus("the reply to your last message was interrupted by the reload; your message is back in the input");
  }

  function restoreHistory() {
    const gone = storedTurns(LEFT_OUT_KEY).map(([q, a]) => {
      leftOut.push({ role: "user", content: q }, { role: "assistant", content: a });
      return [addMessage("user", q), addMessage("assistant", a)];
    });
    if (gone.length) showLeftOut(gone);
    for (const [q, a] of storedTurns(HISTORY_KEY)) keepTurn(q, a, addMessage("user", q), addMessage("assistant", a));
    toBottom();
  }

  class Failure extends Error {  // a failure already put in the user's terms
    constructor(message, code, param, details) {
      super(message);
      this.code = code || null;    // the server's error code, e.g. context_length_exceeded
      this.param = param || null;  // the request field it names, e.g. messages or max_tokens
      this.details = details || {};  // the server's whole error object, e.g. its system_too_long
    }
  }

  async function failureOf(response) {
    let message = response.status + " " + response.statusText, code = null, param = null, details = null;
    try {
      const body = await response.json();
      code = body.error && body.error.code;
      param = body.error && body.error.param;
      details = body.error && typeof body.error === "object" ? body.error : null;
      message = (body.error && body.error.message) || (typeof body.detail === "string" && body.detail)
        || JSON.stringify(body);
    } catch (e) { /* not JSON (a proxy's page): the status line says it */ }
    if (response.status === 401) {
      $("settings").open = true;
      return new Failure(KEY_REFUSED, "key_refused");
    }
    if (response.status === 503) {
      message = "the server is busy, try again in a moment (" + message + ")";
    }
    return new Failure(message, code, param, details);
  }

  let healthAgain = null;  // the timer of the next try at /health while the server cannot be reached

  async function loadHealth() {
    clearTimeout(healthAgain);
    const bad = keyProblem();
    if (bad) {
      modelEl.textContent = bad;
      modelEl.classList.add("error");
      $("settings").open = true;
      return;
    }
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
      // A refused key's line, or one saying the server is out of reach, is answered now: it would only mislead.
      if (statusEl.dataset.healthClears) setStatus("");
      modelEl.dataset.checkpoint = h.checkpoint || "";
      modelEl.textContent = h.checkpoint
        ? "checkpoint " + h.checkpoint + (h.step !== null && h.step !== undefined ? " (step " + h.step + ")" : "")
        : "base model " + h.base + " (no prefix)";
      modelEl.title = "base " + h.base + ", template " + h.template + ", " + h.device;
      // Empty, the field leaves the reply's length to the server, which also fits it to the model's positions: a
      // number of our own (the field once started at 512) would be refused beside any prompt on a 512-position model.
      $("max_tokens").max = h.max_new_tokens;
      $("max_tokens").placeholder = "server's default (up to " + h.max_new_tokens + ")";
      if (Number($("max_tokens").value) > h.max_new_tokens) $("max_tokens").value = h.max_new_tokens;
    } catch (e) {
      modelEl.textContent = UNREACHABLE + ": " + e;
      modelEl.classList.add("error");
      healthAgain = setTimeout(loadHealth, 5000);  // a server restarted: the page says so once it answers
    }
  }

  // What each number setting takes. Read with Number, not parseInt: "1e2" is 100, and "2.9" is no whole number of
  // tokens (parseInt made them 1 and 2, silently). Max new tokens' top is /health's max_new_tokens (its max).
  const NUMBERS = {
    temperature: { name: "Temperature", min: 0, max: 2, whole: false },
    top_p: { name: "Top-p", min: 0, max: 1, whole: false },
    max_tokens: { name: "Max new tokens", min: 1, max: null, whole: true },
  };

  // A number setting's value; null where the field is empty (the server's default). A value the field does not
  // take is refused by name: sending without it, or with it, would not be what the user asked for.
  function numberOf(id) {
    const el = $(id), rule = NUMBERS[id];
    if (el.value === "" && !el.validity.badInput) return null;  // (badInput: typed, yet no number, as "1e")
    const v = Number(el.value), max = rule.max ?? (el.max === "" ? Infinity : Number(el.max));
    if (!el.validity.badInput && Number.isFinite(v) && v >= rule.min && v <= max && (!rule.whole || Number.isInteger(v))) {
      return v;
    }
    $("settings").open = true;
    throw new Failure(rule.name + ": " + (rule.whole ? "a whole number" : "a number") + " from " + rule.min
      + (max === Infinity ? " up" : " to " + max) + ", or empty for the server's default (under Settings)");
  }

  // The request's settings, or a Failure naming the first field that holds what it does not take.
  function sampling() {
    const request = {};
    for (const id of Object.keys(NUMBERS)) {
      const v = numberOf(id);
      if (v !== null) request[id] = v;
    }
    return request;
  }

  // Server-sent events: "data: <json>" lines, events separated by a blank line. Lines end in "\r\n", "\r" or "\n",
  // as the SSE spec allows (servers and proxies that write CRLF had every reply read as cut off); other fields
  // and ":" comments (keep-alives) are skipped.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (!done) buffer += decoder.decode(value, { stream: true });
      let end;
      // (A "\r" last in the buffer may be the first half of a "\r\n" still to come: it waits for the next read,
      // unless the stream has ended.)
      while ((end = /\r\n|\r|\n/.exec(buffer)) && (done || end[0] !== "\r" || end.index < buffer.length - 1)) {
        const line = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        if (line === "") {  // the event ends
          const event = data.join("\n");
          data = [];
          if (event) yield event;
        } else if (line === "data" || line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));  // (the spec drops one space after the colon)
        }
      }
      if (done) break;
    }
  }

  // A server (or a proxy) that ignores stream: true answers one JSON chat.completion: its message is the reply.
  async function wholeReply(r) {
    let body;
    try {
      body = await r.json();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Failure("the server's reply is not the JSON it said it was (" + e.message + ")");
    }
    if (body && body.error) throw new Failure(body.error.message || JSON.stringify(body.error));
    const choice = body && body.choices && body.choices[0];
    const content = choice && choice.message && choice.message.content;
    if (typeof content !== "string") {
      throw new Failure("the server's reply holds no message: " + JSON.stringify(body).slice(0, 200));
    }
    return { content, finish: choice.finish_reason || null };
  }

  function isJson(response) {
    return /^application\/json\b/i.test(response.headers.get("Content-Type") || "");
  }

  // The request for `text` after the history less its oldest `skip` turns.
  function messagesFor(text, skip) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history.slice(2 * skip), { role: "user", content: text });
    return messages;
  }

  async function post(request) {
    try {
      return await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Failure(UNREACHABLE + " (" + e.message + "): is it still running?", "unreachable");
    }
  }

  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  async function send(text, settings) {
    const request = { messages: null, stream: true, ...settings };
    const asked = addMessage("user", text);
    const out = addMessage("assistant", "");
    toBottom();
    out.classList.add("pending");
    out.dataset.chunks = "0";
    keepAsked(text);
    let reply = "", finish = null, ended = false, notice = "";
    controller = new AbortController();
    sendBtn.disabled = true;
    sendBtn.title = "a reply is still coming: wait for it, or press Stop";
    stopBtn.disabled = false;
    setStatus("generating…");
    try {
      // A conversation past what the server takes is refused whole (400, context_length_exceeded). As the
      // terminal chat does, the oldest turns make room: as many as the refusal says would (its
      // turns_to_leave_out; null: none would), else one more per refusal (a refusal costs the server no
      // generation). The shorter request is checked again, and the history loses them only once one is taken.
      // A refusal without turns_to_leave_out (a reply too long for any prompt, or an older server) means none would.
      const turns = turnEls.length;
      let skip = 0, r;
      for (;;) {
        request.messages = messagesFor(text, skip);
        r = await post(request);
        if (r.ok) break;
        const failure = await failureOf(r);
        controller.signal.throwIfAborted();  // Stop or Clear while the refusal was read: not a failure
        if (failure.code !== "context_length_exceeded") throw failure;
        if (failure.details.system_too_long) {
          // The system message alone leaves no room: leaving turns out would lose them for nothing.
          $("settings").open = true;
          // (The server's message ends "shorten the system message".)
          throw new Failure("the system message is too long for the model: " + failure.message + " under Settings",
                            failure.code, failure.param);
        }
        const fewest = failure.details.turns_to_leave_out ?? null;
        if (fewest !== null && skip < turns) {
          skip = Math.min(turns, skip + (Number.isInteger(fewest) && fewest > 0 ? fewest : 1));
          continue;
        }
        const without = turns ? " (even without the " + plural(turns, "earlier turn") + ")" : "";
        if (failure.param === "max_tokens") {  // the reply asked for is what leaves no room, not the message
          throw new Failure("Max new tokens asks for more than the model has room for" + without + ": "
            + failure.message + "; lower Max new tokens under Settings, or empty it to let the server fit the reply",
                            failure.code, failure.param);
        }
        const fix = $("system").value.trim() ? "shorten your message, or the system message under Settings"
          : "shorten your message";
        throw new Failure("this message is too long for the model" + without + ": " + failure.message + "; " + fix,
                          failure.code, failure.param);
      }
      if (skip) {
        leaveOut(skip);
        notice = "the conversation had grown too long for the model: its oldest " + plural(skip, "turn")
          + (skip === 1 ? " was" : " were") + " left out (faded above), and the model no longer sees "
          + (skip === 1 ? "it" : "them");
        setStatus(notice);
      }
      try {
        if (isJson(r)) {
          ({ content: reply, finish } = await wholeReply(r));
          out.textContent = reply;
          out.dataset.chunks = "1";
          ended = true;
        } else {
          for await (const data of sseEvents(r.body)) {
            if (data.trim() === "[DONE]") { ended = true; break; }
            const event = JSON.parse(data);
            if (event === null || typeof event !== "object") continue;  // ("data: null": no reply in it)
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
        }
      } catch (e) {
        if (e.name === "AbortError" || e instanceof Failure) throw e;
        if (e instanceof SyntaxError) throw new Failure("the server sent an event that is not JSON: " + e.message);
        throw new Failure("the connection to the server was lost in the middle of the reply (" + e.message + ")");
      }
      // Without [DONE] the stream was cut short (a server or proxy that gave up): the reply may be partial.
      if (!ended) throw new Failure("the reply was cut off: the server closed the stream before its end");
      if (!reply.trim()) {
        // Nothing to keep: sent along, an empty answer would only show the model how to answer nothing again.
        markEmpty(out);
        notKept([asked, out], "the reply was empty, so the model will not see this turn");
        const back = !input.value.trim();
        if (back) input.value = text;
        setStatus([notice, "the model gave an empty reply, so this turn is left out of the history"
          + (back ? "; your message is back in the input" : "") + " (reword it, or raise the temperature under "
          + "Settings, and send it again)"].filter(Boolean).join("; "));
      } else {
        keepTurn(text, reply, asked, out);
        saveHistory();
        setStatus([notice, finish === "length" ? "stopped at the token limit" : ""].filter(Boolean).join("; "));
      }
    } catch (e) {
      // The turn is not in the history: say so on it, so the page shows what the model will be sent.
      notKept([asked, out], "the model will not see this turn");
      if (e.name === "AbortError") {
        if (out.isConnected && !reply.trim()) {  // (not after Clear)
          // Nothing came of the turn: as for an empty reply, the bubble says so and the words come back.
          markEmpty(out, "(stopped before any reply)");
          const back = !input.value.trim();
          if (back) input.value = text;
          setStatus("stopped before any reply; this turn is not kept in the history"
            + (back ? "; your message is back in the input" : ""));
        } else if (out.isConnected) {
          setStatus("stopped; this turn is not kept in the history");
        }
      } else {
        const follow = atBottom();
        out.classList.add("error");
        out.textContent = reply + (reply ? "\n" : "") + "[error] " + e.message;
        if (follow) toBottom();
        setStatus(e.message, true, e.code === "key_refused" || e.code === "unreachable");
        if (e.code === "unreachable") loadHealth();  // which tries again until the server answers
        // Give the words back: the user can send them again without typing them anew.
        if (!input.value.trim()) input.value = text;
      }
    } finally {
      if (!leaving) keepAsked(null);  // the turn came to an end here: kept, or its words given back
      out.classList.remove("pending");
      out.dataset.done = "true";
      controller = null;
      sendBtn.disabled = false;
      sendBtn.title = "";
      stopBtn.disabled = true;
      hint("");
      input.focus();
    }
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    if (controller) {  // one reply at a time: the words wait in the input, and the page says so
      hint("The reply is still coming: wait for it to end, or press Stop. Your message stays here until then.");
      return;
    }
    let settings;
    try {
      const bad = keyProblem();
      if (bad) {
        $("settings").open = true;
        throw new Failure(bad);
      }
      settings = sampling();
    } catch (e) {  // nothing sent: the words stay in the input while the field is put right
      setStatus(e.message, true, !!keyProblem());
      return;
    }
    input.value = "";
    send(text, settings);
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
    turnEls = [];
    leftOut = [];
    saveHistory();
    messagesEl.textContent = "";
    setStatus("history cleared");
  });
  $("api_key").addEventListener("change", loadHealth);

  // (pagehide: the reply's stream may fail as the page goes, and the question must outlive that failure.)
  addEventListener("pagehide", () => { leaving = true; });
  addEventListener("pageshow", () => { leaving = false; });  // (back from the browser's page cache)

  restoreHistory();
  restoreAsked();
  loadHealth();
  input.focus();
})();
