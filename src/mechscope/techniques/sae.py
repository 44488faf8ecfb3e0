"""Sparse autoencoders (sae-lens 6) on any engine: load one, check it fits the model, read its features, splice it.

An SAE from sae-lens rewrites an activation x [d_in] at one hook as f = encode(x) [d_sae] (sparse,
non-negative) and x_hat = decode(f) = f @ W_dec + b_dec. Everything here goes through the engine
interface (`engine.run(tokens, read=[hook])`, `edits=[(hook, fn)]`), so it runs on every engine; the
tests check it against sae-lens's own `HookedSAETransformer` on the transformer-lens model.

Loading (`load_sae`): the SAE shipped for the bundled model (`mechscope-toy`, i.e.
`mechscope-toy:blocks.1.hook_resid_pre`), a local directory written by `sae.save_model`, or a pretrained
release from sae-lens's directory as `RELEASE:SAE_ID` (e.g. `gpt2-small-res-jb:blocks.8.hook_resid_pre`;
needs the Hugging Face hub).

Fit (`check_fits`): an SAE used on another model, hook, width or weight processing still produces
numbers, just meaningless ones; so d_in, hook, model name and the processing that changes the hook's
activations must match the engine, or BadInput says which. Processing (`weight_processing`) is measured
from the engine's weights, not assumed: transformer-lens's `center_writing_weights` removes the mean of
every residual-stream write (so residual-stream SAEs see different vectors with and without it), and
`fold_value_biases` moves b_V into b_O (so hook_v / hook_z differ); `fold_ln` and `center_unembed` leave
every site's activations unchanged. Missing keys in an SAE's `model_from_pretrained_kwargs` mean
`HookedTransformer.from_pretrained`'s defaults (all four on).

Positions holding special tokens (BOS, EOS, PAD: sae-lens's `get_special_token_ids`) are left out of
every statistic and left alone by every splice: the BOS residual is huge and unlike any other, and SAEs
are trained without it (`exclude_special_tokens`).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from mechscope.engines.base import vocab_mean
from mechscope.errors import BadInput

SHIPPED_RELEASE = "mechscope-toy"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "toy" / "saes"
DEFAULT_SHIPPED_ID = "blocks.1.hook_resid_pre"
PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
# which processing flags change the activations at a site (by site suffix); the others leave them unchanged
_WRITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed",
           "hook_pos_embed")
PROCESSING_THAT_MATTERS = {"center_writing_weights": _WRITES, "fold_value_biases": ("attn.hook_v", "attn.hook_z")}


# --------------------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def quiet_sae_lens():
    """Silence sae-lens's log lines and warnings that mislead here (an overridden model or dataset, "load the
    model with from_pretrained_no_processing", tensor copies, a new epoch): mechscope checks what they hint at."""
    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            log.setLevel(level)


def shipped_saes() -> dict[str, Path]:
    """{sae_id: directory} of the SAEs shipped for the bundled model."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(SHIPPED_DIR.iterdir()) if (d / "cfg.json").exists()}


def _load_directory(path: Path, device: str):
    from sae_lens import SAE

    if not (path / "cfg.json").exists():
        raise BadInput(f"{path} has no cfg.json: pass a directory written by sae.save_model (or `mechscope sae-train`)")
    try:
        with quiet_sae_lens():
            return SAE.load_from_disk(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - a broken directory is the user's to fix
        raise BadInput(f"cannot load the SAE in {path} ({type(e).__name__}: {str(e)[:160]})") from None


def require_sae_lens() -> None:
    """BadInput when sae-lens cannot be imported (it needs transformer-lens < 4)."""
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise BadInput(f"the SAE commands need sae-lens ({e}); pip install sae-lens (it requires "
                       f"transformer-lens < 4)") from None


def load_sae(spec: str, device: str = "cpu"):
    """An sae-lens SAE from `spec` (see the module docstring), on `device`, in eval mode."""
    require_sae_lens()
    spec = (spec or "").strip()
    if not spec:
        raise BadInput("the SAE is empty; pass --sae mechscope-toy, a directory, or RELEASE:SAE_ID")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, device).eval()
    if spec.startswith((".", "/", "~")):
        raise BadInput(f"SAE directory {spec} does not exist")
    release, _, sae_id = spec.partition(":")
    if release == SHIPPED_RELEASE:
        shipped = shipped_saes()
        sae_id = sae_id or DEFAULT_SHIPPED_ID
        if sae_id not in shipped:
            raise BadInput(f"no shipped SAE {sae_id!r} for {SHIPPED_RELEASE}; shipped: {', '.join(shipped) or 'none'}")
        return _load_directory(shipped[sae_id], device).eval()
    return _load_pretrained(release, sae_id, device).eval()


def _load_pretrained(release: str, sae_id: str, device: str):
    """A release from sae-lens's pretrained directory (downloads from the Hugging Face hub)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise BadInput(f"unknown SAE {release!r}: not {SHIPPED_RELEASE!r}, not a directory, and not a release in "
                       f"sae-lens's pretrained directory (write RELEASE:SAE_ID, e.g. gpt2-small-res-jb:blocks.8.hook_resid_pre)")
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        raise BadInput(f"release {release} has no SAE {sae_id!r}; write {release}:ID with ID one of "
                       f"{', '.join(ids[:6])}{', ...' if len(ids) > 6 else ''}")
    try:
        with quiet_sae_lens():
            return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:  # noqa: BLE001 - hub and network errors come in many types
        raise BadInput(f"could not fetch SAE {release}:{sae_id} from the Hugging Face hub ({type(e).__name__}); "
                       f"offline? pass a local directory saved with sae.save_model, or {SHIPPED_RELEASE!r}") from None


def sae_directory(spec: str) -> Path | None:
    """The directory an SAE spec loads from (shipped or local), or None (a pretrained release)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    release, _, sae_id = spec.partition(":")
    return shipped_saes().get(sae_id or DEFAULT_SHIPPED_ID) if release == SHIPPED_RELEASE else None


def named_features(spec: str) -> dict[str, dict]:
    """{name: {"feature": index, "description": ...}} from features.json beside the SAE (the shipped SAE's card)."""
    import json

    directory = sae_directory(spec)
    file = directory / "features.json" if directory is not None else None
    return json.loads(file.read_text()) if file is not None and file.exists() else {}


def parse_features(spec: str, sae, names: dict | None = None) -> list[int]:
    """'12,40' or feature names ('country,capital_of') -> feature indices, each checked against d_sae."""
    names = names or {}
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item in names:
            out.append(int(names[item]["feature"]))
            continue
        try:
            index = int(item)
        except ValueError:
            known = f" (named features: {', '.join(names)})" if names else ""
            raise BadInput(f"cannot read feature {item!r}: give an index in 0..{sae.cfg.d_sae - 1}{known}") from None
        if not 0 <= index < sae.cfg.d_sae:
            raise BadInput(f"feature {index} is out of range: this SAE has features 0..{sae.cfg.d_sae - 1}")
        out.append(index)
    if not out:
        raise BadInput("no features given: write INDEX[,INDEX...] or feature names")
    return list(dict.fromkeys(out))


def neuronpedia_url(sae, feature: int) -> str | None:
    """The feature's Neuronpedia dashboard, for SAEs that have one (pretrained releases), else None."""
    from sae_lens.analysis.neuronpedia_integration import NEURONPEDIA_DOMAIN

    np_id = sae.cfg.metadata.neuronpedia_id
    return f"{NEURONPEDIA_DOMAIN}/{np_id}/{int(feature)}" if np_id else None


def describe(sae) -> dict:
    """What result.json records about an SAE: architecture, widths, hook and its training metadata."""
    meta = sae.cfg.metadata
    return {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "k": getattr(sae.cfg, "k", None), "hook_name": meta.hook_name, "model_name": meta.model_name,
            "context_size": meta.context_size, "prepend_bos": meta.prepend_bos,
            "model_from_pretrained_kwargs": meta.model_from_pretrained_kwargs,
            "neuronpedia_id": meta.neuronpedia_id}


# ------------------------------------------------------------------------------------- fit to the model
@torch.no_grad()
def weight_processing(engine) -> dict[str, bool]:
    """Which of transformer-lens's weight processings the engine's model has, measured from its weights:
    {fold_ln, center_writing_weights, center_unembed, fold_value_biases}."""
    norm = engine.final_norm
    fold_ln = norm.kind is None or norm.weight is None
    tokens = torch.arange(min(engine.cfg.d_vocab, 16), device=engine.cfg.device)[None]
    W_U = engine.W_U  # its moments in float32 a vocabulary chunk at a time (no float32 copy of the whole W_U)
    # "centred" up to the weights' own rounding: centring in float32, then storing in bfloat16, leaves means of
    # ~eps / sqrt(d) of the RMS; an uncentred vector's mean is ~1 / sqrt(d) of it
    tolerance = max(1e-5, torch.finfo(W_U.dtype).eps if W_U.dtype.is_floating_point else 1e-5)
    if engine.has_site("hook_embed"):
        embed = engine.activations(tokens, ["hook_embed"])["hook_embed"].float()
        centred = bool((embed.mean(-1).abs() <= tolerance * embed.pow(2).mean(-1).sqrt() + 1e-12).all())
    else:
        centred = False
    center_unembed = bool((vocab_mean(W_U).abs() <= tolerance * vocab_mean(W_U, squared=True).sqrt() + 1e-12).all())
    b_V = getattr(engine.model, "b_V", None)
    fold_value_biases = bool((b_V == 0).all()) if isinstance(b_V, torch.Tensor) else fold_ln
    return {"fold_ln": bool(fold_ln), "center_writing_weights": centred, "center_unembed": center_unembed,
            "fold_value_biases": fold_value_biases}


def _normal_model_name(name: str | None) -> str | None:
    if not name:
        return None
    try:
        from transformer_lens import loading
        return loading.get_official_model_name(name)
    except Exception:  # noqa: BLE001 - not a transformer-lens name (the bundled model, a directory)
        return Path(str(name)).name


def site_width(engine, hook: str) -> int:
    """The width an SAE on `hook` reads: d_model, d_mlp, or n_heads * d_head for per-head sites."""
    c = engine.cfg
    if hook.endswith("mlp.hook_post"):
        return c.d_mlp
    if hook.endswith(("attn.hook_z", "attn.hook_q")):
        return c.n_heads * c.d_head
    if hook.endswith(("attn.hook_k", "attn.hook_v")):
        return (c.n_key_value_heads or c.n_heads) * c.d_head
    return c.d_model


def check_fits(sae, engine) -> None:
    """BadInput (one line) unless the SAE was trained on this model, hook, width and weight processing, and its
    weights are finite."""
    broken = [name for name, p in sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise BadInput(f"the SAE's weights hold NaN or infinite values ({', '.join(broken)}): its training diverged "
                       f"or the file is damaged; retrain it or pass another SAE")
    meta = sae.cfg.metadata
    hook = meta.hook_name
    if not hook:
        raise BadInput("the SAE has no hook_name in its metadata (cfg.json: metadata.hook_name); set it to the "
                       "transformer-lens hook it was trained on")
    if meta.hook_head_index is not None:
        raise BadInput(f"the SAE reads one head ({hook}, head {meta.hook_head_index}); mechscope splices SAEs that "
                       f"read the whole site")
    if hook.endswith("attn.hook_pattern") or not engine.has_site(hook):
        raise BadInput(f"the SAE reads {hook}, which the {engine.name} engine does not offer for "
                       f"{engine.cfg.model_name}; use the model it was trained on")
    width = site_width(engine, hook)
    if sae.cfg.d_in != width:
        raise BadInput(f"the SAE reads d_in = {sae.cfg.d_in} at {hook}, but {engine.cfg.model_name} has {width} "
                       f"there; use the model it was trained on")
    trained_on, here = _normal_model_name(meta.model_name), _normal_model_name(engine.cfg.model_name)
    if trained_on and here and trained_on != here:
        raise BadInput(f"the SAE was trained on {meta.model_name!r}, not {engine.cfg.model_name!r}; pass --model "
                       f"{meta.model_name}")
    expected = {k: True for k in PROCESSING}  # from_pretrained's defaults
    expected.update({k: bool(v) for k, v in (meta.model_from_pretrained_kwargs or {}).items() if k in PROCESSING})
    actual = weight_processing(engine)
    for flag, sites in PROCESSING_THAT_MATTERS.items():
        if hook.endswith(sites) and expected[flag] != actual[flag]:
            if flag == "fold_value_biases":
                fix = ("mechscope keeps the value biases in hook_v / hook_z on every engine (they equal the output "
                       "projection's input), so this SAE does not fit any of them")
            elif expected[flag]:
                fix = "load the model with LayerNorm folded (the default; --backend tl or bridge)"
            else:
                fix = "load the model unprocessed (fold_ln=False, or --backend nnsight)"
            raise BadInput(f"the SAE was trained with {flag}={expected[flag]} but this {engine.name} model has "
                           f"{flag}={actual[flag]}, which changes the activations at {hook}; {fix}")


# ------------------------------------------------------------------------------------ tokens and masks
def special_mask(engine, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq] True where the token is BOS / EOS / PAD (left out of statistics and splices)."""
    from sae_lens.util import get_special_token_ids

    special = get_special_token_ids(engine.tokenizer) if engine.tokenizer is not None else []
    ids = torch.tensor(special, dtype=torch.long, device=tokens.device)
    return torch.isin(tokens, ids)


def corpus_rows(engine, n_tokens: int, context: int, seed: int = 0, exclude: set[str] | None = None) -> torch.Tensor:
    """[rows, context] token ids of the bundled corpus (plain sentences, `corpus.corpus_text`): each row is BOS
    and then context - 1 tokens of running text, about n_tokens in all (at least one row). exclude: sentences
    left out (held-out text disjoint from training: `training_sentences`)."""
    n_rows = max(1, -(-n_tokens // context))
    ids = _corpus_ids(engine, n_rows * (context - 1), seed, exclude or set())[1]
    body = torch.tensor(ids[: n_rows * (context - 1)]).view(n_rows, context - 1)
    return torch.cat([torch.full((n_rows, 1), engine.bos_token_id), body], dim=1)


def _corpus_ids(engine, n_ids: int, seed: int, exclude: set[str]) -> tuple[list[str], list[int]]:
    """(sentences, their token ids run together): corpus_text(seed) without `exclude`, enough for n_ids tokens."""
    from mechscope.toy import corpus

    n_sentences = n_ids // 6 + 16  # sentences average > 6 tokens
    while True:
        sentences = [s for s in corpus.corpus_text(n_sentences, seed=seed) if s not in exclude]
        ids = engine.tokenizer(" ".join(sentences), add_special_tokens=False).input_ids
        if len(ids) >= n_ids:
            return sentences, ids
        n_sentences *= 2


def training_sentences(n_tokens: int, context: int, seed: int = 0) -> set[str]:
    """The sentences corpus_rows(engine, n_tokens, context, seed) draws from, or more: corpus_text is
    prefix-consistent and a sentence has at least as many tokens as words, so the prefix covering that many
    words holds every sentence used (counted without the slow tokenizer)."""
    from mechscope.toy import corpus

    n_words = max(1, -(-n_tokens // context)) * (context - 1)
    n_sentences = n_words // 6 + 16
    while True:
        sentences, words = [], 0
        for sentence in corpus.corpus_text(n_sentences, seed=seed):
            sentences.append(sentence)
            words += len(sentence.split())
            if words >= n_words:
                return set(sentences)
        n_sentences *= 2


def text_rows(engine, texts: list[str], context: int) -> torch.Tensor:
    """[rows, context] token ids of texts run together (no BOS between them), cut into rows of BOS + context - 1."""
    per_row = context - 1
    ids = engine.tokenizer(" ".join(t.strip() for t in texts if t.strip()), add_special_tokens=False).input_ids
    n_rows = len(ids) // per_row
    if n_rows == 0:
        raise BadInput(f"the text has {len(ids)} tokens, fewer than one row of {per_row}; give more text or a "
                       f"smaller --context")
    body = torch.tensor(ids[: n_rows * per_row]).view(n_rows, per_row)
    return torch.cat([torch.full((n_rows, 1), engine.bos_token_id), body], dim=1)


def _id_rows(engine, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Token ids [rows, seq] (used as they are, cut to context) or [n] (cut into BOS-first rows), checked."""
    if ids.is_floating_point() and not bool((ids == ids.round()).all()):
        example = ids[ids != ids.round()].flatten()[0].item()
        raise BadInput(f"token ids must be whole numbers; this file holds {str(ids.dtype).replace('torch.', '')} "
                       f"values such as {example:g}: save the token ids, not embeddings or probabilities")
    ids = ids.long()
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= engine.cfg.d_vocab:
        raise BadInput(f"token ids must be in 0..{engine.cfg.d_vocab - 1} (this model's vocabulary)")
    if ids.ndim == 2:
        if ids.shape[1] < 2:
            raise BadInput("token rows need at least 2 tokens each")
        return ids[:, :context]
    per_row = context - 1
    if len(ids) < per_row:
        raise BadInput(f"{len(ids)} token ids are fewer than one row of {per_row}; give more or a smaller --context")
    body = ids[: len(ids) // per_row * per_row].view(-1, per_row)
    return torch.cat([torch.full((len(body), 1), engine.bos_token_id), body], dim=1)


def rows_from_file(engine, path: str, context: int) -> torch.Tensor:
    """[rows, seq] token ids from a .txt / .jsonl ({"text"}) file, a .pt / .npy tensor of ids, or a directory
    saved by `datasets` (a tokens / input_ids column, or text)."""
    import json

    file = Path(path).expanduser()
    if not file.exists():
        raise BadInput(f"data {path} does not exist")
    suffix = file.suffix.lower()
    try:
        if file.is_dir():
            import datasets

            data = datasets.load_from_disk(str(file))
            column = next((c for c in ("tokens", "input_ids", "text") if c in data.column_names), None)
            if column is None:
                raise BadInput(f"the dataset in {path} has no tokens, input_ids or text column")
            if column == "text":
                return text_rows(engine, list(data[column]), context)
            return _id_rows(engine, torch.tensor([list(r)[:context] for r in data[column]]), context)
        if suffix == ".pt":
            return _id_rows(engine, torch.as_tensor(torch.load(file, map_location="cpu", weights_only=True)), context)
        if suffix == ".npy":
            import numpy as np
            return _id_rows(engine, torch.from_numpy(np.load(file)), context)
        text = file.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return text_rows(engine, [json.loads(line)["text"] for line in text.splitlines() if line.strip()], context)
        return text_rows(engine, text.splitlines(), context)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise BadInput(f"cannot read {path} ({type(e).__name__}: {str(e)[:120]}); give a .txt, a .jsonl of "
                       f'{{"text": ...}} lines, a .pt / .npy tensor of token ids, or a datasets directory') from None


# ----------------------------------------------------------------------------------- reading, splicing
def flat_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, pos, d] as it is; per-head [batch, pos, heads, d_head] -> [batch, pos, heads * d_head]."""
    return x.flatten(2) if x.ndim == 4 else x


def sae_input(sae, x: torch.Tensor) -> torch.Tensor:
    """What sae.encode takes: per-head activations stay [batch, pos, heads, d_head] for SAEs that reshape them
    themselves (reshape_activations="hook_z"), and are flattened for the others."""
    return x if sae.cfg.reshape_activations == "hook_z" else flat_heads(x)


@torch.no_grad()
def hook_activations(engine, sae, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, d_in] (or per head, see sae_input) the activations the SAE reads. No engine runs past the hook's
    block (engine.activations); transformer-lens runs only the blocks before it (resid_pre of block l: 0..l-1)."""
    from mechscope.engines.base import layer_of

    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    if engine.name == "tl" and hook == f"blocks.{layer}.hook_resid_pre":  # what the first `layer` blocks return
        return engine.model(tokens, stop_at_layer=layer)
    return sae_input(sae, engine.activations(tokens, [hook])[hook])


@torch.no_grad()
def feature_acts(engine, sae, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, d_sae] feature activations, zero at special-token positions."""
    f = sae.encode(hook_activations(engine, sae, tokens).to(sae.dtype))
    return f.masked_fill(special_mask(engine, tokens)[..., None], 0.0)


def splice(sae, tokens: torch.Tensor | None = None, engine=None, edit=None, error_term: bool = True):
    """An engine edit fn(x) -> x' that runs x through the SAE at its hook.

    error_term=True keeps x - decode(encode(x)), so without `edit` the model is unchanged (to float
    rounding) and with it only the edited features' decoder contributions change; False runs the model on
    the reconstruction. edit(f [batch, pos, d_sae]) -> f' changes features. With tokens and engine, positions
    holding special tokens are left unchanged (as sae-lens's `exclude_special_tokens`)."""
    keep = special_mask(engine, tokens) if tokens is not None else None

    def fn(x):
        inp = sae_input(sae, x)
        f = sae.encode(inp.to(sae.dtype))
        recon = sae.decode(f)
        out = sae.decode(edit(f.clone())) if edit is not None else recon
        if error_term:
            out = out + (inp - recon)
        out = out.to(x.dtype).reshape(x.shape)
        if keep is not None:
            out = torch.where(keep.to(x.device).view(*keep.shape, *[1] * (x.ndim - 2)), x, out)
        return out
    return fn


@torch.no_grad()
def live_features(engine, sae, n_tokens: int = 20_000, context: int = 64, batch_size: int = 64) -> torch.Tensor:
    """[d_sae] bool: the features active somewhere on n_tokens of the bundled corpus (controls draw from these)."""
    rows = corpus_rows(engine, n_tokens, min(context, engine.cfg.n_ctx), seed=12345)
    live = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for batch in rows.split(batch_size):
        live |= (feature_acts(engine, sae, batch.to(engine.cfg.device)) > 0).flatten(0, 1).any(0).cpu()
    return live
