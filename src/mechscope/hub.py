"""The Hugging Face hub, asked only when a model name needs it, and answered fast when it is out of reach.

Offline, huggingface_hub retries every request with back-off (~45 s per model here) before it gives up.
`access(spec)` wraps code that fetches `spec`: when HF_HUB_OFFLINE is set or the hub's host does not
answer within TIMEOUT_S, the code runs in offline mode (the local cache only, no retries), and when the
cache holds no model at all it fails at once, before transformer-lens or transformers is even imported.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from mechscope.errors import BadInput

TIMEOUT_S = 2.0          # to resolve and connect to the hub's host (or the HTTPS proxy)
_REMEMBER_S = 60.0       # a probe's answer is reused for this long
_probe: tuple[float, str | None] | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")


def _endpoint() -> tuple[str, int]:
    """(host, port) a request to the hub connects to first: the HTTPS proxy if one is set, else HF_ENDPOINT."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _connect(host: str, port: int, result: list) -> None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except OSError as e:
        result.append(e.strerror or type(e).__name__)
    else:
        result.append(None)


def offline_reason() -> str | None:
    """Why the hub cannot be used now (HF_HUB_OFFLINE, or its host does not answer), or None if it answers."""
    global _probe
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    if _probe is not None and time.monotonic() - _probe[0] < _REMEMBER_S:
        return _probe[1]
    host, port = _endpoint()
    result: list = []
    probe = threading.Thread(target=_connect, args=(host, port, result), daemon=True)  # DNS has no timeout
    probe.start()
    probe.join(TIMEOUT_S + 0.5)
    error = result[0] if result else "no answer"
    reason = None if error is None else f"{host}:{port}: {error}"
    _probe = (time.monotonic(), reason)
    return reason


def cache_dir() -> Path:
    """The hub cache directory, found the way huggingface_hub finds it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_models() -> list[str]:
    """Repository ids with a snapshot in the hub cache (e.g. ['gpt2', 'EleutherAI/pythia-70m'])."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--"):].replace("--", "/") for p in root.glob("models--*") if (p / "snapshots").is_dir())


@contextlib.contextmanager
def _offline_mode():
    """huggingface_hub (and transformers, which asks it) in offline mode for the duration."""
    from huggingface_hub import constants

    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


@contextlib.contextmanager
def access(spec: str, hint: str = ""):
    """Around code that fetches `spec` from the hub: as it is when the hub answers; offline mode (cache
    only, no retries) when it does not; BadInput at once when it does not and nothing is cached."""
    reason = offline_reason()
    if reason is None:
        yield
        return
    if not cached_models():
        raise BadInput(f"unknown model {spec!r} here: not bundled, not a local directory, and the Hugging Face hub, "
                       f"which may know it, is out of reach ({reason}) with no model in its cache {cache_dir()}; pass "
                       f"a local directory saved with save_pretrained, or use 'mechscope-toy'.{hint}")
    with _offline_mode():
        yield
