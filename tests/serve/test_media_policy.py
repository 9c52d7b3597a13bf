"""Where the server may take media from: public addresses only (checked after DNS, per redirect), a total
deadline, a size cap, uninformative errors; local files only under the allowed directory.

A local HTTP server on 127.0.0.1 stands in for the internet: the default policy must refuse it (loopback), and
a test-only policy whose address check admits exactly 127.0.0.1 exercises redirects, caps and deadlines.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi4mm.serve.media import (
    MAX_REDIRECTS,
    MediaPolicy,
    is_public_address,
    resolve_media,
)
from phi4mm.serve.schemas import APIError

SECRET = b"TOP-SECRET-BODY"
IMAGE = b"\x89PNG\r\n\x1a\n" + b"x" * 100


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path.startswith("/hop/"):  # /hop/N: N more redirects, then the image
            n = int(self.path.split("/")[2])
            self.send_response(302)
            self.send_header("Location", f"/hop/{n - 1}" if n > 1 else "/img")
            self.end_headers()
        elif self.path == "/to-other-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/img")
            self.end_headers()
        elif self.path == "/img":
            self._send(200, IMAGE)
        elif self.path == "/big":
            self._send(200, b"y" * 5000)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(20):
                time.sleep(0.1)
                try:
                    self.wfile.write(b"z")
                    self.wfile.flush()
                except OSError:
                    return
        else:
            self._send(404, SECRET)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def web():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def only_loopback_1(ip: str) -> bool:
    return ip == "127.0.0.1"


def fetch(url: str, policy: MediaPolicy):
    return asyncio.run(resolve_media(url, "image", "image 1", policy))


def refused(url: str, policy: MediaPolicy) -> APIError:
    with pytest.raises(APIError) as e:
        fetch(url, policy)
    assert e.value.status == 400 and e.value.param == "image 1"
    return e.value


@pytest.mark.parametrize("ip, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False),
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("not an ip", False)])
def test_public_address_check(ip, public):
    assert is_public_address(ip) is public


def test_default_policy_refuses_internal_targets_without_revealing_them(web):
    policy = MediaPolicy(allow_remote_media=True, remote_timeout_s=5)
    port = web.rsplit(":", 1)[1]
    messages = set()
    for url in (f"{web}/img", f"{web}/missing", "http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
                f"http://2130706433:{port}/img", f"http://0x7f000001:{port}/img", f"http://[::1]:{port}/img",
                f"http://localhost:{port}/img"):
        e = refused(url, policy)
        assert port not in e.message and "169.254" not in e.message and "SECRET" not in e.message
        messages.add(e.message)
    assert len(messages) == 1  # one sentence for every failure: nothing to tell an open port from a closed one


def test_redirects_are_checked_and_bounded(web):
    policy = MediaPolicy(allow_remote_media=True, remote_timeout_s=5, address_allowed=only_loopback_1)
    assert fetch(f"{web}/img", policy) == IMAGE
    assert fetch(f"{web}/hop/{MAX_REDIRECTS}", policy) == IMAGE
    refused(f"{web}/hop/{MAX_REDIRECTS + 1}", policy)
    refused(f"{web}/to-other-loopback", policy)  # a redirect to an address the check refuses
    e = refused(f"{web}/missing", policy)
    assert "404" not in e.message and "SECRET" not in e.message


def test_size_cap_and_total_deadline(web):
    small = MediaPolicy(allow_remote_media=True, max_bytes=1000, address_allowed=only_loopback_1)
    refused(f"{web}/big", small)
    slow = MediaPolicy(allow_remote_media=True, remote_timeout_s=0.5, address_allowed=only_loopback_1)
    t0 = time.monotonic()
    refused(f"{web}/slow", slow)  # one byte every 0.1 s: each read is quick, the whole is not
    assert time.monotonic() - t0 < 1.8  # the deadline, not the server's 2 s, ended it
    inline = MediaPolicy(max_bytes=300)
    with pytest.raises(APIError, match="max-media-bytes"):
        fetch("data:image/png;base64," + "A" * 1000, inline)


def test_remote_off_by_default(web):
    with pytest.raises(APIError, match="allow-remote-media"):
        fetch(f"{web}/img", MediaPolicy())


def test_local_files_only_under_the_allowed_dir(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(IMAGE)
    (media / "big.png").write_bytes(b"x" * 2000)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    os.symlink(tmp_path / "secret.txt", media / "link.png")
    policy = MediaPolicy(allowed_media_dir=str(media), max_bytes=1000)
    assert fetch("a.png", policy) == IMAGE
    assert fetch(f"file://{media / 'a.png'}", policy) == IMAGE
    outside = set()
    for name in ("../secret.txt", str(tmp_path / "secret.txt"), "link.png", "/etc/passwd", "missing.png"):
        e = refused(name, policy)
        assert "SECRET" not in e.message
        outside.add(e.message)
    assert len(outside) == 1  # a file outside the directory reads the same as a missing one
    with pytest.raises(APIError, match="max-media-bytes"):
        fetch("big.png", policy)
    with pytest.raises(APIError, match="allowed-media-dir"):
        fetch("a.png", MediaPolicy())
