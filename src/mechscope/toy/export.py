"""The bundled model as a standard Hugging Face checkpoint: GPT2LMHeadModel + its tokenizer, in `hf/`.

    python -m mechscope.toy.export              # rewrites src/mechscope/toy/hf/ from weights/
    python -m mechscope.toy.export --out DIR    # anywhere else

Every trained weight maps exactly onto GPT-2's layout (untied unembedding, exact GELU, no dropout), and
the toy is trained without an unembedding bias (GPT-2's lm_head has none), so the export's logits equal
the unfolded HookedTransformer's to float error. `AutoModelForCausalLM.from_pretrained(HF_DIR)`,
nnsight and `TransformerBridge.boot_transformers(HF_DIR)` load it offline. Its tokenizer does not add
BOS by itself: prepend `tokenizer.bos_token_id` (the engines do) to match transformer-lens's positions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HF_DIR = Path(__file__).parent / "hf"


def gpt2_state_dict(model) -> dict:
    """GPT2LMHeadModel tensors from an unfolded HookedTransformer of the toy's architecture."""
    import torch

    cfg = model.cfg
    if float(model.b_U.detach().abs().max()) > 0:
        raise ValueError("the unembedding bias b_U is non-zero: GPT-2 has no lm_head bias, so this model has no "
                         "exact GPT-2 export (retrain with `python -m mechscope.toy.train`, which keeps b_U at 0)")
    d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    out = {"transformer.wte.weight": model.W_E, "transformer.wpe.weight": model.W_pos,
           "transformer.ln_f.weight": model.ln_final.w, "transformer.ln_f.bias": model.ln_final.b,
           "lm_head.weight": model.W_U.T}
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        attn = block.attn
        qkv_w = [w.permute(1, 0, 2).reshape(d, H * dh) for w in (attn.W_Q, attn.W_K, attn.W_V)]  # [d, H*dh]
        out |= {p + "ln_1.weight": block.ln1.w, p + "ln_1.bias": block.ln1.b,
                p + "ln_2.weight": block.ln2.w, p + "ln_2.bias": block.ln2.b,
                p + "attn.c_attn.weight": torch.cat(qkv_w, 1),
                p + "attn.c_attn.bias": torch.cat([b.reshape(-1) for b in (attn.b_Q, attn.b_K, attn.b_V)]),
                p + "attn.c_proj.weight": attn.W_O.reshape(H * dh, d), p + "attn.c_proj.bias": attn.b_O,
                p + "mlp.c_fc.weight": block.mlp.W_in, p + "mlp.c_fc.bias": block.mlp.b_in,
                p + "mlp.c_proj.weight": block.mlp.W_out, p + "mlp.c_proj.bias": block.mlp.b_out}
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def gpt2_config(model, tokenizer):
    from transformers import GPT2Config

    cfg = model.cfg
    return GPT2Config(vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_ctx=cfg.n_ctx, n_embd=cfg.d_model,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.eps,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def export(directory: Path = HF_DIR) -> Path:
    """Write the bundled weights as a GPT2LMHeadModel checkpoint + tokenizer to `directory`."""
    import torch
    from transformers import GPT2LMHeadModel

    from mechscope.toy import model as toy

    tl = toy.load(fold_ln=False)
    hf = GPT2LMHeadModel(gpt2_config(tl, tl.tokenizer)).eval()
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(tl), strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 export: missing {missing}, unexpected {unexpected}")
    tokens = tl.to_tokens("when mary and john went to the store , john gave a drink to")
    with torch.no_grad():
        diff = float((hf(tokens).logits - tl(tokens)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"GPT-2 export differs from the HookedTransformer by {diff:.2e}")
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    tl.tokenizer.save_pretrained(str(directory))
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HF_DIR, help="output directory (default: the bundled hf/)")
    print(export(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
