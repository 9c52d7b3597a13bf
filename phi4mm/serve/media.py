"""Where the server may take an image or audio payload from, and how it fetches one.

The processors accept file paths, so nothing a client sends may reach them as a path: every payload becomes
bytes (or a `data:` URL, which the loaders decode without touching the filesystem) here.

- `data:` URLs and base64 `input_audio`: always, up to `max_bytes`.
- http(s) URLs, only with `--allow-remote-media`: the host is resolved once, every address it resolves to must
  be public (no loopback, private, link-local such as 169.254.169.254, shared, multicast or reserved range;
  decimal or hex spellings of such addresses resolve to them and are refused too), and the connection goes to
  that checked address (so a second DNS answer cannot swap it). Redirects are followed by hand, at most
  `MAX_REDIRECTS`, each target checked the same way. The whole fetch has one deadline and a size cap. Every
  failure gives the same sentence, which says nothing about the target (open port, status, body bytes).
- Local files, only under `--allowed-media-dir DIR` (after resolving symlinks and `..`), up to `max_bytes`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4mm.serve.schemas import APIError

MAX_REDIRECTS = 3
B64_SLACK = 64  # a data: URL's header ("data:image/jpeg;base64,") on top of 4/3 of the payload

Resolver = Callable[[str, int], Awaitable[list[str]]]


def is_public_address(ip: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped and 6to4/Teredo IPv6 checked inside)."""
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address):
        inner = a.ipv4_mapped or a.sixtofour or (a.teredo[1] if a.teredo else None)
        if inner is not None and not is_public_address(str(inner)):
            return False
    return a.is_global and not a.is_multicast and not a.is_reserved and not a.is_unspecified


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class MediaPolicy:
    """What `resolve_media` may do. `resolver` and `address_allowed` are for tests (a local HTTP server on
    127.0.0.1); no command-line flag reaches them."""

    allow_remote_media: bool = False
    allowed_media_dir: str | None = None
    max_bytes: int = 20 << 20
    remote_timeout_s: float = 15.0
    resolver: Resolver = resolve_host
    address_allowed: Callable[[str], bool] = is_public_address


async def resolve_media(payload: Any, kind: str, where: str, policy: MediaPolicy) -> Any:
    """A content part's payload -> bytes or a data: URL, never something the loaders would read as a path."""
    limit_b64 = policy.max_bytes * 4 // 3 + B64_SLACK
    if kind == "audio" and isinstance(payload, dict):  # OpenAI input_audio {"data": base64, "format": ...}
        data = payload.get("data")
        if not isinstance(data, str):
            raise APIError(400, f"{where}: input_audio needs a base64 'data' string, e.g. "
                           "{'data': '<base64 wav>', 'format': 'wav'}", param=where)
        _check_inline_size(data, limit_b64, kind, where, policy.max_bytes)
        return data if data.startswith("data:") else _b64(data, where)
    if not isinstance(payload, str):
        raise APIError(400, f"{where}: the {kind} must be a URL string (data:, or http(s)/file where this server "
                       f"allows them), got {type(payload).__name__}", param=where)
    if payload.startswith("data:"):
        _check_inline_size(payload, limit_b64, kind, where, policy.max_bytes)
        return payload
    if payload.startswith(("http://", "https://")):
        if not policy.allow_remote_media:
            raise APIError(400, f"{where}: this server does not fetch http(s) URLs; send the {kind} inline as a "
                           f"data URL (data:<mime>;base64,...), or start the server with --allow-remote-media",
                           param=where, code="remote_media_disabled")
        return await fetch_remote(payload, kind, where, policy)
    if policy.allowed_media_dir is None:
        raise APIError(400, f"{where}: the {kind} is not a data: URL; send the {kind} inline as "
                       "data:<mime>;base64,... (local files are read only under the server's --allowed-media-dir, "
                       "with --allow-local-files)", param=where)
    return await asyncio.to_thread(read_local, payload, kind, where, policy)


def _check_inline_size(data: str, limit: int, kind: str, where: str, max_bytes: int) -> None:
    if len(data) > limit:
        raise APIError(400, f"{where}: the {kind} is over the server's limit of {max_bytes} bytes per media item "
                       "(--max-media-bytes); send a smaller one", param=where, code="media_too_large")


def _b64(data: str, where: str) -> bytes:
    compact = "".join(data.split())
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise APIError(400, f"{where}: input_audio 'data' is not valid base64; send base64 of the audio file's "
                       "bytes (wav, flac, mp3, ogg)", param=where, code="invalid_base64")
    return raw


def read_local(payload: str, kind: str, where: str, policy: MediaPolicy) -> bytes:
    """A file under the allowed directory, at most `max_bytes`; anything else is 'no such file' (the answer
    does not tell a file outside the directory from a missing one)."""
    root = Path(policy.allowed_media_dir or "").resolve()
    missing = APIError(400, f"{where}: no {kind} file of that name under the server's media directory; name a "
                       "file relative to it, or send the data inline", param=where, code="media_not_found")
    try:
        raw = payload.removeprefix("file://")
        path = (root / Path(raw).expanduser()).resolve()  # an absolute path replaces root, then is checked
        if not path.is_relative_to(root) or not path.is_file():
            raise missing
        if path.stat().st_size > policy.max_bytes:
            raise APIError(400, f"{where}: the {kind} file is over the server's limit of {policy.max_bytes} bytes "
                           "(--max-media-bytes)", param=where, code="media_too_large")
        return path.read_bytes()
    except (OSError, ValueError):
        raise missing from None


async def fetch_remote(url: str, kind: str, where: str, policy: MediaPolicy) -> bytes:
    """GET `url` under the policy (see the module docstring); one uninformative 400 for any failure."""
    import httpx
    refused = APIError(400, f"{where}: the {kind} URL could not be fetched: it must be a public http(s) URL that "
                       f"answers with the data (at most {MAX_REDIRECTS} redirects, {policy.max_bytes} bytes, "
                       f"{policy.remote_timeout_s:g} s)", param=where, code="remote_media_failed")
    try:
        async with asyncio.timeout(policy.remote_timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         timeout=policy.remote_timeout_s) as client:
                target = httpx.URL(url)
                for _ in range(MAX_REDIRECTS + 1):
                    data, location = await _get_once(client, target, policy)
                    if location is None:
                        return data
                    target = target.join(location)
                    if target.scheme not in ("http", "https"):
                        break
    except (APIError, httpx.HTTPError, OSError, ValueError, UnicodeError, TimeoutError):
        pass
    raise refused


async def _get_once(client: Any, url: Any, policy: MediaPolicy) -> tuple[bytes, str | None]:
    """One request to a checked address: (body, None), or (b"", Location) for a redirect."""
    host = url.host
    if not host or url.scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL with a host")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await policy.resolver(host, port)
    if not addresses or not all(policy.address_allowed(a) for a in addresses):
        raise ValueError("the host resolves to an address that is not allowed")
    ip = addresses[0]
    pinned = url.copy_with(host=ip)  # connect to the address just checked, not to a second DNS answer
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*, audio/*"}
    ext = {"sni_hostname": host} if url.scheme == "https" else {}
    async with client.stream("GET", pinned, headers=headers, extensions=ext) as r:
        if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
            return b"", r.headers["location"]
        if r.status_code != 200:
            raise ValueError("not 200")
        length = r.headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_bytes:
            raise ValueError("too large")
        data = bytearray()
        async for chunk in r.aiter_bytes():
            data += chunk
            if len(data) > policy.max_bytes:
                raise ValueError("too large")
        return bytes(data), None
