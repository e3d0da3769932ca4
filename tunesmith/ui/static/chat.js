// The chat page: models from /api/tags, answers streamed from the server's own /api/chat (NDJSON, one JSON
// object per line), the model's thinking shown apart from its answer.
"use strict";

// Thinking written inline: `<think>…</think>answer` (Qwen3 style), or `…</think>answer` when the template
// already opened the tag (DeepSeek-R1 style). Until the closing tag arrives, everything is still thinking.
function splitThink(text) {
  const OPEN = "<think>", CLOSE = "</think>";
  const trimmed = text.trimStart();
  if (trimmed.startsWith(OPEN)) {
    const rest = trimmed.slice(OPEN.length);
    const end = rest.indexOf(CLOSE);
    return end < 0 ? { thinking: rest, content: "" }
                   : { thinking: rest.slice(0, end), content: rest.slice(end + CLOSE.length).trimStart() };
  }
  const end = text.indexOf(CLOSE);
  if (end >= 0) return { thinking: text.slice(0, end), content: text.slice(end + CLOSE.length).trimStart() };
  return { thinking: "", content: text };
}

// Calls `onChunk` with each object of an NDJSON body as it arrives; a line split across reads is joined.
async function readNdjson(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) onChunk(JSON.parse(line));
    }
    if (done) break;
  }
  if (buffer.trim()) onChunk(JSON.parse(buffer));
}

(function () {
  const select = document.getElementById("model");
  if (!select) return;
  const conversation = document.getElementById("conversation");
  const prompt = document.getElementById("prompt");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const status = document.getElementById("chat-status");
  let history = [];
  let controller = null;

  function element(tag, className, text, parent) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    if (parent) parent.appendChild(el);
    return el;
  }

  async function loadModels() {
    try {
      const response = await fetch("/api/tags", { cache: "no-store" });
      const models = (await response.json()).models || [];
      const wanted = select.dataset.selected;
      for (const model of models) element("option", "", model.name, select).value = model.name;
      if (wanted && models.some((m) => m.name === wanted)) select.value = wanted;
      status.textContent = models.length ? "" : "No models in the store yet: `tunesmith create NAME -f Modelfile`.";
      send.disabled = !models.length;
    } catch (error) {
      status.textContent = `Could not list the models: ${error}`;
    }
  }

  function options() {
    const out = {};
    const temperature = document.getElementById("temperature").value;
    const numPredict = document.getElementById("num-predict").value;
    if (temperature !== "") out.temperature = Number(temperature);
    if (numPredict !== "") out.num_predict = Number(numPredict);
    return out;
  }

  function bubble(role) {
    const box = element("div", `msg ${role}`, undefined, conversation);
    element("span", "role", role === "user" ? "you" : select.value, box);
    return box;
  }

  async function ask(text) {
    history.push({ role: "user", content: text });
    element("div", "content", text, bubble("user"));
    const box = bubble("assistant");
    const details = element("details", "thinking", undefined, box);
    details.open = true;
    element("summary", "", "thinking", details);
    const thinkingText = element("div", "thinking-text", "", details);
    details.hidden = true;
    const answer = element("div", "content", "", box);

    const system = document.getElementById("system").value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
    let thinking = "", raw = "", final = null;
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    status.textContent = "";
    try {
      // On a server with an API key the page carries a token that proves the request comes from this UI.
      const csrf = document.querySelector('meta[name="tunesmith-csrf"]');
      const headers = { "Content-Type": "application/json" };
      if (csrf) headers["X-Tunesmith-CSRF"] = csrf.content;
      const response = await fetch("/api/chat", {
        method: "POST", headers, signal: controller.signal,
        body: JSON.stringify({ model: select.value, messages, options: options(), stream: true }),
      });
      if (!response.ok) {
        const body = await response.text();
        let message = body;
        try { message = JSON.parse(body).error || body; } catch (e) { /* not JSON: show it as it is */ }
        throw new Error(`${response.status}: ${message}`);
      }
      await readNdjson(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error);
        // The server splits thinking for models whose template declares it (message.thinking); other
        // models may still write <think> tags into the content, which are split here.
        thinking += (chunk.message && chunk.message.thinking) || "";
        raw += (chunk.message && chunk.message.content) || "";
        const inline = splitThink(raw);
        const allThinking = (thinking + inline.thinking).trimStart();
        thinkingText.textContent = allThinking;
        details.hidden = !allThinking;
        answer.textContent = inline.content;
        if (chunk.done) final = chunk;
      });
      history.push({ role: "assistant", content: splitThink(raw).content });
      if (final) {
        const seconds = (final.eval_duration || 0) / 1e9;
        const rate = seconds ? ` · ${(final.eval_count / seconds).toFixed(1)} tokens/s` : "";
        element("span", "stats", `${final.eval_count || 0} tokens${rate} · ${final.done_reason || "stop"}`, box);
      }
      box.dataset.done = "true";
    } catch (error) {
      history.pop();  // the question goes unanswered: asking again should not send it twice
      element("span", "error", error.name === "AbortError" ? "stopped" : String(error.message || error), box);
      box.dataset.done = "error";
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
    }
  }

  document.getElementById("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller || !select.value) return;
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      document.getElementById("ask").requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    conversation.replaceChildren();
  });
  loadModels();
})();
