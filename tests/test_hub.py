"""A model name that needs the Hugging Face hub, while the hub is out of reach, fails at once with the offline
hint (it used to retry for ~45-55 s). The hub is made unreachable for sure: HF_ENDPOINT points at a closed
local port, the offline flags are cleared, and the hub cache is an empty directory."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechscope import hub, models
from mechscope.errors import BadInput
from mechscope.models import load_model

needs_hooked = pytest.mark.skipif(not models._hooked_transformer_available(),
                                  reason="transformer-lens 4 has no HookedTransformer")

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def unreachable(tmp_path, monkeypatch):
    """The hub out of reach, without HF_HUB_OFFLINE (which CI sets), and nothing cached."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import: as if the flag was never set
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "_probe", None)
    return tmp_path / "hub-cache"


def test_detect_with_a_hub_model_fails_in_seconds_with_the_offline_hint(unreachable, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=CLOSED, HF_HUB_CACHE=str(unreachable), PYTHONPATH=str(ROOT / "src"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mechscope.cli", "detect", "--model", "EleutherAI/pythia-70m-deduped"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "out of reach" in done.stderr and "save_pretrained" in done.stderr
    assert elapsed < 5, f"{elapsed:.1f} s: the hub was retried"


@pytest.mark.parametrize("backend, spec", [pytest.param("tl", "gpt2-small", marks=needs_hooked),
                                           ("bridge", "EleutherAI/pythia-70m"),
                                           ("auto", "pythia-160m")])
def test_load_model_with_a_hub_name_fails_in_seconds(unreachable, backend, spec):
    started = time.monotonic()
    with pytest.raises(BadInput, match="out of reach"):
        load_model(spec, backend=backend, device="cpu")
    assert time.monotonic() - started < 5


def test_typo_offline_still_suggests_the_close_name(unreachable):
    with pytest.raises(BadInput, match="Did you mean: gpt2-small"):
        load_model("gpt2-smal", device="cpu")


def test_with_models_cached_it_tries_the_cache_only_and_restores_online_mode(unreachable):
    """Something cached: the load runs in offline mode (no retries) and fails at once on a model not there."""
    from huggingface_hub import constants

    import transformer_lens.model_bridge  # noqa: F401  (imported first: the retries are timed, not the import)

    (unreachable / "models--someone--other-model" / "snapshots").mkdir(parents=True)
    assert hub.cached_models() == ["someone/other-model"]
    started = time.monotonic()
    with pytest.raises(BadInput, match="could not"):
        load_model("EleutherAI/pythia-70m", backend="bridge", device="cpu")
    assert time.monotonic() - started < 5
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


def test_offline_flag_and_a_reachable_endpoint(monkeypatch):
    import socket

    monkeypatch.setattr(hub, "_probe", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.offline_reason() is None  # a host that answers
    finally:
        server.close()
