// The chat tab: a multi-turn conversation streamed from /v1/chat/completions, with images, audio files,
// microphone recordings and tool calls. `history` is exactly what the next request sends (after the system
// prompt); the page shows it, plus errors that are not part of it.

import { ApiError, dataURL, model, request, sseEvents } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { recordButton } from "./recorder.js";

const ADAPTER_HEADER = "x-phi4mm-adapter";

const $ = (id) => document.getElementById(id);
const history = [];
let attachments = []; // {kind: "image" | "audio", name, mime, url (a data: URL)}
let controller = null; // the AbortController of the reply being streamed
let recording = null; // the Record button's state

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollToEnd() {
  window.scrollTo({ top: document.body.scrollHeight });
}

// ------------------------------------------------------------------------------------------------ attachments
function formatOf(name, mime) {
  const ext = (name.split(".").pop() || "").toLowerCase();
  if (ext && ext !== name.toLowerCase()) return ext;
  return (mime.split("/")[1] || "wav").split(";")[0];
}

async function addFiles(files) {
  for (const file of files) {
    const isImage = file.type.startsWith("image/");
    const isAudio = file.type.startsWith("audio/") || file.type === "video/webm";
    if (!isImage && !isAudio) {
      showError(`${file.name || "the file"} is neither an image nor audio (type ${file.type || "unknown"}); ` +
                "attach images (png, jpeg, ...) or audio (wav, flac, mp3, ogg, webm)");
      continue;
    }
    attachments.push({ kind: isImage ? "image" : "audio", name: file.name || "pasted", mime: file.type,
                       url: await dataURL(file) });
  }
  renderAttachments();
}

function mediaNode(item) {
  if (item.kind === "image") {
    const img = el("img");
    img.src = item.url;
    img.alt = item.name;
    return img;
  }
  const audio = el("audio");
  audio.controls = true;
  audio.src = item.url;
  audio.title = item.name;
  return audio;
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(...attachments.map((item, i) => {
    const li = el("li");
    li.dataset.kind = item.kind;
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => {
      attachments.splice(i, 1);
      renderAttachments();
      $("prompt").focus();
    });
    li.append(mediaNode(item), el("span", "muted", item.name), remove);
    return li;
  }));
}

// ------------------------------------------------------------------------------------------------ messages
function showError(message) {
  const li = el("li", "msg error");
  li.setAttribute("role", "alert");
  li.append(el("div", "role", "error"), el("div", "content", message));
  $("messages").append(li);
  scrollToEnd();
  return li;
}

function messageNode(role) {
  const li = el("li", `msg ${role}`);
  li.append(el("div", "role", role), el("div", "content"));
  $("messages").append(li);
  return li;
}

function renderUser(text, items) {
  const li = messageNode("user");
  if (items.length) {
    const media = el("div", "media");
    media.append(...items.map(mediaNode));
    li.insertBefore(media, li.querySelector(".content"));
  }
  li.querySelector(".content").textContent = text;
  return li;
}

/** Tool calls as cards, each with a box for its result; "Send results" continues the conversation. */
function renderToolCalls(li, calls) {
  const cards = el("div", "tool-cards");
  const boxes = calls.map((call) => {
    const card = el("div", "tool-card");
    card.dataset.name = call.function.name;
    let args = call.function.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // not JSON: shown as the model wrote it
    }
    const box = el("textarea");
    box.rows = 2;
    box.placeholder = `The result of ${call.function.name}, e.g. {"status": "ok"}`;
    box.setAttribute("aria-label", `Result of ${call.function.name}`);
    card.append(el("h3", "", `${call.function.name}()`), el("pre", "", args), box);
    cards.append(card);
    return box;
  });
  const send = el("button", "primary", "Send results");
  send.type = "button";
  send.addEventListener("click", () => {
    if (controller) return;
    calls.forEach((call, i) => {
      history.push({ role: "tool", tool_call_id: call.id, content: boxes[i].value || "(no result)" });
      const tool = messageNode("tool");
      tool.querySelector(".content").textContent = boxes[i].value || "(no result)";
      tool.querySelector(".role").textContent = `tool: ${call.function.name}`;
      boxes[i].disabled = true;
    });
    send.disabled = true;
    reply();
  });
  cards.append(send);
  li.append(cards);
}

// ------------------------------------------------------------------------------------------------ requests
function readTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    throw new ApiError(0, `the tools box is not valid JSON (${e.message}); paste a JSON list of function definitions`);
  }
  if (!Array.isArray(tools)) tools = [tools];
  return tools;
}

function readNumber(id, name, min) {
  const value = Number($(id).value);
  if ($(id).value === "" || !Number.isFinite(value) || value < min) {
    throw new ApiError(0, `${name} must be a number of at least ${min}; got ${JSON.stringify($(id).value)}`);
  }
  return value;
}

function buildRequest() {
  const system = $("system").value.trim();
  const body = {
    model: null,
    messages: system ? [{ role: "system", content: system }, ...history] : [...history],
    stream: true,
    stream_options: { include_usage: true },
    temperature: readNumber("temperature", "temperature", 0),
    max_tokens: Math.round(readNumber("max-tokens", "max tokens", 1)),
  };
  const tools = readTools();
  if (tools) body.tools = tools;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

/** Stream one assistant reply for the current history into a new message. */
async function reply() {
  let body;
  try {
    body = buildRequest();
    body.model = await model();
  } catch (e) {
    showError(e.message);
    return false;
  }
  const li = messageNode("assistant");
  li.classList.add("streaming");
  const content = li.querySelector(".content");
  const stats = el("div", "stats");
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null;
  let text = "";
  let usage = null;
  let finish = null;
  const calls = [];
  let adapter = "";
  let failure = null;
  try {
    const response = await request("/v1/chat/completions", { json: body, signal: controller.signal });
    adapter = response.headers.get(ADAPTER_HEADER) || "";
    for await (const event of sseEvents(response)) {
      if (event.error) throw new ApiError(500, event.error.message || JSON.stringify(event.error));
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          first ??= performance.now();
          text += delta.content;
          content.replaceChildren(renderMarkdown(text));
        }
        for (const call of delta.tool_calls || []) {
          first ??= performance.now();
          const slot = (calls[call.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
          if (call.id) slot.id = call.id;
          if (call.function?.name) slot.function.name += call.function.name;
          if (call.function?.arguments) slot.function.arguments += call.function.arguments;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        scrollToEnd();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failure = e.message || String(e);
  }
  li.classList.remove("streaming");
  controller = null;
  setBusy(false);
  if (failure && !text && !calls.length) {
    li.remove();
    showError(failure);
    return false;
  }
  const message = { role: "assistant", content: text || (calls.length ? null : "") };
  if (calls.length) message.tool_calls = calls;
  history.push(message);
  if (calls.length) renderToolCalls(li, calls);
  if (!text && !calls.length) content.textContent = "(empty reply)";
  stats.textContent = describe({ adapter, t0, first, end: performance.now(), usage, finish, streamed: !!text });
  li.append(stats);
  li.dataset.finish = finish || "";
  li.dataset.done = "true";
  if (failure) showError(failure); // mid-stream: the partial reply stays in the conversation
  scrollToEnd();
  return true;
}

/** "adapter vision · 12.5 tokens/s · first token 0.31 s · 20 tokens · (stop)". The rate counts the tokens after
 * the first over the time after it; a reply that is only tool calls arrives in one piece, so it has no rate. */
function describe({ adapter, t0, first, end, usage, finish, streamed }) {
  const parts = [`adapter ${adapter || "unknown"}`];
  const n = usage?.completion_tokens;
  if (streamed && first !== null && n > 1 && end > first) {
    parts.push(`${((n - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (first !== null) parts.push(`first token ${((first - t0) / 1000).toFixed(2)} s`);
  if (n !== undefined) parts.push(`${n} tokens`);
  if (finish) parts.push(`(${finish})`);
  return parts.join(" · ");
}

async function send(event) {
  event?.preventDefault();
  if (controller) return;
  if (recording.active()) {
    showError("stop the recording first (the Record button), then send");
    return;
  }
  const text = $("prompt").value.trim();
  if (!text && !attachments.length) return;
  const items = attachments;
  const parts = [];
  for (const item of items) {
    if (item.kind === "image") {
      parts.push({ type: "image_url", image_url: { url: item.url } });
    } else {
      // OpenAI's input_audio: base64 of the file's bytes and its format.
      const data = item.url.slice(item.url.indexOf(",") + 1);
      parts.push({ type: "input_audio", input_audio: { data, format: formatOf(item.name, item.mime) } });
    }
  }
  if (text) parts.push({ type: "text", text });
  history.push({ role: "user", content: items.length ? parts : text });
  const li = renderUser(text, items);
  $("prompt").value = "";
  attachments = [];
  renderAttachments();
  const ok = await reply();
  if (!ok) {
    // The server refused the turn (or it failed before any output): it is not part of the conversation.
    history.pop();
    li.classList.add("failed");
    li.querySelector(".role").textContent = "user (not sent)";
  }
  $("prompt").focus();
}

function stop() {
  controller?.abort();
}

function newChat() {
  stop();
  history.length = 0;
  $("messages").replaceChildren();
  $("prompt").focus();
}

export function initChat() {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", async (e) => {
    await addFiles([...e.target.files]);
    e.target.value = "";
  });
  recording = recordButton($("record"), async (file) => {
    await addFiles([file]);
    $("prompt").focus();
  }, showError);
  $("prompt").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  const zone = $("chat");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    $("composer").classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    $("composer").classList.remove("dragging");
    addFiles([...e.dataTransfer.files]);
  });
}
