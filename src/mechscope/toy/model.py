"""Architecture, tokenizer and on-disk format of the bundled model `mechscope-toy`.

The weights live in `weights/` beside this file: `config.json` (the HookedTransformerConfig fields),
`model.safetensors` (the trained state dict, LayerNorm *not* folded) and the tokenizer files written
by `save_pretrained`. `toy.train` writes them; `mechscope.models.load_model("mechscope-toy")` reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

ARCHITECTURE = dict(n_layers=3, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=128,
                    act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                    original_architecture="mechscope-toy", model_name="mechscope-toy")


def build_tokenizer(words: list[str], directory: Path):
    """A word-level, lower-casing tokenizer that splits punctuation, saved to `directory` and reloaded.

    transformer-lens re-opens a tokenizer from its `name_or_path`, so it must live in a directory.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=ARCHITECTURE["n_ctx"])
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def save(model, tokenizer, directory: Path = WEIGHTS_DIR) -> None:
    """Write config.json, model.safetensors and the tokenizer of a trained HookedTransformer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(ARCHITECTURE, d_vocab=model.cfg.d_vocab)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(str(directory))


def load(directory: Path = WEIGHTS_DIR, device: str = "cpu", dtype=None, fold_ln: bool = True):
    """The bundled model as a HookedTransformer (LayerNorm folded by default, like from_pretrained; value
    biases not folded, so hook_z equals the Hugging Face export's attention output-projection input)."""
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    cfg_dict = json.loads((directory / "config.json").read_text())
    if fold_ln:
        cfg_dict["normalization_type"] = "LNPre"
    cfg = HookedTransformerConfig(**cfg_dict, device=device, dtype=dtype or torch.float32,
                                  default_prepend_bos=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(directory / "model.safetensors"))
    model.load_and_process_state_dict(state, fold_ln=fold_ln, center_writing_weights=fold_ln,
                                      center_unembed=fold_ln, fold_value_biases=False)
    model.to(device, print_details=False)
    if dtype is not None:
        model.to(dtype, print_details=False)
    model.eval()
    return model
