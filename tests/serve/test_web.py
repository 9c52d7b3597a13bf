"""The web page, in a real browser: headless Chromium (Debian's, driven by Selenium through Debian's chromedriver)
against a real `phi4mm serve` on loopback with the embedded micro model.

One server and one browser for the whole module. Chromium's fake microphone plays a spoken sentence, so the
recording path (MediaRecorder -> webm/opus -> the server's decoder) runs as it does for a user. Every state is
saved as a screenshot under the module's tmp folder.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from tests.conftest import free_port

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
DATA = ROOT / "tests" / "data"
KEY = "web-test-key"
START_TIMEOUT_S = 120  # the server loads the micro model (slow on a busy 2-core machine)
REPLY_TIMEOUT_S = 60  # one chat reply or transcription of a few seconds of audio
INSTALL = ("headless Chromium and its driver are needed for the web page tests: "
           "apt-get update && apt-get install -y chromium chromium-driver (and pip install selenium)")
SHAPES_QUESTION = ("micro_heldout_shapes/shapes_000019.png", "What color is the circle?")
ASR_PROMPT = "Transcribe the audio clip into text."


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def server(shots):
    """`phi4mm serve --api-key KEY` (the micro model) on a free loopback port: its base URL. Started here and
    waited for in `healthy`, so that it loads while the browser starts."""
    port = free_port()
    log = (shots / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "phi4mm.cli.main", "serve", "--port", str(port), "--api-key", KEY],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def healthy(server, shots) -> str:
    """The server's base URL once it answers /health."""
    url, proc = server
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"phi4mm serve exited: {(shots / 'server.log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "phi4mm serve did not answer /health in time"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def spoken_wav(shots) -> Path:
    """examples/spoken.flac as 16-bit wav with a second of silence after it: what Chromium's fake microphone
    plays (in a loop)."""
    wav, rate = sf.read(EXAMPLES / "spoken.flac", dtype="float32")
    path = shots / "spoken.wav"
    sf.write(path, list(wav) + [0.0] * rate, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(shots, spoken_wav):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(driver_path).is_file():
        pytest.fail(INSTALL)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(INSTALL)
    downloads = shots / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium  # with the driver's path below, selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1100",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={spoken_wav}", "--force-prefers-reduced-motion"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_script_timeout(REPLY_TIMEOUT_S)
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(server, browser, healthy):
    browser.get(healthy + "/")
    assert browser.title == "phi4mm"
    return browser


# ------------------------------------------------------------------------------------------------ helpers
def wait(driver, condition, what: str, timeout: float = REPLY_TIMEOUT_S):
    """Poll `condition(driver)` until truthy, answering the API-key dialog with the right key when it opens."""
    deadline = time.monotonic() + timeout
    while True:
        if driver.execute_script("return document.getElementById('key-dialog').open"):
            answer_key(driver, KEY)
        value = condition(driver)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}; page says: {visible_text(driver)}"
        time.sleep(0.1)


def nth_job(driver, n: int):
    """The transcribe tab's job number n (from 0), or None while there are not that many yet."""
    jobs = driver.find_elements(_by().CSS_SELECTOR, ".job")
    return jobs[n] if len(jobs) > n else None


def answer_key(driver, key: str) -> None:
    by = _by()
    box = driver.find_element(by.ID, "key-input")
    box.clear()
    box.send_keys(key + "\n")  # Enter submits: the dialog works from the keyboard


def visible_text(driver) -> str:
    return driver.find_element(_by().TAG_NAME, "main").text[-1500:]


def _by():
    from selenium.webdriver.common.by import By
    return By


def new_chat(driver, tools: str = "", system: str = "") -> None:
    """A fresh conversation on the chat tab, with these tools (JSON text) and system prompt pasted in."""
    by = _by()
    driver.find_element(by.ID, "tab-chat").click()
    driver.execute_script("document.getElementById('settings').open = true")
    driver.find_element(by.ID, "new-chat").click()
    driver.execute_script("document.getElementById('settings').open = false")
    # Set as a paste would (typing JSON key by key is slow); the settings panel may stay closed.
    driver.execute_script("document.getElementById('tools').value = arguments[0];"
                          "document.getElementById('system').value = arguments[1];", tools, system)


def counts(driver) -> tuple[int, int]:
    """(finished assistant replies, error messages) in the conversation."""
    return driver.execute_script(
        "return [document.querySelectorAll('.msg.assistant[data-done=true]').length,"
        " document.querySelectorAll('.msg.error').length]")


def send(driver, text: str, files: list[Path] = ()):
    """Attach files, type `text`, press Enter; wait for the reply (or an error) and return it as a WebElement."""
    by = _by()
    before = counts(driver)
    for f in files:
        n = len(driver.find_elements(by.CSS_SELECTOR, "#attachments li"))
        driver.find_element(by.ID, "file-input").send_keys(str(f))
        wait(driver, lambda d, n=n: len(d.find_elements(by.CSS_SELECTOR, "#attachments li")) > n,
             f"{f.name} attached")
    box = driver.find_element(by.ID, "prompt")
    box.send_keys(text)
    from selenium.webdriver.common.keys import Keys
    box.send_keys(Keys.ENTER)
    done = wait(driver, lambda d: counts(d) != before, f"a reply to {text!r}")
    assert done
    _replies, errors = counts(driver)
    kind = ".msg.error" if errors > before[1] else ".msg.assistant[data-done=true]"
    return driver.find_elements(by.CSS_SELECTOR, kind)[-1]


def shot(driver, shots: Path, name: str) -> None:
    """A screenshot of the page's current state under the module's tmp folder."""
    driver.save_screenshot(str(shots / name))
    assert (shots / name).stat().st_size > 10_000, f"the screenshot {name} is empty"


def content(reply) -> str:
    return reply.find_element(_by().CSS_SELECTOR, ".content").text.strip()


def api_chat(server: str, content_parts) -> dict:
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=REPLY_TIMEOUT_S,
                   json={"model": "phi4mm", "temperature": 0, "max_tokens": 256,
                         "messages": [{"role": "user", "content": content_parts}]})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------ tests
def test_page_is_served_without_the_key(healthy):
    assert httpx.get(healthy + "/").status_code == 200
    js = httpx.get(healthy + "/ui/chat.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(healthy + "/v1/models").status_code == 401  # the API still needs the key


def test_no_ui_leaves_the_api_only(monkeypatch):
    from phi4mm.cli import serving
    from phi4mm.cli.main import main
    seen = {}
    monkeypatch.setattr(serving, "serve", lambda args, options: seen.update(ui=args.ui) or 0)
    assert main(["serve", "--no-ui"]) == 0 and seen["ui"] is False
    assert main(["serve"]) == 0 and seen["ui"] is True
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from phi4mm.serve.ui import mount_ui
    bare, with_ui = FastAPI(), FastAPI()
    mount_ui(with_ui)
    assert TestClient(bare).get("/").status_code == 404
    assert TestClient(with_ui).get("/").status_code == 200
    assert TestClient(with_ui).get("/ui/style.css").headers["content-type"].startswith("text/css")


def test_tool_call_card(page, shots):
    new_chat(page, tools=(EXAMPLES / "tools.json").read_text())
    reply = send(page, "I want to listen to Coldplay.")
    shot(page, shots, "1-tool-call.png")
    cards = reply.find_elements(_by().CSS_SELECTOR, ".tool-card")
    assert [c.get_attribute("data-name") for c in cards] == ["play_music"], visible_text(page)
    assert json.loads(cards[0].find_element(_by().TAG_NAME, "pre").text) == {"artist": "Coldplay"}
    # A tool result continues the conversation.
    cards[0].find_element(_by().TAG_NAME, "textarea").send_keys('{"status": "playing"}')
    before = counts(page)
    reply.find_element(_by().XPATH, ".//button[text()='Send results']").click()
    wait(page, lambda d: counts(d)[0] > before[0], "the reply after the tool result")
    assert page.find_elements(_by().CSS_SELECTOR, ".msg.tool")
    shot(page, shots, "1-tool-result.png")


def test_image_answer_streams_the_greedy_answer(page, healthy, shots):
    image, question = SHAPES_QUESTION
    path = DATA / image
    new_chat(page)
    reply = send(page, question, [path])
    shot(page, shots, "2-image.png")
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    want = api_chat(healthy, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}])
    assert content(reply) == want["choices"][0]["message"]["content"].strip()
    stats = reply.find_element(_by().CSS_SELECTOR, ".stats").text
    assert stats.startswith("adapter vision") and "first token" in stats, stats


def record(driver, button_id: str, seconds: float) -> None:
    """Press a Record button, let the fake microphone play for `seconds`, press it again."""
    by = _by()
    button = driver.find_element(by.ID, button_id)
    button.click()
    wait(driver, lambda d: button.get_attribute("aria-pressed") == "true", "the recording to start")
    time.sleep(seconds)
    button.click()


def media_bytes(driver, element) -> tuple[str, bytes]:
    """(MIME type, bytes) of an <audio>/<img> element's source, read inside the page (data: or blob: URL)."""
    url = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0].src).then((r) => r.blob()).then((blob) => {
          const reader = new FileReader();
          reader.onload = () => done(reader.result);
          reader.readAsDataURL(blob);
        });""", element)
    head, b64 = url.split(",", 1)
    return head.removeprefix("data:").split(";")[0], base64.b64decode(b64)


def extension(mime: str) -> str:
    assert any(k in mime for k in ("webm", "ogg", "mp4")), f"MediaRecorder made {mime!r}"
    return "webm" if "webm" in mime else "ogg" if "ogg" in mime else "m4a"


def test_microphone_recording_in_chat(page, healthy, shots, spoken_wav):
    """Chromium records the fake microphone (webm/opus); the page sends it as input_audio; the streamed answer
    equals the API's greedy answer for the same recording and prompt."""
    by = _by()
    new_chat(page)
    record(page, "record", sf.info(spoken_wav).duration)
    wait(page, lambda d: d.find_elements(by.CSS_SELECTOR, "#attachments li[data-kind=audio]"), "the recording")
    mime, audio = media_bytes(page, page.find_element(by.CSS_SELECTOR, "#attachments audio"))
    reply = send(page, ASR_PROMPT)
    shot(page, shots, "3-microphone-chat.png")
    assert "msg assistant" in reply.get_attribute("class"), content(reply)
    want = api_chat(healthy, [{"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(),
                                                                      "format": extension(mime)}},
                              {"type": "text", "text": ASR_PROMPT}])
    assert content(reply) == want["choices"][0]["message"]["content"].strip() and content(reply)
    stats = reply.find_element(by.CSS_SELECTOR, ".stats").text
    assert stats.startswith("adapter speech"), stats


def test_microphone_recording_in_the_transcribe_tab(page, shots, spoken_wav):
    """A recording on the transcribe tab is transcribed as `phi4mm transcribe` transcribes the same file."""
    by = _by()
    page.find_element(by.ID, "tab-transcribe").click()
    n = len(page.find_elements(by.CSS_SELECTOR, ".job"))
    record(page, "transcribe-record", sf.info(spoken_wav).duration)
    job = wait(page, lambda d: nth_job(d, n), "the recording's job")
    mime, audio = media_bytes(page, job.find_element(by.TAG_NAME, "audio"))
    recording = shots / f"recording.{extension(mime)}"
    recording.write_bytes(audio)
    # `phi4mm transcribe` on the same bytes, in the background while the page waits for the server.
    cli = subprocess.Popen([sys.executable, "-m", "phi4mm.cli.main", "transcribe", str(recording)], text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait(page, lambda d: job.get_attribute("data-state") in ("done", "error"), "the recording's transcript")
    shot(page, shots, "3-microphone-transcribe.png")
    out, err = cli.communicate(timeout=START_TIMEOUT_S)
    assert job.get_attribute("data-state") == "done", job.text
    assert cli.returncode == 0, err
    transcript = job.find_element(by.CSS_SELECTOR, ".transcript").text
    assert " ".join(transcript.split()) == " ".join(out.split()) and out.strip()


def drop_files(driver, target_id: str, files: list[Path]) -> None:
    """Drop files on an element as a drag from the desktop would: a drop event whose DataTransfer holds them."""
    by = _by()
    driver.execute_script("""
        const input = document.createElement('input');
        input.type = 'file'; input.multiple = true; input.id = 'drop-source'; input.hidden = true;
        document.body.append(input);""")
    driver.find_element(by.ID, "drop-source").send_keys("\n".join(str(f) for f in files))
    driver.execute_script("""
        const input = document.getElementById('drop-source');
        const data = new DataTransfer();
        for (const f of input.files) data.items.add(f);
        document.getElementById(arguments[0]).dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        input.remove();""", target_id)


def _srt_seconds(stamp: str) -> float:
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d{3})", stamp)
    assert m, f"not an SRT time: {stamp!r}"
    return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000


def test_transcribe_tab_srt_download(page, shots):
    by = _by()
    page.find_element(by.ID, "tab-transcribe").click()
    n = len(page.find_elements(by.CSS_SELECTOR, ".job"))
    drop_files(page, "dropzone", [EXAMPLES / "spoken.flac"])
    job = wait(page, lambda d: nth_job(d, n), "the dropped file's job")
    wait(page, lambda d: job.get_attribute("data-state") in ("done", "error"), "the transcription")
    shot(page, shots, "4-transcribe.png")
    assert job.get_attribute("data-state") == "done", job.text
    transcript = job.find_element(by.CSS_SELECTOR, ".transcript").text.strip()
    assert transcript
    job.find_element(by.CSS_SELECTOR, "button[data-format=srt]").click()
    srt = page.downloads / "spoken.srt"
    wait(page, lambda d: srt.is_file() and srt.stat().st_size > 0, "spoken.srt in the downloads folder")
    cues = srt.read_text().strip().split("\n\n")
    assert len(cues) == 1, cues  # 1.9 s of speech: one segment
    index, times, *text = cues[0].split("\n")
    assert index == "1"
    start, end = (_srt_seconds(t) for t in times.split(" --> "))
    assert 0 <= start < end <= sf.info(EXAMPLES / "spoken.flac").duration + 0.01, times
    assert " ".join(text) == transcript


def test_errors_are_readable_and_the_page_keeps_working(page, shots):
    by = _by()
    new_chat(page)
    bad = shots / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    error = send(page, "What is in this picture?", [bad])
    shot(page, shots, "5-corrupt-image.png")
    assert "msg error" in error.get_attribute("class")
    assert "image" in content(error).lower() and "{" not in content(error), content(error)
    assert "not sent" in page.find_elements(by.CSS_SELECTOR, ".msg.user")[-1].text.lower()
    # A wrong key: the page asks for the key, saying why; with the right one the conversation goes on.
    page.execute_script("sessionStorage.setItem('phi4mm.apiKey', 'wrong-key')")
    before = counts(page)
    page.find_element(by.ID, "prompt").send_keys("Hello")
    page.find_element(by.ID, "send").click()
    reason = page.find_element(by.ID, "key-reason")
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not page.execute_script("return document.getElementById('key-dialog').open"):
        assert time.monotonic() < deadline, "the page did not ask for the API key after a 401"
        time.sleep(0.1)
    shot(page, shots, "5-wrong-key.png")
    assert "API key is wrong" in reason.text, reason.text
    reply = wait(page, lambda d: counts(d)[0] > before[0], "a reply once the right key is given")
    assert reply and page.execute_script("return sessionStorage.getItem('phi4mm.apiKey')") == KEY
    assert page.find_element(by.ID, "banner").get_attribute("hidden") is not None  # no unexpected script error
    shot(page, shots, "5-recovered.png")


def test_markdown_from_the_model_is_never_html(page):
    """Model text goes through the page's renderer: markup in it stays text, markdown becomes elements."""
    html = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/ui/markdown.js').then(({renderMarkdown}) => {
          const box = document.createElement('div');
          box.append(renderMarkdown(arguments[0]));
          done(box.innerHTML);
        });""", '<img src=x onerror="window.pwned=1"> **bold** [x](javascript:alert(1))\n\n```js\n<b>code</b>\n```')
    assert "<img" not in html and "&lt;img src=x" in html, html
    assert "<strong>bold</strong>" in html and "href" not in html, html
    assert '<pre><span class="lang">js</span><code>&lt;b&gt;code&lt;/b&gt;</code></pre>' in html, html
    assert page.execute_script("return window.pwned") is None


def test_phone_width_and_dark_theme(page, shots):
    by = _by()
    page.find_element(by.ID, "tab-chat").click()
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                                 "mobile": True})
    dark = [{"name": "prefers-color-scheme", "value": "dark"}]
    page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": dark})
    try:
        shot(page, shots, "6-phone-dark.png")
        assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), \
            "the page scrolls sideways on a 390 px wide screen"
        background = page.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert sum(map(int, re.findall(r"\d+", background)[:3])) < 3 * 64, background  # a dark background
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
