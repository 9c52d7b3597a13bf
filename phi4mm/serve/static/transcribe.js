// The transcribe / translate tab: each dropped file is uploaded to /v1/audio/transcriptions (or /translations)
// with its own progress bar; the transcript shows when it arrives, and each download format is the server's own
// rendering of it (response_format), fetched once per format when first asked for.

import { model, upload } from "./api.js";
import { recordButton } from "./recorder.js";

const $ = (id) => document.getElementById(id);
// Download formats: the button's label -> [response_format, file extension, MIME type].
const DOWNLOADS = {
  txt: ["text", "txt", "text/plain"],
  srt: ["srt", "srt", "application/x-subrip"],
  vtt: ["vtt", "vtt", "text/vtt"],
  json: ["verbose_json", "json", "application/json"],
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function stem(name) {
  return name.replace(/\.[^.]+$/, "") || "audio";
}

/** One file's job: its settings are read when it is dropped, so later changes do not mix into it. */
class Job {
  constructor(file) {
    this.file = file;
    this.task = $("task").value;
    this.language = $("language").value.trim();
    this.results = {}; // response_format -> body text
    this.li = el("li", "job");
    this.status = el("p", "muted", "waiting");
    this.progress = el("progress");
    this.progress.max = 1;
    this.progress.value = 0;
    this.progress.setAttribute("aria-label", `Progress of ${file.name}`);
    this.transcript = el("p", "transcript");
    this.buttons = el("div", "row");
    const player = el("audio");
    player.controls = true;
    player.src = URL.createObjectURL(file); // listen to what is being transcribed (a recording, say)
    this.li.append(el("h3", "", `${file.name} (${this.task})`), player, this.progress, this.status,
                   this.transcript, this.buttons);
    $("jobs").append(this.li);
  }

  /** The server's text for one response_format; `progress` shows the upload and then the model's turn. */
  async fetch(format, progress = true) {
    if (this.results[format] !== undefined) return this.results[format];
    const form = new FormData();
    form.append("file", this.file, this.file.name);
    form.append("model", await model());
    form.append("response_format", format);
    if (this.language) form.append("language", this.language);
    const path = this.task === "translate" ? "/v1/audio/translations" : "/v1/audio/transcriptions";
    const response = await upload(path, form, (sent) => {
      if (!progress) return;
      if (sent < 1) {
        this.progress.value = sent;
        this.status.textContent = `uploading ${Math.round(sent * 100)} %`;
      } else {
        this.progress.removeAttribute("value"); // indeterminate while the model runs
        this.status.textContent = this.task === "translate" ? "translating…" : "transcribing…";
      }
    });
    this.results[format] = await response.text();
    return this.results[format];
  }

  async run() {
    this.li.dataset.state = "running";
    try {
      const body = JSON.parse(await this.fetch("verbose_json"));
      this.transcript.textContent = body.text || "(no speech recognised)";
      this.progress.value = 1;
      const seconds = body.duration === undefined ? "" : `${Number(body.duration).toFixed(1)} s of audio, `;
      this.status.textContent = `done: ${seconds}${(body.segments || []).length} segment(s)`;
      this.addDownloads();
      this.li.dataset.state = "done";
    } catch (e) {
      this.progress.value = 0;
      this.status.textContent = e.message || String(e);
      this.status.className = "error";
      this.status.setAttribute("role", "alert");
      this.li.dataset.state = "error";
    }
  }

  addDownloads() {
    for (const [label, [format, ext, mime]] of Object.entries(DOWNLOADS)) {
      const button = el("button", "", `Download ${label}`);
      button.type = "button";
      button.dataset.format = label;
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          const text = await this.fetch(format, false);
          save(new Blob([text], { type: mime }), `${stem(this.file.name)}.${ext}`);
        } catch (e) {
          this.status.textContent = `${label}: ${e.message}`;
          this.status.className = "error";
        } finally {
          button.disabled = false;
        }
      });
      this.buttons.append(button);
    }
  }
}

function save(blob, name) {
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
}

function start(files) {
  // Every file at once: the server decodes their segments side by side in the same batches.
  for (const file of files) new Job(file).run();
}

export function initTranscribe() {
  const zone = $("dropzone");
  const picker = $("audio-files");
  zone.addEventListener("click", () => picker.click());
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      picker.click();
    }
  });
  picker.addEventListener("change", () => {
    start([...picker.files]);
    picker.value = "";
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    start([...e.dataTransfer.files]);
  });
  recordButton($("transcribe-record"), (file) => start([file]), (message) => {
    const li = el("li", "job error", message);
    li.setAttribute("role", "alert");
    $("jobs").append(li);
  });
  $("task").addEventListener("change", () => {
    const translate = $("task").value === "translate";
    $("language-label").textContent = translate ? "Target language" : "Spoken language (optional)";
    $("language").placeholder = translate ? "e.g. French (default English)" : "e.g. English";
  });
}
