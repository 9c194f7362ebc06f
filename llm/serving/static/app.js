// The chat page of `llm serve`: plain JavaScript, no build step, nothing fetched but this
// server's own API. Replies stream from /v1/chat/completions as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} sent with every request
let controller = null;    // aborts the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function settings() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value) || 128,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Each `data:` line of the stream is one JSON chunk; `data: [DONE]` ends it.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// The request for the conversation so far; past the context, the earliest whole exchanges
// are dropped (as `llm chat` does) and the request is sent again, saying so in the status.
async function request(signal) {
  for (;;) {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...conversation]
                            : conversation;
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true },
                             ...settings() }),
      signal,
    });
    if (response.ok) return response;
    const err = await response.json().catch(() => ({}));
    const error = err.error || {};
    if (error.code === "context_length_exceeded" && conversation.length > 2) {
      conversation.splice(0, 2);  // the earliest user turn and its reply
      dropped = true;
      continue;
    }
    throw new Error(error.message || `HTTP ${response.status}`);
  }
}

let dropped = false;  // earliest turns were dropped to fit the context

async function send(text) {
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  controller = new AbortController();
  busy(true);
  $("status").textContent = "";
  let finish = null;
  let usage = null;
  try {
    const response = await request(controller.signal);
    for await (const chunk of sse(response)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) reply.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      reply.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.classList.add("error");
      reply.textContent += `${reply.textContent ? "\n" : ""}[${e.message}]`;
      conversation.pop();  // the turn was not taken
    } else {
      finish = "stopped";
    }
  } finally {
    reply.classList.remove("streaming");
    controller = null;
    busy(false);
  }
  if (!reply.classList.contains("error")) {
    conversation.push({ role: "assistant", content: reply.textContent });
    Inspect.remember(conversation.slice());
  }
  const note = dropped ? " (earliest turns dropped to fit the context)" : "";
  $("status").textContent = finish ? `finish_reason: ${finish}${note}` : "";
  if (usage) {
    $("usage").textContent =
      `last reply: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
  }
}

function reset() {
  if (controller) controller.abort();
  conversation.length = 0;
  dropped = false;
  $("messages").replaceChildren();
  $("status").textContent = "new conversation";
  $("usage").textContent = "";
  Inspect.remember(null);
}

// ---- inspect view (reserved) -------------------------------------------------------------
// `llm inspect` (llm.inspection) will give the last reply's next-token view, logit lens and
// attention; its panel is #inspect. Until the server offers it, the panel stays hidden.
const Inspect = {
  last: null,
  remember(messages) { this.last = messages; },
};

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", reset);

fetch("/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `model: ${h.model}`;
}).catch(() => { $("model").textContent = "server unreachable"; });
