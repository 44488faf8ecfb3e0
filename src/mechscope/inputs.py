"""Checked conversions from user input to numbers and tensors: every check raises BadInput with a fix in
the message (argparse types raise argparse.ArgumentTypeError, which the CLI prints as one line, exit 2)."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from mechscope.errors import BadInput

MAX_SEED = 2**63 - 1   # torch takes seeds below 2**64; commands derive a few more as seed + small offsets


def finite_float(text: str) -> float:
    """argparse type: a finite number ('nan', 'inf' and overflows such as 1e309 are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; pass a finite value")
    return value


def float_list(text: str, what: str) -> list[float]:
    """'0,2.5,1e-3' -> [0.0, 2.5, 0.001]; BadInput naming `what` (the option) unless every item is a finite number."""
    values = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        try:
            values.append(finite_float(item))
        except argparse.ArgumentTypeError:
            raise BadInput(f"{what}: {item!r} in {text!r} is not a finite number; write comma-separated finite "
                           f"numbers, e.g. 0,2,4") from None
    return values


def seed(text: str) -> int:
    """argparse type: an integer seed in 0..2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is out of range; a seed is an integer in 0..{MAX_SEED}")
    return value


def top_k(k: int, available: int, what: str = "--top-k", of: str = "items") -> int:
    """`k` if 1 <= k <= available, else BadInput naming the option and the limit."""
    if not 1 <= k <= available:
        raise BadInput(f"{what} {k} is out of range: pick 1..{available} (there are {available} {of})")
    return k


def read_text(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file, or BadInput naming `what` (e.g. "pairs file") if it is missing or not text."""
    file = Path(path)
    if file.is_dir():
        raise BadInput(f"{what} {path} is a directory; pass a file")
    if not file.is_file():
        raise BadInput(f"{what} {path} does not exist")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror}") from None


def read_json(path: str | Path, what: str):
    """The parsed contents of a JSON file, or BadInput naming `what` (e.g. "the pairs file")."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{what} {path} is not JSON ({e.msg}, line {e.lineno})") from None


def tokens(model, prompt: str, prepend_bos: bool = True):
    """[1, seq] token ids of a non-empty prompt that fits the model's context."""
    if not isinstance(prompt, str):
        raise BadInput(f"a prompt must be text, not {type(prompt).__name__} ({str(prompt)[:40]})")
    if not prompt or not prompt.strip():
        raise BadInput("the prompt is empty; pass some text")
    toks = model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
    if toks.shape[1] > model.cfg.n_ctx:
        raise BadInput(f"the prompt is {toks.shape[1]} tokens; this model's context is {model.cfg.n_ctx}. "
                       f"Shorten it")
    _record_unknown(model, prompt, toks[0])
    return toks


# prompts of the running command that hold unknown tokens: (prompt, count, words); the CLI warns of them
_unknown: list[tuple[str, int, list[str]]] = []


def unknown_token_id(model) -> int | None:
    """The tokenizer's unknown token (<unk>), unless it doubles as BOS / EOS / padding (GPT-2's does)."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    special = {getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return None if unk is None or unk in special else unk


def _record_unknown(model, prompt: str, ids) -> None:
    unk = unknown_token_id(model)
    count = int((ids == unk).sum()) if unk is not None else 0
    if count and prompt not in (p for p, _, _ in _unknown):
        words = [w for w in dict.fromkeys(re.findall(r"\w+|[^\w\s]", prompt))
                 if unk in model.to_tokens(w, prepend_bos=False)[0].tolist()]
        _unknown.append((prompt, count, words))


def unknown_token_note() -> str | None:
    """One warning for the prompts tokenised since the last call that hold unknown tokens (then forgotten)."""
    if not _unknown:
        return None
    (prompt, count, words), n = _unknown[0], len(_unknown)
    _unknown.clear()
    more = f" (and {n - 1} more prompt(s))" if n > 1 else ""
    return (f"{prompt!r} holds {count} unknown token(s) ({', '.join(map(repr, words)) or '?'}){more}: the model "
            f"reads each as one placeholder with no meaning, which blurs every number; rephrase in the model's "
            f"vocabulary (mechscope predict shows a prompt's tokens)")


def refuse_unknown(model, token_id: int, what: str) -> None:
    """BadInput if `token_id` is the unknown token: an answer or a named position must be a known token."""
    if token_id == unknown_token_id(model):
        raise BadInput(f"{what} is an unknown token ({model.tokenizer.unk_token}) for this model; use a word "
                       f"in its vocabulary")


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
    if not isinstance(word, str):
        raise BadInput(f"an answer token must be text, not {type(word).__name__} ({str(word)[:40]})")
    if not word or not word.strip():
        raise BadInput("an answer token is empty; pass a word")
    for candidate in ((" " + word.strip(), word) if not word.startswith(" ") else (word,)):
        ids = model.to_tokens(candidate, prepend_bos=False)[0]
        if len(ids) == 1 and ids[0] != getattr(model.tokenizer, "unk_token_id", None):
            return int(ids[0])
    pieces = model.to_str_tokens(word, prepend_bos=False)
    raise BadInput(f"answer {word!r} is not a single token for this model (it is {pieces}); pick one token")


def distinct_answers(answers, wrongs) -> None:
    """BadInput where a prompt's answer and wrong are the same token (the logit difference would be 0 by
    definition). answers, wrongs: sequences of token ids (wrongs None: no wrong answers)."""
    if wrongs is None:
        return
    same = [i for i, (a, w) in enumerate(zip(list(answers), list(wrongs))) if int(a) == int(w)]
    if same:
        raise BadInput(f"answer and wrong are the same token (prompt {same[0] + 1}; for --prompt / --clean: --answer "
                       f"and --wrong): the logit difference would be 0 by definition; pick two different tokens")


def layer(model, value: int, allow_final: bool = False) -> int:
    """A layer index in 0..n_layers - 1 (a negative one is refused, not counted from the end: -1 would silently
    become the last layer); `allow_final` admits n_layers."""
    n = model.cfg.n_layers + (1 if allow_final else 0)
    if not 0 <= value < n:
        raise BadInput(f"layer {value} is out of range: this model has {model.cfg.n_layers} layers, numbered "
                       f"0..{n - 1}")
    return value


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
        if out[-1] in out[:-1]:
            raise BadInput(f"head {item} is listed twice; list each head once")
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
