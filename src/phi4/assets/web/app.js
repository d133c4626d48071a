// phi4's chat page: talks to the server's OpenAI API (POST /v1/chat/completions, streamed), keeps
// conversations in this browser's localStorage and the API key in this tab's sessionStorage only.
"use strict";

const STORE_KEY = "phi4.chat.v1";
const KEY_KEY = "phi4.apiKey";
const $ = (id) => document.getElementById(id);

const app = {
  config: { model: "", requires_api_key: false, max_stop_sequences: 16, max_model_len: 0 },
  store: { conversations: [], current: null },
  controller: null, // the AbortController of the answer being streamed
};

// ---- storage ------------------------------------------------------------------------------------

function loadStore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    if (saved && Array.isArray(saved.conversations)) app.store = saved;
  } catch (_) { /* a damaged store starts over */ }
  if (!current()) newConversation();
}

function saveStore() {
  localStorage.setItem(STORE_KEY, JSON.stringify(app.store));
}

function current() {
  return app.store.conversations.find((c) => c.id === app.store.current) || null;
}

function newConversation() {
  const conversation = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random()),
                         title: "New chat", messages: [], created: Date.now() };
  app.store.conversations.unshift(conversation);
  app.store.current = conversation.id;
  saveStore();
  return conversation;
}

// ---- the API ------------------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_KEY); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadConfig() {
  for (;;) {
    try {
      const response = await fetch("/ui/config");
      if (response.ok) { app.config = await response.json(); break; }
      setStatus(response.status === 503 ? "The model is loading…" : await errorMessage(response));
    } catch (_) {
      setStatus("Cannot reach the server; retrying…");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  setStatus("");
  $("model-name").textContent = app.config.model;
  $("stop-limit").textContent = `(up to ${app.config.max_stop_sequences})`;
  if (app.config.requires_api_key) await ensureKey();
}

async function keyWorks() {
  if (!apiKey()) return false;
  const response = await fetch("/v1/models", { headers: headers() });
  return response.ok;
}

function ensureKey(message = "") {
  return keyWorks().then((ok) => {
    if (ok) return;
    return new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = message;
      $("api-key").value = "";
      $("key-form").onsubmit = async (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_KEY, $("api-key").value.trim());
        if (await keyWorks()) { dialog.close(); resolve(); }
        else { $("key-error").textContent = "The server refused this key."; }
      };
      dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
      dialog.showModal();
      $("api-key").focus();
    });
  });
}

// One streamed chat completion: calls onUpdate(partial) as deltas arrive; resolves with the whole answer.
async function streamChat(body, signal, onUpdate) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                          body: JSON.stringify(body), signal });
  if (response.status === 401) {
    await ensureKey("The server refused the key.");
    throw new Error("The key was refused; send again.");
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  const answer = { content: "", toolCalls: [], logprobs: [], finishReason: null, usage: null, ttft: null,
                   seconds: 0, chunks: 0 };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the server ended the answer with an error");
        if (chunk.usage) answer.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (answer.ttft === null && (delta.content || delta.tool_calls)) {
            answer.ttft = (performance.now() - started) / 1000;
          }
          if (delta.content) answer.content += delta.content;
          for (const call of delta.tool_calls || []) {
            const slot = answer.toolCalls[call.index] ||= { id: "", type: "function",
                                                             function: { name: "", arguments: "" } };
            if (call.id) slot.id = call.id;
            if (call.function && call.function.name) slot.function.name += call.function.name;
            if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
          }
          if (choice.logprobs && choice.logprobs.content) answer.logprobs.push(...choice.logprobs.content);
          if (choice.finish_reason) answer.finishReason = choice.finish_reason;
        }
        answer.chunks += 1;
        answer.seconds = (performance.now() - started) / 1000;
        onUpdate(answer);
      }
    }
  }
  answer.seconds = (performance.now() - started) / 1000;
  return answer;
}

// ---- settings -----------------------------------------------------------------------------------

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function parseSchema() {
  const text = $("schema").value.trim();
  if (!text) return { value: null };
  try {
    const schema = JSON.parse(text);
    if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
      return { error: "A JSON schema is an object, e.g. {\"type\": \"object\", …}." };
    }
    return { value: schema };
  } catch (error) {
    return { error: `Not JSON: ${error.message}` };
  }
}

function parseTools() {
  const text = $("tools").value.trim();
  if (!text) return { value: null };
  try {
    const tools = JSON.parse(text);
    if (!Array.isArray(tools)) return { error: "Tools are a JSON list." };
    const wrapped = tools.map((tool) => (tool && tool.type === "function" ? tool : { type: "function", function: tool }));
    const unnamed = wrapped.findIndex((tool) => !tool.function || typeof tool.function.name !== "string");
    if (unnamed >= 0) return { error: `Tool ${unnamed + 1} has no function name.` };
    return { value: wrapped };
  } catch (error) {
    return { error: `Not JSON: ${error.message}` };
  }
}

function stopSequences() {
  const stops = $("stop-sequences").value.split("\n").filter((line) => line.length > 0)
    .map((line) => line.replace(/\\n/g, "\n"));
  if (stops.length > app.config.max_stop_sequences) {
    return { error: `At most ${app.config.max_stop_sequences} stop sequences.` };
  }
  return { value: stops };
}

// Check every setting before anything is sent; show what is wrong next to its field.
function validateSettings() {
  const schema = parseSchema(), tools = parseTools(), stop = stopSequences();
  $("schema-error").textContent = schema.error || "";
  $("tools-error").textContent = tools.error || "";
  $("stop-error").textContent = stop.error || "";
  const bad = schema.error || tools.error || stop.error;
  if (bad) {
    openSettings(true);
    setStatus(`Fix the settings first: ${bad}`);
    return null;
  }
  return { schema: schema.value, tools: tools.value, stop: stop.value };
}

function buildRequest(messages, checked) {
  const body = { model: app.config.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const id of ["temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty"]) {
    const value = number(id);
    if (value !== null) body[id] = value;
  }
  // Every request carries a seed, so that any answer can be replayed exactly.
  const seed = number("seed");
  body.seed = seed !== null ? seed : Math.floor(Math.random() * 2 ** 31);
  if (checked.stop.length) body.stop = checked.stop;
  if (checked.schema) {
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: checked.schema, strict: true } };
  }
  if (checked.tools) { body.tools = checked.tools; body.tool_choice = "auto"; }
  if ($("logprobs").checked) { body.logprobs = true; body.top_logprobs = 5; }
  return body;
}

function apiMessages(conversation) {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  for (const message of conversation.messages) {
    if (message.role === "assistant" && !message.content && !(message.tool_calls && message.tool_calls.length)) {
      continue; // an answer stopped before its first token
    }
    const item = { role: message.role, content: message.content };
    if (message.tool_calls && message.tool_calls.length) item.tool_calls = message.tool_calls;
    messages.push(item);
  }
  return messages;
}

// ---- rendering ----------------------------------------------------------------------------------

function setStatus(text) { $("status").textContent = text; }

function markdown(text) {
  const html = window.marked ? window.marked.parse(text) : text;
  const clean = window.DOMPurify ? window.DOMPurify.sanitize(html) : text;
  const holder = document.createElement("div");
  holder.innerHTML = clean;
  if (window.hljs) holder.querySelectorAll("pre code").forEach((block) => window.hljs.highlightElement(block));
  return holder;
}

function tokenSpans(logprobs) {
  const holder = document.createElement("div");
  holder.className = "tokens";
  for (const item of logprobs) {
    const span = document.createElement("span");
    const p = Math.exp(item.logprob);
    span.className = "token";
    span.tabIndex = 0;
    span.textContent = item.token;
    span.style.backgroundColor = `hsl(${Math.round(120 * p)} 70% 50% / 35%)`;
    const alternatives = (item.top_logprobs || [])
      .map((alt) => `${JSON.stringify(alt.token)} ${(100 * Math.exp(alt.logprob)).toFixed(1)}%`).join("\n");
    span.title = `${JSON.stringify(item.token)} ${(100 * p).toFixed(1)}%\n${alternatives}`;
    span.setAttribute("aria-label", `${item.token}, ${(100 * p).toFixed(0)} percent`);
    holder.appendChild(span);
  }
  return holder;
}

function statsText(meta) {
  if (!meta) return "";
  const parts = [];
  if (meta.ttft != null) parts.push(`first token ${meta.ttft.toFixed(2)} s`);
  if (meta.tokensPerSecond != null) parts.push(`${meta.tokensPerSecond.toFixed(1)} tok/s`);
  if (meta.tokens != null) parts.push(`${meta.tokens} tokens`);
  if (meta.finishReason) parts.push(meta.finishReason);
  if (meta.request && meta.request.seed != null) parts.push(`seed ${meta.request.seed}`);
  return parts.join(" · ");
}

function fillContent(element, message) {
  const content = element.querySelector(".content");
  const extras = element.querySelector(".extras");
  content.replaceChildren();
  extras.replaceChildren();
  if (message.role === "user") {
    content.textContent = message.content;
  } else if (message.meta && message.meta.logprobs && message.meta.logprobs.length) {
    content.appendChild(tokenSpans(message.meta.logprobs));
  } else {
    content.appendChild(markdown(message.content || ""));
  }
  for (const call of message.tool_calls || []) {
    const card = document.createElement("div");
    card.className = "tool-call";
    const name = document.createElement("strong");
    name.textContent = `Tool call: ${call.function.name}`;
    const args = document.createElement("pre");
    try { args.textContent = JSON.stringify(JSON.parse(call.function.arguments), null, 2); }
    catch (_) { args.textContent = call.function.arguments; }
    card.append(name, args);
    extras.appendChild(card);
  }
  if (message.meta && message.meta.schema && message.meta.finishReason && !message.meta.streaming) {
    const parsed = document.createElement("pre");
    try {
      parsed.textContent = JSON.stringify(JSON.parse(message.content), null, 2);
      parsed.className = "parsed-json";
      parsed.setAttribute("aria-label", "The answer, parsed as JSON");
    } catch (error) {
      parsed.textContent = `The answer is not valid JSON: ${error.message}`;
      parsed.className = "json-error";
    }
    extras.appendChild(parsed);
  }
  element.querySelector(".stats").textContent = statsText(message.meta);
}

function button(label, handler, title) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  if (title) element.title = title;
  element.addEventListener("click", handler);
  return element;
}

function renderMessages() {
  const conversation = current();
  const list = $("messages");
  list.replaceChildren();
  conversation.messages.forEach((message, index) => {
    const element = $("message-template").content.firstElementChild.cloneNode(true);
    element.classList.add(message.role);
    element.dataset.index = index;
    element.querySelector(".role").textContent = message.role;
    fillContent(element, message);
    const actions = element.querySelector(".message-actions");
    const busy = app.controller !== null;
    if (message.role === "user" && !busy) actions.appendChild(button("Edit", () => editMessage(index)));
    if (message.role === "assistant" && !busy) {
      if (index === conversation.messages.length - 1) actions.appendChild(button("Regenerate", regenerate));
      if (message.meta && message.meta.request) {
        actions.appendChild(button("Replay same seed", () => replay(index),
                                   "Send the same request again with its seed and compare the answers"));
      }
      actions.appendChild(button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(message.content)));
    }
    list.appendChild(element);
  });
  list.scrollTop = list.scrollHeight;
  renderConversationList();
}

function renderConversationList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conversation of app.store.conversations) {
    const item = document.createElement("li");
    if (conversation.id === app.store.current) item.className = "current";
    const open = button(conversation.title || "New chat", () => {
      if (app.controller) return;
      app.store.current = conversation.id;
      saveStore();
      renderMessages();
      toggleSidebar(false);
    });
    open.className = "open";
    if (conversation.id === app.store.current) open.setAttribute("aria-current", "true");
    const remove = button("✕", () => deleteConversation(conversation.id), "Delete this conversation");
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    item.append(open, remove);
    list.appendChild(item);
  }
}

function deleteConversation(id) {
  if (app.controller) return;
  app.store.conversations = app.store.conversations.filter((c) => c.id !== id);
  if (app.store.current === id) app.store.current = app.store.conversations.length ? app.store.conversations[0].id : null;
  if (!current()) newConversation();
  saveStore();
  renderMessages();
}

// ---- actions ------------------------------------------------------------------------------------

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (busy) $("stop").focus();
}

async function generate() {
  const checked = validateSettings();
  if (!checked) return;
  const conversation = current();
  const request = buildRequest(apiMessages(conversation), checked);
  const message = { role: "assistant", content: "", meta: { request, schema: Boolean(checked.schema), streaming: true } };
  conversation.messages.push(message);
  app.controller = new AbortController();
  setBusy(true);
  setStatus("");
  renderMessages();
  const element = $("messages").lastElementChild;
  let pending = false;
  try {
    const answer = await streamChat(request, app.controller.signal, (partial) => {
      message.content = partial.content;
      message.tool_calls = partial.toolCalls.length ? partial.toolCalls : undefined;
      Object.assign(message.meta, { ttft: partial.ttft, logprobs: partial.logprobs });
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => { pending = false; fillContent(element, message); });
      }
    });
    finish(message, answer);
  } catch (error) {
    if (error.name === "AbortError") {
      message.meta.finishReason = "stopped";
    } else {
      message.meta.finishReason = "error";
      setStatus(error.message);
      if (!message.content && !message.tool_calls) conversation.messages.pop(); // nothing to keep
    }
  } finally {
    message.meta.streaming = false;
    app.controller = null;
    setBusy(false);
    if (conversation.title === "New chat" && conversation.messages.length) {
      conversation.title = conversation.messages[0].content.slice(0, 40) || "New chat";
    }
    saveStore();
    renderMessages();
    $("composer-input").focus();
  }
}

function finish(message, answer) {
  const tokens = answer.usage ? answer.usage.completion_tokens : answer.logprobs.length || null;
  const decoding = answer.ttft != null ? answer.seconds - answer.ttft : null;
  Object.assign(message.meta, {
    ttft: answer.ttft, tokens, finishReason: answer.finishReason, logprobs: answer.logprobs,
    tokensPerSecond: tokens && decoding > 0 ? (tokens - 1) / decoding : null,
  });
  message.content = answer.content;
  message.tool_calls = answer.toolCalls.length ? answer.toolCalls : undefined;
}

function send(text) {
  if (app.controller || !validateSettings()) return false; // the question waits in the box until they are fixed
  const conversation = current();
  conversation.messages.push({ role: "user", content: text });
  saveStore();
  generate();
  return true;
}

function regenerate() {
  const conversation = current();
  if (conversation.messages.length && conversation.messages.at(-1).role === "assistant") conversation.messages.pop();
  generate();
}

function editMessage(index) {
  const conversation = current();
  const element = $("messages").children[index];
  const content = element.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.value = conversation.messages[index].content;
  editor.setAttribute("aria-label", "Edit the message");
  editor.rows = Math.min(10, editor.value.split("\n").length + 1);
  const actions = element.querySelector(".message-actions");
  actions.replaceChildren(
    button("Save and resend", () => {
      conversation.messages = conversation.messages.slice(0, index);
      conversation.messages.push({ role: "user", content: editor.value });
      saveStore();
      generate();
    }),
    button("Cancel", renderMessages),
  );
  content.replaceChildren(editor);
  editor.focus();
}

// Send an answer's request again, seed included, and say whether the new answer is the same.
async function replay(index) {
  const message = current().messages[index];
  const element = $("messages").children[index];
  const result = element.querySelector(".replay-result");
  result.className = "replay-result";
  result.textContent = `Replaying with seed ${message.meta.request.seed}…`;
  app.controller = new AbortController();
  setBusy(true);
  try {
    const answer = await streamChat(message.meta.request, app.controller.signal, () => {});
    const same = answer.content === message.content &&
      JSON.stringify(answer.toolCalls.map((c) => c.function)) ===
      JSON.stringify((message.tool_calls || []).map((c) => c.function));
    result.classList.add(same ? "same" : "different");
    result.textContent = same
      ? `Replayed with seed ${message.meta.request.seed}: identical answer ✓`
      : `Replayed with seed ${message.meta.request.seed}: the answer differs ✗`;
  } catch (error) {
    result.textContent = error.name === "AbortError" ? "Replay stopped." : `Replay failed: ${error.message}`;
  } finally {
    app.controller = null;
    setBusy(false);
  }
}

function exportConversation() {
  const conversation = current();
  const blob = new Blob([JSON.stringify({ model: app.config.model, title: conversation.title,
                                          messages: apiMessages(conversation) }, null, 2)],
                        { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${(conversation.title || "chat").replace(/[^\w-]+/g, "_").slice(0, 40)}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function openSettings(open) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

function toggleSidebar(open) {
  $("sidebar").classList.toggle("open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

// Settings persist in this browser, like the conversations.
const SETTING_IDS = ["system", "temperature", "top_p", "max_tokens", "seed", "frequency_penalty", "presence_penalty",
                     "stop-sequences", "schema", "tools"];

function restoreSettings() {
  const saved = JSON.parse(localStorage.getItem(`${STORE_KEY}.settings`) || "{}");
  for (const id of SETTING_IDS) if (saved[id] !== undefined) $(id).value = saved[id];
  $("logprobs").checked = Boolean(saved.logprobs);
  const remember = () => {
    const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
    values.logprobs = $("logprobs").checked;
    localStorage.setItem(`${STORE_KEY}.settings`, JSON.stringify(values));
  };
  for (const id of [...SETTING_IDS, "logprobs"]) $(id).addEventListener("change", remember);
  for (const id of ["schema", "tools", "stop-sequences"]) $(id).addEventListener("input", validateSettingsQuietly);
}

function validateSettingsQuietly() {
  const schema = parseSchema(), tools = parseTools(), stop = stopSequences();
  $("schema-error").textContent = schema.error || "";
  $("tools-error").textContent = tools.error || "";
  $("stop-error").textContent = stop.error || "";
}

function wireEvents() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("composer-input").value;
    if (!text.trim() || app.controller) return;
    if (send(text)) $("composer-input").value = "";
  });
  $("composer-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => app.controller && app.controller.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && app.controller) app.controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    if (app.controller) return;
    newConversation();
    renderMessages();
    $("composer-input").focus();
  });
  $("export").addEventListener("click", exportConversation);
  $("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
  $("toggle-sidebar").addEventListener("click", () => toggleSidebar(!$("sidebar").classList.contains("open")));
}

async function main() {
  loadStore();
  restoreSettings();
  wireEvents();
  renderMessages();
  await loadConfig();
  document.body.dataset.ready = "true";
  $("composer-input").focus();
}

main();
