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

// ---- inspect view --------------------------------------------------------------------------
// POST /inspect (this server's, not OpenAI's) runs llm.inspection on the last exchange: the
// prompt as the chat route rendered it, then the reply. Tables and a canvas, nothing else.
const Inspect = {
  last: null,  // the messages of the last exchange, or null
  data: null,  // the server's answer

  remember(messages) {
    this.last = messages;
    $("inspect-button").disabled = !messages;
    if (!messages) {
      $("inspect-body").hidden = true;
      $("inspect-status").textContent = "inspect the last reply once there is one";
    }
  },

  async run() {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...this.last] : this.last;
    $("inspect-button").disabled = true;
    $("inspect-status").textContent = "inspecting…";
    try {
      const response = await fetch("/inspect", {
        method: "POST", headers: headers(), body: JSON.stringify({ messages, top_k: 5 }),
      });
      const data = await response.json();
      if (!response.ok) throw new Error((data.error || {}).message || `HTTP ${response.status}`);
      this.data = data;
      this.draw();
      const shown = data.offset ? `the last ${data.tokens.length} of ${data.total_tokens}`
                                : `${data.total_tokens}`;
      $("inspect-status").textContent = `${shown} tokens (the reply from token ` +
        `${data.prompt_tokens})${data.cut ? `; ${data.cut} past the context left out` : ""}`;
    } catch (e) {
      $("inspect-status").textContent = `[${e.message}]`;
    } finally {
      $("inspect-button").disabled = !this.last;
    }
  },

  draw() {
    const d = this.data;
    $("inspect-body").hidden = false;
    nextTable(d);
    lensTable(d);
    const att = d.attention;
    for (const [id, n] of [["att-layer", att ? att.maps.length : 0],
                           ["att-head", att ? att.maps[0].length : 0]]) {
      $(id).replaceChildren(...Array.from({ length: n }, (_, i) => new Option(String(i), i)));
    }
    drawAttention();
  },
};

// a token as text you can see: spaces and line breaks drawn
const shown = (t) => t.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥");
// probability 0 (white) to 1 (deep blue)
const shade = (p) => `hsl(215, 75%, ${Math.round(100 - 58 * p)}%)`;

function cell(tag, text, p, title) {
  const c = document.createElement(tag);
  c.textContent = text;
  if (p !== undefined) {
    c.style.background = shade(p);
    if (p > 0.55) c.style.color = "#fff";
  }
  if (title) c.title = title;
  return c;
}

function row(cells, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  tr.append(...cells);
  return tr;
}

// One row per token: the token, the one that came after it with its probability and rank,
// and the top alternatives the model gave there.
function nextTable(d) {
  const head = row(["#", "token", "came next", "p", "rank", "the model expected"]
    .map((h) => cell("th", h)));
  const body = document.createElement("tbody");
  for (const pos of d.next_token.positions) {
    const came = pos.next;
    const tops = cell("td", "");
    tops.className = "tops";
    for (const t of pos.top) {
      tops.append(cell("span", `${shown(t.token)} ${t.prob.toFixed(3)}`, t.prob));
    }
    body.append(row([
      cell("td", String(pos.position)),
      cell("td", shown(pos.token)),
      cell("td", came ? shown(came.token) : "", came ? came.prob : undefined),
      cell("td", came ? came.prob.toFixed(3) : ""),
      cell("td", came ? String(came.rank) : ""),
      tops,
    ], pos.position >= d.prompt_tokens ? "reply" : ""));
  }
  const thead = document.createElement("thead");
  thead.append(head);
  $("next-table").replaceChildren(thead, body);
}

// Tokens across, the residual stream's points down; each cell the top next token there.
function lensTable(d) {
  const thead = document.createElement("thead");
  thead.append(row([cell("th", ""), ...d.tokens.map((t, i) => {
    const th = cell("th", shown(t));
    if (d.offset + i >= d.prompt_tokens) th.className = "reply";
    return th;
  })]));
  const body = document.createElement("tbody");
  d.lens.points.forEach((name, p) => {
    body.append(row([cell("th", name), ...d.lens.top[p].map((t, i) =>
      cell("td", shown(t.token), t.prob,
           `${name}, after ${JSON.stringify(d.tokens[i])}: ${JSON.stringify(t.token)} ` +
           `${t.prob.toFixed(3)}`))]));
  });
  $("lens-table").replaceChildren(thead, body);
}

const CELL = 12;  // pixels per attention weight

function drawAttention() {
  const canvas = $("att-canvas");
  const att = Inspect.data && Inspect.data.attention;
  if (!att) {
    canvas.width = canvas.height = 0;
    return;
  }
  const map = att.maps[Number($("att-layer").value)][Number($("att-head").value)];
  const n = map.length;
  canvas.width = canvas.height = n * CELL;
  const ctx = canvas.getContext("2d");
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      ctx.fillStyle = shade(Math.sqrt(map[q][k]));  // square root: small weights still show
      ctx.fillRect(k * CELL, q * CELL, CELL, CELL);
    }
  }
}

$("att-canvas").addEventListener("mousemove", (e) => {
  const att = Inspect.data && Inspect.data.attention;
  if (!att) return;
  const q = Math.floor(e.offsetY / CELL);
  const k = Math.floor(e.offsetX / CELL);
  const map = att.maps[Number($("att-layer").value)][Number($("att-head").value)];
  if (q < map.length && k < map.length) {
    $("att-hover").textContent = `${JSON.stringify(att.tokens[q])} → ` +
      `${JSON.stringify(att.tokens[k])}: ${map[q][k].toFixed(3)}`;
  }
});
$("att-layer").addEventListener("change", drawAttention);
$("att-head").addEventListener("change", drawAttention);
$("inspect-button").addEventListener("click", () => { if (Inspect.last) Inspect.run(); });

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
