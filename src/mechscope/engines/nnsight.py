"""The nnsight engine: a Hugging Face causal LM under nnsight (local, device_map / max_memory offload, 8- and
4-bit bitsandbytes weights, NDIF remote), speaking transformer-lens's site names and shapes (engines/base.py).

Where each site is read in the module tree (paths per family in mechscope.engines.arch):
    hook_embed                 token-embedding output (Gemma's includes its sqrt(d_model) scale)
    hook_pos_embed             GPT-2's wpe output (rotary families have none)
    blocks.l.hook_resid_pre    block l's input          blocks.l.hook_resid_post   block l's output
    attn.hook_q / k / v        projection outputs viewed [batch, pos, heads, d_head] (GPT-2's fused c_attn
                               split in three; NeoX's query_key_value per head); before rotary, like TL's
    attn.hook_pattern          the attention weights [batch, head, dest, src] (eager attention); read only
    attn.hook_z                the output projection's input viewed [batch, pos, n_heads, d_head]
    hook_attn_out              the attention output (Gemma: after post_attention_layernorm)
    hook_resid_mid             resid_pre + attn_out (sequential blocks only); an edit sets
                               attn_out := new - resid_pre, so the block's own sum becomes `new`
    mlp.hook_post              the down projection's input (act(gate) * up on gated MLPs, like TL's)
    hook_mlp_out               the MLP output (Gemma: after post_feedforward_layernorm)
    hook_q_input / k / v       (edge patching; not in sites()) Hugging Face attention has no per-head input, so
                               it is derived: the block input (resid_pre, the attention norm's input) repeated
                               per head; when edited (or its gradient is asked for) the projection's heads are
                               recomputed from it, head h from its own copy x_h: norm(x_h) @ W[h] + b[h] with
                               the block's own norm weights, in place of the projection output (before rotary),
                               so a head's input changes that head alone, as transformer-lens's
                               use_split_qkv_input does. Needs local, unquantised weights.
    hook_mlp_in                (edge patching; not in sites()) the MLP norm's input: a copy of resid_mid (NeoX
                               parallel: of the block input) that only the MLP reads
Edits are applied in place of the module value (views are reshaped back), so a read returns the value after
the edits at its site and everything downstream sees the edit. nnsight requires one trace to visit modules
in forward order, so each call builds a plan of steps sorted by forward order and one trace walks it.

Remote (NDIF): `load_nnsight(hub_id, remote=True)` with NDIF_API_KEY set; every trace then runs with
remote=True. `NNsightEngine(model, remote="local")` runs the same serialisation path in-process (nnsight's
local stand-in), which is how the tests check the remote path offline. Weight accessors need local weights.

Cost (bench/nnsight_overhead.py, CPU, float32, 15 tokens, measured 2026-12 on a loaded 2-core machine): a
trace costs about 4 ms more than the plain Hugging Face forward it wraps (tiny 2-layer model: 15.6 vs 11.6 ms),
whatever it reads or edits; on a GPT-2-small-shaped checkpoint that is within the noise of one forward (1.00x,
batch 1 and 16), reading all 12 resid_post adds 1-4 %, and logits at one position (`positions=`) take 0.82x
(batch 1) / 0.71x (batch 16) of a full forward (the 50257-way unembedding runs on one position, not 15). So a
sweep pays per forward, not per trace: put many patched rows in one batch when the model is small.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from mechscope import hub
from mechscope.engines import arch as archs
from mechscope.engines.base import INPUT_KINDS, Edit, Engine, FinalNorm, Metric, ModelConfig, layer_of, on_device
from mechscope.errors import BadInput

# greedy decoding with none of a checkpoint's own generation settings (repetition penalties, banned words,
# EOS stops: EOS is handled as transformer-lens does, after the fact)
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
              suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
              sequence_bias=None, min_length=0, eos_token_id=None)


# ---------------------------------------------------------------- the plan one trace walks

@dataclass
class _Op:
    """One site at one module value: get(value, mem) -> activation (TL shape), put(value, act, mem) -> value."""
    site: str
    get: Callable
    put: Callable
    edits: list = field(default_factory=list)
    read: bool = False
    grad: bool = False                  # run_with_grads: make the forward use the returned activation
    keep: int | None = None             # remember the activation as this layer's resid_pre (for resid_mid)


@dataclass
class _Step:
    """One module value in the forward: path (from the root module), port "input" or "output", its ops."""
    order: tuple
    path: str
    port: str
    ops: list = field(default_factory=list)


def _apply(op: _Op, value, mem: dict, acts: dict):
    """Apply op's edits to a module value; record its read. -> the (possibly replaced) module value."""
    act = op.get(value, mem)
    for fn in op.edits:
        act = fn(act)
    if op.grad and not act.requires_grad:
        act = act.detach().requires_grad_(True)
    if op.keep is not None:
        mem[op.keep] = act
    if op.read:
        acts[op.site] = act if op.grad or not torch.is_grad_enabled() else act.detach()
    return op.put(value, act, mem) if op.edits or op.grad else value


def _visit(model, steps: list, acts: dict, batch: int) -> None:
    """Inside a trace: walk the steps in forward order, editing and reading module values."""
    mem = {"batch": batch}
    for step in steps:
        envoy = model.get(step.path)
        value = envoy.output if step.port == "output" else envoy.input
        new = value
        for op in step.ops:
            new = _apply(op, new, mem, acts)
        if new is not value:
            if step.port == "output":
                envoy.output = new
            else:
                envoy.input = new


def _remote_kwargs(remote) -> dict:
    return {"remote": remote} if remote else {}


def _traced_run(model, tokens, steps, unembed, positions, remote, skip=None):
    """One trace -> (logits, {site: activation}). skip: (blocks path, layer, resid): blocks before `layer` are
    not run, block `layer`'s input is resid."""
    import nnsight

    with model.trace(tokens, **_remote_kwargs(remote)):
        acts = nnsight.save({})
        if skip is not None:
            blocks, layer, resid = skip
            for skipped in range(layer):  # only the last one's output is used: the next block's input
                model.get(f"{blocks}.{skipped}").skip(resid)
        _visit(model, steps, acts, len(tokens))
        if positions is not None:  # unembed only the positions asked for
            lm_head = model.get(unembed)
            hidden = lm_head.input
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            lm_head.input = hidden[rows, positions.to(hidden.device)].unsqueeze(1)
        logits = nnsight.save(model.output.logits)
    return logits, acts


def _traced_reads(model, tokens, steps, remote) -> dict:
    """One trace stopped after its last step (nothing later runs: no unembedding) -> {site: activation}."""
    import nnsight

    with model.trace(tokens, **_remote_kwargs(remote)) as tracer:
        acts = nnsight.save({})
        _visit(model, steps, acts, len(tokens))
        tracer.stop()
    return acts


def _traced_grads(model, tokens, steps, metric, read, remote, here):
    """One trace with a backward inside it -> (metric, acts list, grads list), all detached. The metric runs on
    `here` (its own tensors live there; the logits come from the last layer's device)."""
    import nnsight

    with model.trace(tokens, **_remote_kwargs(remote)):
        acts = {}
        _visit(model, steps, acts, len(tokens))
        value = metric(model.output.logits.to(here))
        leaves = [acts[s] for s in read]
        grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
        result = nnsight.save((value.detach(), [a.detach() for a in leaves],
                               [torch.zeros_like(a) if g is None else g.detach() for a, g in zip(leaves, grads)]))
    return result


def _traced_generate(model, tokens, steps, max_new_tokens, use_kv_cache, pad_token_id, remote):
    """Greedy generation with the steps' edits at every forward -> ids [batch, seq + max_new_tokens]."""
    import nnsight

    with model.generate(tokens, max_new_tokens=max_new_tokens, use_cache=use_kv_cache, pad_token_id=pad_token_id,
                        **GREEDY, **_remote_kwargs(remote)) as tracer:
        if steps:
            for _ in tracer.iter[:max_new_tokens]:
                _visit(model, steps, {}, len(tokens))
        ids = nnsight.save(tracer.result)
    return ids


def _stop_at_eos(ids, prompt_len: int, eos: int | None):
    """transformer-lens's EOS rule: after a row's first EOS it continues with EOS; generation stops after the
    step at which every row has emitted one."""
    if eos is None:
        return ids
    new = ids[:, prompt_len:]
    done = (new == eos).cumsum(1) > 0
    new = torch.where(done, torch.full_like(new, eos), new)
    all_done = done.all(0).nonzero()
    if len(all_done):
        new = new[:, : int(all_done[0]) + 1]
    return torch.cat([ids[:, :prompt_len], new], 1)


# ---------------------------------------------------------------- site views

def _same(value, mem=None):
    return value


def _replace(value, act, mem=None):
    return act


def _first(value, mem=None):
    """A block's / attention's main output (transformers 5 blocks return a Tensor; 4 returned tuples)."""
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, act, mem=None):
    return (act, *value[1:]) if isinstance(value, tuple) else act


def _heads(n: int, d_head: int, start: int = 0, stride: int | None = None):
    """(get, put) for heads [..., n, d_head] stored in a feature slice [start, start + n*d_head) of a projection
    output (stride None), or interleaved per head as [n, stride] with this projection at [start, start+d_head)."""
    if stride is None:
        width = n * d_head

        def get(x, mem=None):
            return x[..., start:start + width].unflatten(-1, (n, d_head))

        def put(x, act, mem=None):
            return torch.cat([x[..., :start], act.flatten(-2), x[..., start + width:]], -1)
    else:
        def get(x, mem=None):
            return x.unflatten(-1, (n, stride))[..., start:start + d_head]

        def put(x, act, mem=None):
            y = x.unflatten(-1, (n, stride))
            return torch.cat([y[..., :start], act, y[..., start + d_head:]], -1).flatten(-2)
    return get, put


def _copy(value, mem=None):
    """A fresh tensor: what an edit or a gradient at it changes reaches only the module that reads it."""
    return value.clone()


def _pos_embed(value, mem):
    """GPT-2's wpe output is [1, pos, d_model]; transformer-lens's hook_pos_embed is [batch, pos, d_model]."""
    return value.expand(mem["batch"], -1, -1)


def _pattern(value, mem=None):
    weights = value[1] if isinstance(value, tuple) and len(value) > 1 else None
    if weights is None:
        raise BadInput("attention weights are not returned by this model's attention implementation; load it "
                       "with attn_implementation='eager' (load_model does)")
    return weights


def _resid_mid(layer: int, get_attn, put_attn):
    """(get, put) for resid_mid at the attention-output value: resid_pre (remembered) + attn_out."""
    def get(value, mem):
        return mem[layer] + get_attn(value)

    def put(value, act, mem):
        return put_attn(value, act - mem[layer])
    return get, put


# ---------------------------------------------------------------- the engine

class NNsightEngine(Engine):
    """An nnsight TransformersModel (a Hugging Face causal LM). remote: False, True (NDIF) or "local"
    (nnsight's in-process stand-in for the remote path)."""
    name = "nnsight"

    def __init__(self, model, remote: bool | str = False, model_name: str | None = None,
                 quantization: str | None = None):
        if getattr(model, "tokenizer", None) is None or not hasattr(model, "_module"):
            raise TypeError(f"NNsightEngine wraps an nnsight TransformersModel with a tokenizer, not a "
                            f"{type(model).__name__}: TransformersModel(hf_model, tokenizer=tokenizer)")
        self.model = model
        self.hf = model._module
        self.arch = archs.arch_of(self.hf)
        self.tokenizer = model.tokenizer
        self.remote = remote
        if remote:  # the trace bodies call this module (and edits may come from mechscope): ship them by value
            import nnsight

            nnsight.register("mechscope")
        self.quantization = quantization
        self.parallel = archs.parallel_blocks(self.hf.config)
        self.cfg = self._config(model_name)

    def _config(self, model_name: str | None) -> ModelConfig:
        c, a = self.hf.config, self.arch
        n_heads, d_model = c.num_attention_heads, c.hidden_size
        kv = getattr(c, "num_key_value_heads", None) or n_heads
        embed_module = self.hf.get_submodule(a.embed)
        embed = embed_module.weight
        device = "cpu" if self.remote or (embed.is_meta and self._offloaded(embed_module) is None) else \
            str(self._runs_on(embed_module))
        return ModelConfig(
            model_name=model_name or str(getattr(c, "_name_or_path", "") or type(self.hf).__name__),
            original_architecture=(getattr(c, "architectures", None) or [type(self.hf).__name__])[0],
            n_layers=c.num_hidden_layers, n_heads=n_heads, d_model=d_model,
            d_head=getattr(c, "head_dim", None) or d_model // n_heads,
            d_mlp=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d_model,
            d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings,
            n_params=sum(p.numel() for p in self.hf.parameters()),
            n_key_value_heads=kv if kv != n_heads else None, parallel_attn_mlp=self.parallel,
            gated_mlp=a.gated_mlp, normalization_type=a.norm,
            positional_embedding_type="rotary" if a.rotary else "standard",
            device=device, dtype=embed.dtype)

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text, prepend_bos: bool = True, truncate: bool = False):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows = [([self.bos_token_id] if prepend_bos else []) + r for r in rows]
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.cfg.device)

    def to_str_tokens(self, tokens, prepend_bos: bool = True) -> list[str]:
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens, prepend_bos=prepend_bos)
        ids = torch.as_tensor(tokens).reshape(-1).tolist()
        return self.tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)

    def to_string(self, tokens) -> str:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- sites
    def _eager(self) -> bool:
        return getattr(self.hf.config, "_attn_implementation", None) == "eager"

    def sites(self) -> list[str]:
        names = ["hook_embed"] + (["hook_pos_embed"] if self.arch.pos_embed else [])
        kinds = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "attn.hook_q", "attn.hook_k",
                 "attn.hook_v", "attn.hook_z", "mlp.hook_post"]
        kinds += [] if self.parallel else ["hook_resid_mid"]
        kinds += ["attn.hook_pattern"] if self._eager() else []
        return names + [f"blocks.{l}.{k}" for l in range(self.cfg.n_layers) for k in kinds]

    def has_site(self, site: str) -> bool:
        """sites(), plus the per-head / per-MLP inputs (INPUT_KINDS): derived from local weights (not listed in
        sites(), as on the tl engine)."""
        if site.endswith(INPUT_KINDS):
            layer = layer_of(site)
            return (layer is not None and 0 <= layer < self.cfg.n_layers and site.count(".") == 2
                    and not self.remote and self.quantization is None)
        return super().has_site(site)

    def missing_site_hint(self, site: str) -> str:
        if site.endswith(INPUT_KINDS) and (self.remote or self.quantization):
            return ("the nnsight engine derives per-head inputs from the model's weights, which need a local load "
                    "without --quantization (or use --backend tl)")
        if site.endswith("attn.hook_pattern"):
            return "load the model with attn_implementation='eager' (load_model does) to read attention patterns"
        return super().missing_site_hint(site)

    def _where(self, site: str):
        """site -> (order, path, port, get, put): where in the forward the site lives and how it is viewed."""
        a, c = self.arch, self.cfg
        if site == "hook_embed":
            return (-1, 0), a.embed, "output", _same, _replace
        if site == "hook_pos_embed":
            return (-1, 1), a.pos_embed, "output", _pos_embed, _replace
        layer = layer_of(site)
        kind = site.split(".", 2)[2]
        block = f"{a.blocks}.{layer}"
        H, kv, dh = c.n_heads, c.n_key_value_heads or c.n_heads, c.d_head
        if kind == "hook_resid_pre":
            return (layer, 0), block, "input", _same, _replace
        if kind in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
            i = "qkv".index(kind[-1])
            if a.qkv_layout == "separate":
                return ((layer, 1 + i), f"{block}.{a.qkv[i]}", "output", *_heads(H if i == 0 else kv, dh))
            view = _heads(H, dh, start=i * H * dh) if a.qkv_layout == "split" else _heads(H, dh, i * dh, 3 * dh)
            return ((layer, 1, i), f"{block}.{a.qkv[0]}", "output", *view)
        if kind in ("hook_q_input", "hook_k_input", "hook_v_input"):  # before hook_q / k / v at the same value
            order, path, port, get, put = self._where(f"blocks.{layer}.attn.hook_{kind[5]}")
            return ((*order[:-1], order[-1] - 0.5), path, port, *self._head_inputs(layer, path, get, put))
        if kind == "hook_mlp_in":
            return (layer, 6, 1), f"{block}.{a.mlp_norm}", "input", _copy, _replace
        if kind == "attn.hook_z":
            return ((layer, 4), f"{block}.{a.o_proj}", "input", *_heads(H, dh))
        if kind == "attn.hook_pattern":
            return (layer, 5, 0), f"{block}.{a.attn}", "output", _pattern, None
        if kind in ("hook_attn_out", "hook_resid_mid"):
            if a.attn_out_norm:
                where = ((layer, 6), f"{block}.{a.attn_out_norm}", "output", _same, _replace)
            else:
                where = ((layer, 5, 1), f"{block}.{a.attn}", "output", _first, _replace_first)
            if kind == "hook_attn_out":
                return where
            order, path, port, get, put = where
            return ((*order, 2), path, port, *_resid_mid(layer, get, put))
        if kind == "mlp.hook_post":
            return (layer, 7), f"{block}.{a.down_proj}", "input", _same, _replace
        if kind == "hook_mlp_out":
            if a.mlp_out_norm:
                return (layer, 9), f"{block}.{a.mlp_out_norm}", "output", _same, _replace
            return (layer, 8), f"{block}.{a.mlp}", "output", _first, _replace_first
        if kind == "hook_resid_post":
            return (layer, 10), block, "output", _first, _replace_first
        raise BadInput(f"unknown site {site!r}")

    def _plan(self, read: Sequence[str] = (), edits: Sequence[Edit] = (), grad: bool = False) -> list[_Step]:
        """The steps one trace walks for these reads and edits, in forward order."""
        self.require(list(read) + [site for site, _ in edits])
        for site, _ in edits:
            if site.endswith("attn.hook_pattern"):
                raise BadInput(f"the nnsight engine reads attention patterns but cannot edit them ({site}): Hugging "
                               f"Face attention mixes values inside one function; edit attn.hook_z / hook_v instead, "
                               f"or use --backend tl")
        if grad:
            for site in read:
                if site.endswith("attn.hook_pattern"):
                    raise BadInput(f"gradients at {site} need --backend tl: on nnsight the pattern is a copy the "
                                   f"forward does not use")
        ops: dict[str, _Op] = {}
        where = {}

        def op(site):
            if site not in ops:
                order, path, port, get, put = where[site] = self._where(site)
                ops[site] = _Op(site, get, put)
            return ops[site]

        for site, fn in edits:
            op(site).edits.append(on_device(fn, self.cfg.device))
        for site in read:
            op(site).read, op(site).grad = True, grad
        for site in [s for s in ops if s.endswith(("hook_resid_mid", *INPUT_KINDS[:3]))]:  # need the block input
            op(f"blocks.{layer_of(site)}.hook_resid_pre").keep = layer_of(site)
        steps: dict[tuple, _Step] = {}
        for site in sorted(ops, key=lambda s: where[s][0]):
            order, path, port = where[site][:3]
            steps.setdefault((path, port), _Step(order, path, port)).ops.append(ops[site])
        return sorted(steps.values(), key=lambda s: s.order)

    def _head_inputs(self, layer: int, path: str, get, put):
        """(get, put) of a per-head input at its projection's output (get, put: the projection's hook_q / k / v
        view). get: the block input remembered at resid_pre, repeated per head [batch, pos, n, d_model]; put:
        the projection's heads recomputed, head h from its own copy x_h as norm(x_h) @ W[h] + b[h]."""
        weight = get(self._linear_weight(path)).transpose(0, 1)                      # [n, d_model, d_head]
        bias = self._module(path).bias
        bias = 0 if bias is None else get(bias)                                      # [n, d_head]
        norm = self._norm(f"{self.arch.blocks}.{layer}.{self.arch.attn_norm}")

        def get_input(value, mem):
            return mem[layer][:, :, None].expand(-1, -1, weight.shape[0], -1)

        def put_input(value, act, mem):
            return put(value, torch.einsum("bpnd,nde->bpne", norm(act), weight) + bias, mem)
        return get_input, put_input

    def _norm(self, path: str):
        """The norm module at path as a function of [..., d_model], computed from its weights (inside a trace,
        so the module itself runs once per forward, as nnsight expects)."""
        module = self._module(path)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-5)
        if self.arch.norm == "LN":
            return lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:], module.weight, module.bias, eps)
        offset = self.arch.norm_weight_offset

        def rms(x):  # normalised in float32, then scaled as Llama's (Gemma's) RMSNorm does it
            y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            return (y * (offset + module.weight.float())).to(x.dtype) if offset else module.weight * y.to(x.dtype)
        return rms

    # ---------------------------------------------------------------- running
    def _tokens(self, tokens):
        tokens = torch.as_tensor(tokens)
        return tokens if self.remote else tokens.to(self.cfg.device)

    def _here(self, tensor):
        """On cfg.device (where the embeddings are): with a device_map, later layers live elsewhere."""
        return tensor.to(self.cfg.device)

    def run(self, tokens, read: Sequence[str] = (), edits: Sequence[Edit] = (), positions=None):
        return self._run(tokens, self._plan(read, edits), positions)

    def activations(self, tokens, read: Sequence[str], edits: Sequence[Edit] = ()) -> dict:
        """The trace stops after the last step that reads (nnsight's tracer.stop())."""
        steps = self._plan(read, edits)
        reads = [i for i, step in enumerate(steps) if any(op.read for op in step.ops)]
        if not reads:
            return {}
        acts = _traced_reads(self.model, self._tokens(tokens), steps[:reads[-1] + 1], self.remote)
        return {site: self._here(act) for site, act in acts.items()}

    def run_from(self, layer: int, resid, tokens, read: Sequence[str] = (), edits: Sequence[Edit] = (),
                 positions=None):
        if layer == 0:
            return self.run(tokens, read, edits, positions)
        early = [site for site in read if (layer_of(site) if site.startswith("blocks.") else -1) < layer]
        if early:
            raise ValueError(f"run_from({layer}) cannot read {early}: those blocks are skipped")
        steps = [step for step in self._plan(read, edits) if step.order[0] >= layer]
        return self._run(tokens, steps, positions, skip=(self.arch.blocks, layer, resid))

    def _run(self, tokens, steps, positions, skip=None):
        tokens = self._tokens(tokens)
        if positions is not None:
            positions = torch.as_tensor(positions, device=tokens.device)
        logits, acts = _traced_run(self.model, tokens, steps, self.arch.unembed, positions, self.remote, skip)
        logits = logits[:, 0] if positions is not None else logits
        return self._here(logits), {site: self._here(act) for site, act in acts.items()}

    def run_with_grads(self, tokens, metric: Metric, read: Sequence[str], edits: Sequence[Edit] = ()):
        steps = self._plan(read, edits, grad=True)
        with torch.enable_grad():
            value, acts, grads = _traced_grads(self.model, self._tokens(tokens), steps, metric, list(read), self.remote,
                                               self.cfg.device)
        here = self._here
        return here(value), {s: here(a) for s, a in zip(read, acts)}, {s: here(g) for s, g in zip(read, grads)}

    def generate(self, tokens, edits: Sequence[Edit] = (), max_new_tokens: int = 10, use_kv_cache: bool = True):
        steps = self._plan((), edits)
        tokens = self._tokens(tokens)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = _traced_generate(self.model, tokens, steps, max_new_tokens, use_kv_cache, pad, self.remote)
        return _stop_at_eos(ids.to(tokens.device), tokens.shape[1], tok.eos_token_id)

    # ---------------------------------------------------------------- weights (transformer-lens shapes)
    def _module(self, path: str):
        module = self.hf.get_submodule(path)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.is_meta and self._offloaded(module) is None:
            if self.remote:
                raise BadInput("this model's weights are on NDIF, not here: weight-based analyses (W_O, W_U, "
                               "readout, DLA) need a local load (drop --remote)")
            if getattr(self.model, "dispatched", True) is False:
                raise BadInput("this nnsight model is not dispatched (a meta-device skeleton, as for --remote): "
                               "weight-based analyses (W_O, W_U, readout, DLA) need its weights; call "
                               "model.dispatch() first, or load it with load_model")
            raise BadInput(f"{path}'s weights are on the meta device and no accelerate offload hook holds them: "
                           f"weight-based analyses (W_O, W_U, readout, DLA, SAEs) need them loaded")
        if weight is not None and not weight.is_floating_point():
            raise BadInput(f"{path} holds {self.quantization or 'quantised'} weights; weight-based analyses need a "
                           f"load without --quantization")
        return module

    @staticmethod
    def _offloaded(module):
        """accelerate's hook of a module whose weights are offloaded (CPU or disk; the parameters are meta
        tensors and the hook's weights_map holds the values), else None."""
        hook = getattr(module, "_hf_hook", None)
        return hook if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None else None

    def _runs_on(self, module):
        """The device a module computes on: accelerate's execution device for an offloaded one."""
        hook = self._offloaded(module)
        return torch.device(hook.execution_device) if hook is not None else module.weight.device

    def _param(self, path: str, name: str = "weight"):
        """A module's parameter (None when absent); an offloaded one read through accelerate's hook onto the
        module's execution device (one matrix at a time: lm_head is the usual one offloaded)."""
        module = self._module(path)
        value = getattr(module, name, None)
        if value is None or not value.is_meta:
            return value
        return self._offloaded(module).weights_map[name].to(self._runs_on(module), value.dtype)

    def _linear_weight(self, path: str):
        """[in, out] of a projection (nn.Linear stores [out, in], GPT-2's Conv1D [in, out])."""
        w = self._param(path)
        return w if self.arch.conv1d else w.T

    def W_O(self, layer: int):
        c = self.cfg
        w = self._linear_weight(f"{self.arch.blocks}.{layer}.{self.arch.o_proj}")
        return w.reshape(c.n_heads, c.d_head, c.d_model)

    def b_O(self, layer: int):
        bias = self._param(f"{self.arch.blocks}.{layer}.{self.arch.o_proj}", "bias")
        return bias if bias is not None else torch.zeros(self.cfg.d_model, device=self.cfg.device, dtype=self.cfg.dtype)

    def W_out(self, layer: int):
        return self._linear_weight(f"{self.arch.blocks}.{layer}.{self.arch.down_proj}")

    @property
    def W_U(self):
        return self._param(self.arch.unembed).T

    @property
    def b_U(self):
        bias = self._param(self.arch.unembed, "bias")
        if bias is not None:
            return bias
        lm_head = self._module(self.arch.unembed)
        return torch.zeros(self.cfg.d_vocab, device=self._runs_on(lm_head), dtype=lm_head.weight.dtype)

    @property
    def final_norm(self) -> FinalNorm:
        path = self.arch.final_norm
        norm = self._module(path)
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-5)
        weight = self._param(path)
        weight = weight + self.arch.norm_weight_offset if self.arch.norm_weight_offset else weight
        return FinalNorm(self.arch.norm, weight, self._param(path, "bias"), float(eps))

    def readout(self, resid):
        norm, lm_head = self._module(self.arch.final_norm), self._module(self.arch.unembed)
        logits = lm_head(norm(resid.to(self._runs_on(lm_head), lm_head.weight.dtype)))
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def info(self) -> dict:
        return {**super().info(), "remote": bool(self.remote), "quantization": self.quantization}


# ---------------------------------------------------------------- loading

def _source(spec: str) -> tuple[str, str]:
    """(what from_pretrained loads, the model's name) for the bundled model, a local directory or a hub id."""
    from mechscope.catalog import BUNDLED

    if spec in (BUNDLED, "toy"):
        from mechscope.toy.export import HF_DIR

        if not (HF_DIR / "config.json").exists():
            raise BadInput(f"the bundled model's Hugging Face export is missing in {HF_DIR}; run "
                           f"`python -m mechscope.toy.export`")
        return str(HF_DIR), BUNDLED
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), spec
    if "/" not in spec:  # a transformer-lens alias ("gpt2-small", "pythia-70m") -> its hub id
        from mechscope.catalog import _official_name

        return _official_name(spec), spec
    return spec, spec


def _hub_error(spec: str, error: Exception, offline: bool) -> BadInput:
    what = (f"cannot reach the Hugging Face hub and {spec!r} is not in its local cache" if offline else
            f"could not fetch {spec!r} from the Hugging Face hub ({type(error).__name__}: a typo, or a gated model?)")
    return BadInput(f"{what}; pass a local directory saved with save_pretrained, or use mechscope-toy")


def _quantization_config(quantization: str, dtype):
    import importlib.util

    if quantization not in ("8bit", "4bit"):
        raise BadInput(f"unknown quantization {quantization!r}; use 8bit or 4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput(f"--quantization {quantization} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


def _load_remote(spec: str) -> NNsightEngine:
    """A meta-device skeleton of a hub model whose traces run on NDIF."""
    from mechscope.catalog import BUNDLED

    if spec in (BUNDLED, "toy") or Path(spec).expanduser().is_dir():
        raise BadInput(f"--remote runs on NDIF, which serves hub models: pass a hub id (e.g. "
                       f"meta-llama/Llama-3.1-8B), not {spec!r}")
    key = os.environ.get("NDIF_API_KEY")
    if not key:
        raise BadInput("--remote needs an NDIF API key: set NDIF_API_KEY (sign up at https://login.ndif.us)")
    import nnsight
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    nnsight.CONFIG.API.APIKEY = key
    offline = hub.offline_reason() is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline)
        model = TransformersModel(spec, task="text-generation", tokenizer=tokenizer, attn_implementation="eager",
                                  local_files_only=offline)
    except Exception as e:  # noqa: BLE001  (hub errors come as OSError, HTTPError or nnsight's CheckpointUnreachable)
        raise _hub_error(spec, e, offline) from None
    return NNsightEngine(model, remote=True, model_name=spec)


def load_nnsight(spec: str, device: str, dtype, device_map=None, max_memory=None, quantization=None,
                 remote: bool = False, offload_folder: str | None = None) -> NNsightEngine:
    """An NNsightEngine for the bundled model (its Hugging Face export), a local directory or a hub id, loaded
    with eager attention (so patterns exist). device_map / max_memory / offload_folder go to from_pretrained;
    quantization
    "8bit" / "4bit" loads bitsandbytes weights; remote=True runs every trace on NDIF."""
    if remote:
        return _load_remote(spec)
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mechscope import compute
    from mechscope.catalog import resolve_dtype

    source, name = _source(spec)
    offline = not Path(source).is_dir() and hub.offline_reason() is not None
    cache_only = {"local_files_only": True} if offline else {}
    try:
        config = AutoConfig.from_pretrained(source, **cache_only)
    except OSError as e:
        raise _hub_error(spec, e, offline) from None
    try:
        n_params = compute.shape_from_hf_config(config.to_dict(), name).n_params
    except BadInput:
        n_params = None
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    torch_dtype = resolve_dtype(dtype, device, n_params, architecture) if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype, "attn_implementation": "eager", **cache_only}
    if quantization:
        kwargs["quantization_config"] = _quantization_config(quantization, torch_dtype)
        device_map = device_map or {"": device}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise _hub_error(spec, e, offline) from None
    except ValueError as e:  # weights placed on disk that are not read from safetensors as they are
        if "offload_folder" not in str(e) and "offload_dir" not in str(e):
            raise
        raise BadInput("this --device-map puts weights on disk that must be written out first (the checkpoint "
                       "is not safetensors, or its weights are converted when loaded): pass --offload-folder DIR"
                       ) from None
    if device_map is None:
        hf = hf.to(device)
    if next(iter((getattr(hf, "hf_device_map", None) or {"": None}).values())) == "disk":  # no device to run on
        raise BadInput("--device-map put the embeddings on disk (--max-memory leaves them no room on a device): "
                       "raise --max-memory")
    archs.arch_of(hf)  # BadInput before anything else for an architecture without a module map
    model = TransformersModel(hf.eval(), tokenizer=AutoTokenizer.from_pretrained(source, **cache_only))
    return NNsightEngine(model, model_name=name, quantization=quantization)
