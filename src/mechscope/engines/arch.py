"""Hugging Face module paths per architecture family, for the nnsight engine (mechscope.engines.nnsight).

Each family says where a *ForCausalLM module keeps the parts that transformer-lens's sites are read from:

    family    blocks              attention / o-proj        q, k, v                         MLP / down-proj
    gpt2      transformer.h       attn / attn.c_proj        attn.c_attn  [q|k|v], Conv1D    mlp / mlp.c_proj
    neox      gpt_neox.layers     attention / .dense        attention.query_key_value       mlp / mlp.dense_4h_to_h
                                                            per head [q_h|k_h|v_h]
    llama     model.layers        self_attn / .o_proj       self_attn.{q,k,v}_proj          mlp / mlp.down_proj
    gemma     model.layers        self_attn / .o_proj       self_attn.{q,k,v}_proj          mlp / mlp.down_proj
              + post_attention_layernorm and post_feedforward_layernorm on the branch outputs (Gemma 2 / 3)
The norms on the branch inputs (ln_1 / ln_2 on GPT-2, input_layernorm / post_attention_layernorm elsewhere,
Gemma's MLP: pre_feedforward_layernorm) are called on the block input and on resid_mid (NeoX parallel: the
block input) and feed only their branch.

Facts of transformers 5 that the engine relies on (checked on 5.24): every block (GPT2Block, GPTNeoXLayer,
LlamaDecoderLayer, Qwen2/3DecoderLayer, Gemma2/3DecoderLayer) returns a Tensor, not a tuple (transformers 4
returned tuples: the engine accepts both); every attention module returns (attn_output, attn_weights), the
weights None unless the model runs eager attention (the engine loads with attn_implementation="eager");
a block's hidden states are its first positional argument; Gemma's embedding module multiplies by
sqrt(d_model) itself (Gemma2/3TextScaledWordEmbedding), so its output is what enters the residual stream;
the GPT-2 and NeoX unembedding is `lm_head` (NeoX's was `embed_out` before). q / k / v are the projection
outputs before rotary and before Qwen3's / Gemma 3's q_norm / k_norm, which is where transformer-lens's
hook_q / hook_k sit too. GPT-NeoX with use_parallel_residual (Pythia) runs attention and MLP side by side
on the same input, so it has no resid_mid. Rotary families have no positional-embedding module.

Why a map of our own and not nnterp (which standardises these names for many more architectures):
nnterp 1.3.0, the current release, does not import with nnsight 0.8.1 — it imports
`nnsight.intervention.tracing.globals`, which nnsight 0.8 removed (checked 2026-12: `import nnterp` raises
ModuleNotFoundError: No module named 'nnsight.intervention.tracing'). The engine needs only these few
paths, so a small table here is cheaper than a pinned older nnsight.
"""
from __future__ import annotations

from dataclasses import dataclass

from mechscope.errors import BadInput


@dataclass(frozen=True)
class Arch:
    """Where one family keeps its parts. Paths of blocks, embed, pos_embed, final_norm and unembed are from
    the root module; the others are inside one block."""
    family: str
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    o_proj: str                          # its input is hook_z
    qkv: tuple[str, ...]                 # one fused projection, or the q, k and v projections
    qkv_layout: str                      # "split": [q | k | v] features, "per_head": [h, (q, k, v), d_head],
                                         # "separate": three modules
    mlp: str
    down_proj: str                       # its input is mlp.hook_post
    attn_norm: str = "input_layernorm"   # the attention branch's input norm (its input: hook_resid_pre)
    mlp_norm: str = "post_attention_layernorm"  # the MLP branch's input norm (its input: hook_mlp_in)
    pos_embed: str | None = None         # learned absolute positions (GPT-2)
    attn_out_norm: str | None = None     # a norm on the attention branch's output (Gemma)
    mlp_out_norm: str | None = None      # a norm on the MLP branch's output (Gemma)
    norm: str = "RMS"                    # "LN" or "RMS"
    norm_weight_offset: float = 0.0      # Gemma's RMSNorm multiplies by (1 + weight)
    conv1d: bool = False                 # GPT-2's Conv1D stores weights [in, out], not nn.Linear's [out, in]
    gated_mlp: bool = True
    rotary: bool = True


GPT2 = Arch("gpt2", blocks="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
            final_norm="transformer.ln_f", unembed="lm_head", attn="attn", o_proj="attn.c_proj",
            qkv=("attn.c_attn",), qkv_layout="split", mlp="mlp", down_proj="mlp.c_proj", attn_norm="ln_1",
            mlp_norm="ln_2", norm="LN", conv1d=True, gated_mlp=False, rotary=False)
NEOX = Arch("neox", blocks="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head", attn="attention", o_proj="attention.dense", qkv=("attention.query_key_value",),
            qkv_layout="per_head", mlp="mlp", down_proj="mlp.dense_4h_to_h", norm="LN", gated_mlp=False)
LLAMA = Arch("llama", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
             attn="self_attn", o_proj="self_attn.o_proj",
             qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv_layout="separate",
             mlp="mlp", down_proj="mlp.down_proj")
GEMMA = Arch("gemma", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
             attn="self_attn", o_proj="self_attn.o_proj",
             qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv_layout="separate",
             mlp="mlp", down_proj="mlp.down_proj", mlp_norm="pre_feedforward_layernorm",
             attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
             norm_weight_offset=1.0)

ARCHITECTURES = {
    "GPT2LMHeadModel": GPT2,
    "GPTNeoXForCausalLM": NEOX,
    "LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA, "Qwen3ForCausalLM": LLAMA,
    "Gemma2ForCausalLM": GEMMA, "Gemma3ForCausalLM": GEMMA,
}


def arch_of(module) -> Arch:
    """The family of a Hugging Face causal LM module; BadInput naming the supported ones otherwise."""
    name = type(module).__name__
    if name not in ARCHITECTURES:
        raise BadInput(f"the nnsight engine has no module map for {name}; supported: "
                       f"{', '.join(sorted(ARCHITECTURES))} (add one to mechscope/engines/arch.py), "
                       f"or try --backend bridge")
    return ARCHITECTURES[name]


def parallel_blocks(config) -> bool:
    """Whether attention and MLP read the same block input (GPT-NeoX / Pythia's use_parallel_residual)."""
    return bool(getattr(config, "use_parallel_residual", False))
