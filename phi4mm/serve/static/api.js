// Talking to the server: the API key (asked for once, on a 401), readable errors, SSE, uploads with progress.

const KEY_STORAGE = "phi4mm.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function setApiKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

// Only one key dialog at a time: concurrent requests that hit 401 wait for the same answer.
let pendingKey = null;

function askKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  pendingKey = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      pendingKey = null;
      const key = input.value.trim();
      if (dialog.returnValue === "ok" && key) {
        setApiKey(key);
        resolve(key);
      } else {
        resolve(null);
      }
    }, { once: true });
  });
  // Enter in the box submits with "ok" (the form's only submit button); Cancel and Escape close without a key.
  document.getElementById("key-cancel").onclick = () => dialog.close("cancel");
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
  return pendingKey;
}

/** The message of an error response: OpenAI's {"error": {"message": ...}} body, or its text, or the status. */
export async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body could not be read: fall back to the status line
  }
  try {
    const body = JSON.parse(text);
    const err = body.error || body;
    if (err && typeof err.message === "string") return err.message;
    if (typeof err.detail === "string") return err.detail;
  } catch {
    // not JSON
  }
  const snippet = text.trim().slice(0, 300);
  const status = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  return snippet ? `${status}: ${snippet}` : status;
}

/**
 * Send a request with the key; on 401 ask the user for a key and try again (until they cancel).
 * `send(headers)` returns a Response. Resolves to an OK Response, or throws ApiError with the server's message.
 */
async function withKey(send) {
  for (;;) {
    const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
    const response = await send(headers);
    if (response.ok) return response;
    const message = await errorMessage(response);
    if (response.status !== 401) throw new ApiError(response.status, message);
    const key = await askKey(message);
    if (key === null) throw new ApiError(401, message);
  }
}

/** fetch() with the API key and readable errors. `json` is sent as a JSON body. */
export function request(path, { method = "POST", json, body, signal } = {}) {
  return withKey((auth) => {
    const headers = { ...auth };
    if (json !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, { method, headers, signal, body: json !== undefined ? JSON.stringify(json) : body });
  });
}

/** POST a FormData with upload progress (fetch cannot report it): onProgress(fraction sent). */
export function upload(path, form, onProgress) {
  return withKey((auth) => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(auth)) xhr.setRequestHeader(k, v);
    xhr.responseType = "blob";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.upload.onload = () => onProgress(1);
    xhr.onload = () => resolve(new Response(xhr.response, {
      status: xhr.status, headers: { "Content-Type": xhr.getResponseHeader("Content-Type") || "" },
    }));
    xhr.onerror = () => reject(new ApiError(0, "the server could not be reached (is `phi4mm serve` running?)"));
    xhr.send(form);
  }));
}

/** The server-sent events of a streamed response, parsed from JSON; stops at [DONE]. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

let modelName = null;

/** The served model's name (the first of GET /v1/models), fetched once. */
export async function model() {
  if (!modelName) {
    const response = await request("/v1/models", { method: "GET" });
    const body = await response.json();
    modelName = body.data[0].id;
    document.getElementById("model-name").textContent = modelName;
  }
  return modelName;
}

/** A File or Blob as a data: URL. */
export function dataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
