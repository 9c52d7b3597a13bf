// Microphone recording with MediaRecorder, shared by the chat and transcribe tabs. A Record button toggles it;
// the finished recording arrives as a File (webm/opus in Chromium and Firefox, mp4/aac in Safari), which the
// server decodes like any uploaded audio.

// What MediaRecorder should produce, best first; the server decodes all three.
const RECORDING_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4"];
const TICK_MS = 250; // how often the button's elapsed time updates

export function canRecord() {
  return Boolean(window.MediaRecorder && navigator.mediaDevices?.getUserMedia);
}

/**
 * Make `button` a record / stop toggle. onDone(file) gets each finished recording; onError(message) a readable
 * reason when the microphone cannot be used. Returns {active()}: whether a recording is running.
 */
export function recordButton(button, onDone, onError) {
  let recorder = null;
  const label = button.textContent;
  if (!canRecord()) {
    button.disabled = true;
    button.title = "this browser (or a page not served over https or from localhost) cannot record";
  }
  button.addEventListener("click", async () => {
    if (recorder) {
      recorder.stop();
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      onError(`the microphone is not available (${e.name}: ${e.message}); allow it for this page, ` +
              "or use an audio file instead");
      return;
    }
    const mimeType = RECORDING_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) || "";
    recorder = new MediaRecorder(stream, mimeType ? { mimeType } : {});
    const chunks = [];
    const started = Date.now();
    const timer = setInterval(() => {
      button.textContent = `Stop recording (${Math.round((Date.now() - started) / 1000)} s)`;
    }, TICK_MS);
    recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
    recorder.onstop = () => {
      clearInterval(timer);
      stream.getTracks().forEach((t) => t.stop());
      const type = recorder.mimeType || mimeType || "audio/webm";
      recorder = null;
      button.textContent = label;
      button.setAttribute("aria-pressed", "false");
      const ext = type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm";
      const stamp = new Date().toTimeString().slice(0, 8).replaceAll(":", "-");
      onDone(new File(chunks, `recording-${stamp}.${ext}`, { type }));
    };
    recorder.start();
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Stop recording (0 s)";
  });
  return { active: () => recorder !== null };
}
