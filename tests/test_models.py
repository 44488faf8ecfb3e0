"""load_model: the bundled model, local Hugging Face directories (logits match HF), and clear errors."""
import pytest
import torch

from mechscope.errors import BadInput
from mechscope.models import load_model


def _save_tiny(kind: str, directory):
    """A tiny random HF causal LM + a GPT-2 tokenizer-free word tokenizer, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    from mechscope.toy import model as toy

    if kind == "gpt2":
        from transformers import GPT2Config
        cfg = GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)  # saved without n_ctx
    elif kind == "phi":
        from transformers import PhiConfig
        cfg = PhiConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, partial_rotary_factor=0.5)
    elif kind == "llama":
        from transformers import LlamaConfig
        cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    else:
        from transformers import GPTNeoXConfig
        cfg = GPTNeoXConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(directory)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR)).save_pretrained(directory)
    return hf


@pytest.mark.parametrize("kind", ["gpt2", "neox", "phi"])
def test_local_hf_directory_matches_hf_logits(tmp_path, kind):
    """GPT-2 as the installed transformers saves it (n_positions, no n_ctx: transformer-lens 3.9 reads n_ctx)
    and Phi (partial_rotary_factor now inside rope_parameters) load on the tl engine too."""
    import json

    hf = _save_tiny(kind, tmp_path)
    assert kind != "gpt2" or "n_ctx" not in json.loads((tmp_path / "config.json").read_text())
    model = load_model(str(tmp_path), backend="tl", device="cpu").model
    tokens = torch.tensor([[1, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    # folding LN / centering the unembedding shifts all logits of a position by a constant: compare log-probs
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_bundled_model_loads_offline_folded_and_unfolded(toy_model, toy_model_unfolded):
    assert toy_model.cfg.normalization_type == "LNPre"
    assert toy_model_unfolded.cfg.normalization_type == "LN"
    tokens = toy_model.to_tokens("the capital of france is")
    with torch.no_grad():
        a, b = toy_model(tokens), toy_model_unfolded(tokens)
    torch.testing.assert_close(a.log_softmax(-1), b.log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert toy_model.to_single_str_token(int(a[0, -1].argmax())) == "paris"


def test_unknown_model_suggests_close_names():
    with pytest.raises(BadInput, match="gpt2-small"):
        load_model("gpt2-smal", device="cpu")


def test_missing_directory_and_bad_options(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(BadInput, match="config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(BadInput, match="dtype"):
        load_model("mechscope-toy", device="cpu", dtype="float8")
    with pytest.raises(BadInput, match="device"):
        load_model("mechscope-toy", device="tpu")


def test_one_parameter_count_everywhere(toy_on, tmp_path, capsys):
    """detect, the engines (and so predict's meta.json and the report) give the bundled model's one count, the one
    MODEL_CARD.md states (690,098 in detect, 589,824 in report and predict, 689,792 in the nnsight run's meta)."""
    import json
    from pathlib import Path

    from mechscope import compute
    from mechscope.cli import main

    count = compute.model_shape("mechscope-toy").n_params
    assert count == sum(p.numel() for p in __import__("mechscope.toy.model", fromlist=["load"]).load(
        device="cpu", fold_ln=False).parameters())                            # the shipped weights' own tensors
    assert f"{count:,} parameters" in (Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text()
    assert toy_on.cfg.n_params == count and toy_on.info()["n_params"] == count
    assert main(["detect", "--model", "mechscope-toy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["recommendation"]["n_params"] == count
    assert main(["predict", "--backend", toy_on.name, "--prompt", "the capital of france is", "--out", str(tmp_path),
                 "--json"]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    assert json.loads((run_dir / "meta.json").read_text())["model"]["n_params"] == count
