"""Checked conversions from user input to tensors: every check raises BadInput with a fix in the message."""
from __future__ import annotations

import re

from mechscope.errors import BadInput


def tokens(model, prompt: str, prepend_bos: bool = True):
    """[1, seq] token ids of a non-empty prompt that fits the model's context."""
    if not prompt or not prompt.strip():
        raise BadInput("the prompt is empty; pass some text")
    toks = model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
    if toks.shape[1] > model.cfg.n_ctx:
        raise BadInput(f"the prompt is {toks.shape[1]} tokens; this model's context is {model.cfg.n_ctx}. "
                       f"Shorten it")
    return toks


def token_batch(model, prompts: list[str], prepend_bos: bool = True):
    """[n, seq] token ids of prompts that must all have the same number of tokens (no padding to misread)."""
    rows = [tokens(model, p, prepend_bos) for p in prompts]
    lengths = {r.shape[1] for r in rows}
    if len(lengths) > 1:
        detail = ", ".join(f"{p!r}: {r.shape[1]}" for p, r in zip(prompts, rows))
        raise BadInput(f"prompts must have the same number of tokens ({detail}); rephrase them")
    import torch
    return torch.cat(rows)


def paired_tokens(model, clean: str, corrupted: str, prepend_bos: bool = True):
    """(clean, corrupted) [1, seq] token ids of equal length."""
    c, k = tokens(model, clean, prepend_bos), tokens(model, corrupted, prepend_bos)
    if c.shape != k.shape:
        raise BadInput(f"clean and corrupted prompts must have the same number of tokens "
                       f"(clean: {c.shape[1]}, corrupted: {k.shape[1]}); "
                       f"clean = {model.to_str_tokens(c[0])}, corrupted = {model.to_str_tokens(k[0])}")
    return c, k


def single_token(model, word: str) -> int:
    """The id of `word` as one token (a leading space is tried first, as GPT-2-style vocabularies need)."""
    if not word or not word.strip():
        raise BadInput("an answer token is empty; pass a word")
    for candidate in ((" " + word.strip(), word) if not word.startswith(" ") else (word,)):
        ids = model.to_tokens(candidate, prepend_bos=False)[0]
        if len(ids) == 1 and ids[0] != getattr(model.tokenizer, "unk_token_id", None):
            return int(ids[0])
    pieces = model.to_str_tokens(word, prepend_bos=False)
    raise BadInput(f"answer {word!r} is not a single token for this model (it is {pieces}); pick one token")


def layer(model, value: int, allow_final: bool = False) -> int:
    """A layer index in range (negative counts from the end); `allow_final` admits n_layers."""
    n = model.cfg.n_layers + (1 if allow_final else 0)
    if not -n <= value < n:
        raise BadInput(f"layer {value} is out of range: this model has {model.cfg.n_layers} layers (0..{n - 1})")
    return value % n


def head(model, layer_index: int, head_index: int) -> tuple[int, int]:
    layer_index = layer(model, layer_index)
    if not 0 <= head_index < model.cfg.n_heads:
        raise BadInput(f"head {head_index} is out of range: layer {layer_index} has heads 0..{model.cfg.n_heads - 1}")
    return layer_index, head_index


def parse_heads(model, spec: str) -> list[tuple[int, int]]:
    """'1.2,0.3' or 'L1H2 L0H3' -> [(1, 2), (0, 3)], each checked against the model."""
    items = [s for s in re.split(r"[,\s]+", spec.strip()) if s]
    out = []
    for item in items:
        m = re.fullmatch(r"(?:L)?(-?\d+)[.H:](\d+)", item, flags=re.IGNORECASE)
        if not m:
            raise BadInput(f"cannot read head {item!r}: write LAYER.HEAD, e.g. 1.2")
        out.append(head(model, int(m.group(1)), int(m.group(2))))
    if not out:
        raise BadInput("no heads given: write LAYER.HEAD[,LAYER.HEAD...], e.g. 1.2,0.3")
    return out


def names_from_list(spec: str, allowed, what: str) -> list[str]:
    """'a,b' (or 'all') -> ['a', 'b'], each one of `allowed`; `what` names the option in the error."""
    allowed = list(allowed)
    names = allowed if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise BadInput(f"unknown {what} {', '.join(unknown) or repr(spec)}; use {', '.join(allowed)} or all")
    return names
