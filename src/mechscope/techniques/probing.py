"""Linear probes on the residual stream, layer by layer, with a shuffled-label control and confidence intervals.

A probe is multinomial logistic regression (torch, L-BFGS) on the residual stream at one position per
prompt, read at every `blocks.{l}.hook_resid_pre` and at the final `blocks.{L-1}.hook_resid_post`
("sites"). Data are split train / validation / test (stratified by label, seeded); validation picks
the L2 strength; the reported number is test accuracy with a Wilson or bootstrap interval.

Controls: the same pipeline on shuffled labels (what a probe finds with no real signal: chance), and
optionally on a random-init model of the same config (what the tokens alone make decodable).
A probe finds what is *linearly decodable*, not what the model *uses*; compare with patching.

Extraction is batched: one `run_with_cache` per batch, caching only the probed hooks. Prompts of
different lengths are right-padded (with each row's own last token) and read only at their own
positions; with causal attention the padding cannot change an earlier position.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechscope.errors import BadInput

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TASKS = ("sentiment", "ioi-io", "ioi-order")


# ------------------------------------------------------------------------------------- activations
def site_names(model) -> list[str]:
    """Hook names probed: resid_pre of every layer, then the final resid_post. [n_layers + 1]"""
    last = model.cfg.n_layers - 1
    return [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)] + [f"blocks.{last}.hook_resid_post"]


def site_labels(model) -> list[str]:
    return [f"pre {l}" for l in range(model.cfg.n_layers)] + [f"post {model.cfg.n_layers - 1}"]


def resolve_position(model, row: torch.Tensor, spec) -> int:
    """The position read in one prompt. row: [seq] token ids; spec: None/"last", an int index
    (negative counts from the end), or a word (its last occurrence, as one token)."""
    seq = row.shape[0]
    if spec is None or spec == "last":
        return seq - 1
    if isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
        index = int(spec)
        if not -seq <= index < seq:
            raise BadInput(f"position {index} is outside a prompt of {seq} tokens "
                           f"{model.to_str_tokens(row)}; pick an index in {-seq}..{seq - 1}")
        return index % seq
    ids = {int(t[0]) for t in (model.to_tokens(w, prepend_bos=False)[0] for w in (" " + spec.strip(), spec.strip()))
           if len(t) == 1}
    hits = [i for i, t in enumerate(row.tolist()) if t in ids]
    if not hits:
        raise BadInput(f"position word {spec!r} is not a token of the prompt {model.to_str_tokens(row)}; "
                       f"pass a word that occurs in every prompt, an index, or 'last'")
    return hits[-1]


def right_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """[n, max_seq] from n rows [seq_i], each padded with its own last token (never a pad id that a
    left-padding tokenizer would mask and shift positions for)."""
    width = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(width - r.shape[0])]) for r in rows])


@torch.no_grad()
def residuals_at(model, rows: list[torch.Tensor], positions: list[int], hook_names: list[str],
                 batch_size: int = 64) -> torch.Tensor:
    """Residual stream of each prompt at its own position. rows: n x [seq_i]; positions: n ints
    (each < its row's length) -> [n_hooks, n, d_model] (float32, CPU)."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    engine.require(hook_names, "probing")
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        tokens = right_padded(batch).to(engine.cfg.device)
        pos = torch.tensor(positions[start:start + batch_size], device=tokens.device)
        _, acts = engine.run(tokens, read=hook_names)
        index = torch.arange(len(batch), device=tokens.device)
        out.append(torch.stack([acts[name][index, pos] for name in hook_names]).float().cpu())
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------ probes
def stratified_split(labels: torch.Tensor, fractions=(0.6, 0.2, 0.2), seed: int = 0, class_names=None):
    """(train, val, test) index tensors; each class is split by `fractions` (each split gets >= 1).
    labels: [n] class ids."""
    gen = torch.Generator().manual_seed(seed)
    parts = ([], [], [])
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 3:
            name = class_names[int(c)] if class_names else int(c)
            raise BadInput(f"label {name!r} has {len(idx)} examples; each label needs at least 3 "
                           f"(train, validation, test) — add examples")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_train = max(1, min(len(idx) - 2, round(fractions[0] * len(idx))))
        n_val = max(1, min(len(idx) - n_train - 1, round(fractions[1] * len(idx))))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            part.append(chunk)
    return tuple(torch.cat(p).sort().values for p in parts)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 100, init=None):
    """Multinomial logistic regression: min mean cross-entropy + l2/2 |W|^2 by L-BFGS, from `init` (W, b)
    or zeros. x: [n, d], y: [n] class ids -> (W [d, n_classes], b [n_classes])."""
    W0, b0 = init if init is not None else (torch.zeros(x.shape[1], n_classes), torch.zeros(n_classes))
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: thread hand-offs cost more than they save (and much
    try:                      # more when other processes share the cores)
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return W.detach(), b.detach()


@dataclass
class ProbeFit:
    """One probe: weights in the raw feature space (standardisation folded in)."""
    weight: torch.Tensor         # [d, n_classes]
    bias: torch.Tensor           # [n_classes]
    l2: float
    val_accuracy: float
    test_correct: torch.Tensor   # [n_test] bool


def train_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, split, l2_grid=L2_GRID) -> ProbeFit:
    """Standardise on train, fit one probe per L2 strength, keep the best on validation (ties: the
    strongest L2), score it on test. x: [n, d], y: [n]."""
    train, val, test = split
    mean, std = x[train].mean(0), x[train].std(0)
    std = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))
    z = (x - mean) / std
    fits = []  # strongest L2 first, each fit starting from the previous one (a regularisation path)
    for l2 in sorted(l2_grid, reverse=True):
        fits.append(fit_logistic(z[train], y[train], n_classes, l2, init=fits[-1] if fits else None))
    val_acc = torch.stack([((z[val] @ W + b).argmax(-1) == y[val]).float().mean() for W, b in fits])
    best = int(val_acc.argmax())
    W, b = fits[best]
    weight = W / std[:, None]
    bias = b - mean @ weight
    return ProbeFit(weight=weight, bias=bias, l2=sorted(l2_grid, reverse=True)[best],
                    val_accuracy=float(val_acc[best]), test_correct=(x[test] @ weight + bias).argmax(-1) == y[test])


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / n."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(correct: torch.Tensor, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of correct: [n] bool."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(correct), (n_resamples, len(correct)), generator=gen)
    means = correct.float()[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def interval(correct: torch.Tensor, ci: str, seed: int = 0) -> tuple[float, float]:
    if ci == "bootstrap":
        return bootstrap_interval(correct, seed=seed)
    return wilson_interval(int(correct.sum()), len(correct))


# ---------------------------------------------------------------------------------------- pipeline
@dataclass
class ProbeResult:
    """Test accuracy per site ([n_sites] lists) of the probe and its controls."""
    sites: list[str]
    accuracy: list[float]
    ci: list[tuple[float, float]]
    shuffled_accuracy: list[float]
    shuffled_ci: list[tuple[float, float]]
    chance: float                      # majority-class share of the test split
    l2: list[float]
    val_accuracy: list[float]
    classes: list[str]
    n_train: int
    n_val: int
    n_test: int
    random_model_accuracy: list[float] | None = None
    random_model_ci: list[tuple[float, float]] | None = None
    weights: torch.Tensor | None = None  # [n_sites, d_model, n_classes], raw residual space

    def rows(self) -> list[dict]:
        out = []
        for i, site in enumerate(self.sites):
            row = {"site": site, "accuracy": self.accuracy[i], "ci_low": self.ci[i][0], "ci_high": self.ci[i][1],
                   "shuffled_accuracy": self.shuffled_accuracy[i],
                   "selectivity": self.accuracy[i] - self.shuffled_accuracy[i], "l2": self.l2[i],
                   "val_accuracy": self.val_accuracy[i]}
            if self.random_model_accuracy is not None:
                row["random_model_accuracy"] = self.random_model_accuracy[i]
            out.append(row)
        return out


def _probe_sites(features: torch.Tensor, y: torch.Tensor, n_classes: int, split, l2_grid, ci: str, seed: int):
    """features: [n_sites, n, d] -> per-site (fits, accuracies, intervals)."""
    fits = [train_probe(f, y, n_classes, split, l2_grid) for f in features]
    accuracy = torch.stack([f.test_correct.float().mean() for f in fits]).tolist()
    return fits, accuracy, [interval(f.test_correct, ci, seed) for f in fits]


def random_init_like(model, seed: int = 0):
    """A HookedTransformer of the same config and tokenizer with freshly initialised weights."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(seed)
    return HookedTransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False).to(model.cfg.device).eval()


def probe_layers(model, rows: list[torch.Tensor], positions: list[int], labels: list[str], seed: int = 0,
                 fractions=(0.6, 0.2, 0.2), l2_grid=L2_GRID, ci: str = "wilson", random_model: bool = False,
                 batch_size: int = 64) -> ProbeResult:
    """Probe every site for `labels` at `positions`. rows: n x [seq_i] token ids; positions: n ints."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise BadInput(f"all {len(labels)} examples have the label {classes[0]!r}; a probe needs two or more labels")
    y = torch.tensor([classes.index(label) for label in labels])
    split = stratified_split(y, fractions, seed, classes)
    names = site_names(model)
    features = residuals_at(model, rows, positions, names, batch_size)
    fits, acc, intervals = _probe_sites(features, y, len(classes), split, l2_grid, ci, seed)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))]
    _, shuffled_acc, shuffled_ci = _probe_sites(features, shuffled, len(classes), split, l2_grid, ci, seed)
    test_labels = y[split[2]]
    result = ProbeResult(sites=names, accuracy=acc, ci=intervals, shuffled_accuracy=shuffled_acc,
                         shuffled_ci=shuffled_ci, chance=float(test_labels.bincount().max() / len(test_labels)),
                         l2=[f.l2 for f in fits], val_accuracy=[f.val_accuracy for f in fits], classes=classes, n_train=len(split[0]), n_val=len(split[1]),
                         n_test=len(split[2]), weights=torch.stack([f.weight for f in fits]))
    if random_model:
        features = residuals_at(random_init_like(model, seed), rows, positions, names, batch_size)
        _, result.random_model_accuracy, result.random_model_ci = _probe_sites(
            features, y, len(classes), split, l2_grid, ci, seed)
    return result


# ----------------------------------------------------------------------------- built-in datasets
IOI_IO_NAMES = ("mary", "john", "alice", "bob")


def task_dataset(name: str, n: int = 400, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, labels) of a built-in task for the bundled model; read at the last position, whose token
    never depends on the label (so resid_pre 0 there is at chance by construction).

    sentiment: a filler sentence, then a positive or negative opener ("i love this !" / "i hate this !"),
      then "it ' s <intensifier>"; label "positive" / "negative".
    ioi-io: IOI prompts over four names (IOI_IO_NAMES); label = the indirect object, the name the model
      must say next ("when mary and john went to the store , john gave a drink to" -> "mary").
    ioi-order: IOI prompts; label "io_first" (ABBA: "A and B ..., B gave ... to" -> A) or "io_second" (BABA).
    """
    from mechscope.toy import corpus

    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    prompts, labels = [], []
    for _ in range(n):
        if name == "sentiment":
            positive = rng.random() < 0.5
            opener = rng.choice(corpus.POSITIVE_OPENERS if positive else corpus.NEGATIVE_OPENERS)
            filler = " ".join(corpus.filler_sentence(rng))
            prompts.append(f"{filler} {opener} it ' s {rng.choice(corpus.INTENSIFIERS)}")
            labels.append("positive" if positive else "negative")
        elif name == "ioi-io":
            io, s = rng.sample(IOI_IO_NAMES, 2)
            a, b = (io, s) if rng.random() < 0.5 else (s, io)
            place, obj = rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS)
            prompts.append(rng.choice(corpus.IOI_TEMPLATES).format(a=a, b=b, s=s, place=place, obj=obj))
            labels.append(io)
        else:
            prompt, io, s = corpus.ioi_prompt(rng, held_out=rng.random() < 0.5)
            words = prompt.split()
            prompts.append(prompt)
            labels.append("io_first" if words.index(io) < words.index(s) else "io_second")
    return prompts, labels
