"""Linear probes on the residual stream, layer by layer, with a control task, leak-free splits and intervals.

A probe is multinomial logistic regression (torch, L-BFGS) on the residual stream at one position per
prompt, read at every `blocks.{l}.hook_resid_pre` and at the final `blocks.{L-1}.hook_resid_post`
("sites"). Examples are deduplicated (same tokens and position: the first is kept) and split train /
validation / test by *group* (a template, an opener, a name pair: every prompt of a group lands on one
side, stratified by the groups' labels), so no test prompt is a copy or a near-copy of a training prompt;
validation picks the L2 strength; the reported number is test accuracy with a 95% interval: when test examples
share a group, a cluster bootstrap over the test groups (mechscope.stats; with few test groups it is wide, as it
should be: the groups are the independent units), else Wilson's (or --ci bootstrap).

Controls:
- the control task (Hewitt & Liang 2019): labels fixed at random per *control key* (by default the word type
  at the probed position; the bundled tasks name theirs), balanced over as many classes as the task has,
  and probed with the same pipeline and split. It measures what the probe can learn about an arbitrary
  property of the input: selectivity = accuracy - control-task accuracy. It can fail: a control key that the
  residual encodes linearly gives a control accuracy far above chance.
- shuffled labels: a sanity check only (with a leak-free split it sits at chance by construction);
- optionally a random-init model of the same config (what the tokens alone make decodable; tl engine).
A probe finds what is *linearly decodable*, not what the model *uses*; compare with patching.

Extraction is batched through the engine API (`engine.run(read=sites)`): prompts of different lengths are
right-padded (with each row's own last token) and read only at their own positions; with causal attention
the padding cannot change an earlier position.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechscope import tasks
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
        tokens = tasks.padded(engine, batch)[0].to(engine.cfg.device)
        pos = torch.tensor(positions[start:start + batch_size], device=tokens.device)
        acts = engine.activations(tokens, hook_names)
        index = torch.arange(len(batch), device=tokens.device)
        out.append(torch.stack([acts[name][index, pos] for name in hook_names]).float().cpu())
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------ probes
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


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / n."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(correct: torch.Tensor, seed: int = 0, groups=None) -> tuple[float, float]:
    """95% interval of the mean of correct: [n] bool, from mechscope.stats (studentized bootstrap over examples,
    or over whole groups with `groups`), clipped to [0, 1]; NaN from one example (or group)."""
    from mechscope import stats

    _, low, high = stats.interval(correct.float()[:, None], seed=seed, groups=groups)
    return float(low.clamp(0, 1)), float(high.clamp(0, 1))


def interval(correct: torch.Tensor, ci: str, seed: int = 0, groups=None) -> tuple[float, float]:
    """95% interval of an accuracy. Test examples that share a group (an opener, a template) are not
    independent: then the interval resamples groups (cluster bootstrap) whatever `ci` says; else `ci`:
    "wilson" (a score interval for independent examples) or "bootstrap"."""
    if groups is not None and len(set(groups)) < len(groups):
        # resampling groups that all score the same (every example right) gives a zero-width interval; the
        # interval is never narrower than Wilson's at one observation per group (the most the data can say)
        low, high = bootstrap_interval(correct, seed, groups)
        n_groups = len(set(groups))
        w_low, w_high = wilson_interval(float(correct.float().mean()) * n_groups, n_groups)
        return (min(low, w_low) if low == low else w_low), (max(high, w_high) if high == high else w_high)
    if ci == "bootstrap":
        return bootstrap_interval(correct, seed)
    return wilson_interval(int(correct.sum()), len(correct))


# ---------------------------------------------------------------------------------------- pipeline
def deduplicate(rows: list[torch.Tensor], positions: list[int]) -> list[int]:
    """Indices of the first example of each distinct (tokens, position)."""
    seen, keep = set(), []
    for i, (r, p) in enumerate(zip(rows, positions)):
        key = (tuple(r.tolist()), int(p))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def group_split(labels: torch.Tensor, groups: list, fractions=(0.6, 0.2, 0.2), seed: int = 0, class_names=None):
    """(train, val, test) index tensors with every group on one side. Groups are stratified by the set of labels
    they hold (groups of one label are split label by label; when a stratum has fewer than 3 groups, all
    groups form one stratum); each stratum's groups are shuffled (seeded) and cut by `fractions`, each part
    getting >= 1 group. labels: [n] class ids; groups: n hashable keys."""
    keys = [str(g) for g in groups]
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    if len(members) < 3:
        raise BadInput(f"a train / validation / test split by group needs 3+ groups; these examples form "
                       f"{len(members)} (give more groups, or none: each prompt is then its own group)")
    strata: dict[tuple, list[str]] = {}
    for k in sorted(members):
        strata.setdefault(tuple(sorted(set(labels[members[k]].tolist()))), []).append(k)
    if any(len(v) < 3 for v in strata.values()):
        strata = {(): sorted(members)}
    rng = random.Random(seed)
    parts = ([], [], [])
    for stratum in strata.values():
        rng.shuffle(stratum)
        n = len(stratum)
        n_train = max(1, min(n - 2, round(fractions[0] * n)))
        n_val = max(1, min(n - n_train - 1, round(fractions[1] * n)))
        for part, chunk in zip(parts, (stratum[:n_train], stratum[n_train:n_train + n_val], stratum[n_train + n_val:])):
            part += [i for k in chunk for i in members[k]]
    train = set(labels[parts[0]].tolist())
    missing = [c for c in labels.unique().tolist() if c not in train]
    if missing:
        name = class_names[missing[0]] if class_names else missing[0]
        raise BadInput(f"label {name!r} has no training example once whole groups are held out; add groups "
                       f"that hold it")
    return tuple(torch.tensor(sorted(p), dtype=torch.long) for p in parts)


def control_labels(keys: list, n_classes: int, seed: int = 0) -> torch.Tensor:
    """[n] control-task labels (Hewitt & Liang 2019): each distinct key gets a class fixed at random, balanced
    (the shuffled keys take classes 0, 1, ..., n_classes - 1 in turn). keys: n hashable values."""
    types = sorted({str(k) for k in keys})
    random.Random(seed).shuffle(types)
    label = {t: i % n_classes for i, t in enumerate(types)}
    return torch.tensor([label[str(k)] for k in keys])


@dataclass
class ProbeResult:
    """Test accuracy per site ([n_sites] lists) of the probe and its controls."""
    sites: list[str]
    accuracy: list[float]
    ci: list[tuple[float, float]]
    control_accuracy: list[float] | None         # the control task (None when its keys take one value)
    control_ci: list[tuple[float, float]] | None
    selectivity: list[float] | None              # accuracy - control accuracy, paired over the test examples
    selectivity_ci: list[tuple[float, float]] | None
    shuffled_accuracy: list[float]
    shuffled_ci: list[tuple[float, float]]
    chance: float                      # majority-class share of the test split
    control_chance: float | None
    l2: list[float]
    val_accuracy: list[float]
    classes: list[str]
    n_train: int
    n_val: int
    n_test: int
    split_rule: str = ""
    control_rule: str = ""
    n_duplicates: int = 0
    test_groups: list[str] | None = None
    random_model_accuracy: list[float] | None = None
    random_model_ci: list[tuple[float, float]] | None = None
    weights: torch.Tensor | None = None  # [n_sites, d_model, n_classes], raw residual space

    def rows(self) -> list[dict]:
        out = []
        for i, site in enumerate(self.sites):
            row = {"site": site, "accuracy": self.accuracy[i], "ci_low": self.ci[i][0], "ci_high": self.ci[i][1]}
            if self.control_accuracy is not None:
                row.update({"control_accuracy": self.control_accuracy[i], "selectivity": self.selectivity[i],
                            "selectivity_ci_low": self.selectivity_ci[i][0],
                            "selectivity_ci_high": self.selectivity_ci[i][1]})
            row.update({"shuffled_accuracy": self.shuffled_accuracy[i], "l2": self.l2[i],
                        "val_accuracy": self.val_accuracy[i]})
            if self.random_model_accuracy is not None:
                row["random_model_accuracy"] = self.random_model_accuracy[i]
            out.append(row)
        return out


def _probe_sites(features: torch.Tensor, y: torch.Tensor, n_classes: int, split, l2_grid, ci: str, seed: int,
                 test_groups=None):
    """features: [n_sites, n, d] -> per-site (fits, accuracies, intervals); test_groups: the test examples'
    groups (resampled together)."""
    fits = [train_probe(f, y, n_classes, split, l2_grid) for f in features]
    accuracy = torch.stack([f.test_correct.float().mean() for f in fits]).tolist()
    return fits, accuracy, [interval(f.test_correct, ci, seed, test_groups) for f in fits]


def random_init_like(model, seed: int = 0):
    """A model of the same config and tokenizer with freshly initialised weights (transformer-lens engine)."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    if engine.name != "tl":
        raise BadInput(f"--random-model builds a random-init HookedTransformer; it needs --backend tl "
                       f"(this run uses {engine.name})")
    from transformer_lens import HookedTransformer

    torch.manual_seed(seed)
    return HookedTransformer(engine.model.cfg, tokenizer=engine.tokenizer, move_to_device=False) \
        .to(engine.cfg.device).eval()


def probe_layers(model, rows: list[torch.Tensor], positions: list[int], labels: list[str], seed: int = 0,
                 fractions=(0.6, 0.2, 0.2), l2_grid=L2_GRID, ci: str = "wilson", random_model: bool = False,
                 batch_size: int = 64, groups: list | None = None, controls: list | None = None,
                 group_rule: str | None = None, control_rule: str | None = None) -> ProbeResult:
    """Probe every site for `labels` at `positions`. rows: n x [seq_i] token ids; positions: n ints.

    groups: n keys kept on one side of the split (default: each distinct prompt is its own group);
    controls: n control-task keys (default: the token at the probed position, Hewitt & Liang's word type);
    group_rule / control_rule: how they were chosen, for the report."""
    from mechscope import stats

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise BadInput(f"all {len(labels)} examples have the label {classes[0]!r}; a probe needs two or more labels")
    keep = deduplicate(rows, positions)
    n_duplicates = len(rows) - len(keep)
    rows, positions, labels = [rows[i] for i in keep], [positions[i] for i in keep], [labels[i] for i in keep]
    groups = [groups[i] for i in keep] if groups is not None else [tuple(r.tolist()) for r in rows]
    if controls is not None:
        controls = [controls[i] for i in keep]
    else:
        controls = [int(r[p]) for r, p in zip(rows, positions)]
        control_rule = control_rule or "a random class per word type at the probed position"
    y = torch.tensor([classes.index(label) for label in labels])
    split = group_split(y, groups, fractions, seed, classes)
    names = site_names(model)
    features = residuals_at(model, rows, positions, names, batch_size)
    test = split[2]
    held = [str(groups[i]) for i in test.tolist()]                  # the test examples' groups: the resampled unit
    fits, acc, intervals = _probe_sites(features, y, len(classes), split, l2_grid, ci, seed, held)

    control = dict(control_accuracy=None, control_ci=None, selectivity=None, selectivity_ci=None, control_chance=None)
    y_control = control_labels(controls, len(classes), seed)
    n_control = len(y_control.unique())
    if n_control >= 2 and len(y_control[split[0]].unique()) >= 2:
        control_fits, control_acc, control_ci = _probe_sites(features, y_control, n_control, split, l2_grid, ci, seed,
                                                             held)
        paired = [(f.test_correct.float() - c.test_correct.float())[:, None] for f, c in zip(fits, control_fits)]
        sel = [stats.interval(d, seed=seed, groups=held) for d in paired]
        control = dict(control_accuracy=control_acc, control_ci=control_ci,
                       selectivity=[float(m) for m, _, _ in sel], selectivity_ci=[(float(lo.clamp(-1, 1)), float(hi.clamp(-1, 1))) for _, lo, hi in sel],
                       control_chance=float(y_control[test].bincount().max() / len(test)))
    else:
        control_rule = (control_rule or "") + " (undefined here: the control keys take one value; give each " \
                                              "example a \"control\" key)"
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))]
    _, shuffled_acc, shuffled_ci = _probe_sites(features, shuffled, len(classes), split, l2_grid, ci, seed, held)
    test_labels = y[test]
    test_groups = sorted({str(groups[i]) for i in test.tolist()})
    result = ProbeResult(
        sites=names, accuracy=acc, ci=intervals, shuffled_accuracy=shuffled_acc, shuffled_ci=shuffled_ci,
        chance=float(test_labels.bincount().max() / len(test_labels)), l2=[f.l2 for f in fits],
        val_accuracy=[f.val_accuracy for f in fits], classes=classes, n_train=len(split[0]), n_val=len(split[1]),
        n_test=len(test), split_rule=group_rule or "by prompt (deduplicated; no groups given)",
        control_rule=control_rule or "", n_duplicates=n_duplicates, test_groups=test_groups,
        weights=torch.stack([f.weight for f in fits]), **control)
    if random_model:
        features = residuals_at(random_init_like(model, seed), rows, positions, names, batch_size)
        _, result.random_model_accuracy, result.random_model_ci = _probe_sites(
            features, y, len(classes), split, l2_grid, ci, seed, held)
    return result


# ----------------------------------------------------------------------------- built-in datasets
IOI_IO_NAMES = ("mary", "john", "alice", "bob", "tom", "sarah", "james", "emma")


@dataclass
class ProbeDataset:
    """Distinct prompts with a label, a split group and a control-task key each, and how they were chosen."""
    prompts: list[str]
    labels: list[str]
    groups: list[str]
    controls: list[str]
    group_rule: str
    control_rule: str


def task_dataset(name: str, n: int = 400, seed: int = 0) -> ProbeDataset:
    """n distinct prompts of a built-in task for the bundled model, read at the last position, whose token never
    depends on the label (so resid_pre 0 there is at chance by construction).

    sentiment: a filler sentence, a positive or negative opener ("i love this !" / "i hate this !"), then
      "it ' s <intensifier>"; label "positive" / "negative"; split by opener (a test opener is never seen in
      training); control key: the intensifier (the probed word, Hewitt & Liang's word type).
    ioi-io: IOI prompts over eight names (IOI_IO_NAMES); label = the indirect object, the name the model must
      say next ("when mary and john went to the store , john gave a drink to" -> "mary"); split by the
      unordered name pair; control key: the template.
    ioi-order: IOI prompts over all names; label "io_first" (ABBA) or "io_second" (BABA); split by the
      unordered name pair; control key: the template.
    Fewer than n prompts come back when the task has fewer distinct ones.
    """
    from mechscope.toy import corpus

    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    examples: dict[str, tuple[str, str, str]] = {}
    for _ in range(50 * n):
        if len(examples) == n:
            break
        if name == "sentiment":
            positive = rng.random() < 0.5
            opener = rng.choice(corpus.POSITIVE_OPENERS if positive else corpus.NEGATIVE_OPENERS)
            intensifier = rng.choice(corpus.INTENSIFIERS)
            prompt = f"{' '.join(corpus.filler_sentence(rng))} {opener} it ' s {intensifier}"
            example = ("positive" if positive else "negative", opener, intensifier)
        else:
            names = IOI_IO_NAMES if name == "ioi-io" else corpus.NAMES
            io, s = rng.sample(names, 2)
            io_first = rng.random() < 0.5
            t = rng.randrange(len(corpus.IOI_TEMPLATES))
            prompt = corpus.IOI_TEMPLATES[t].format(a=io if io_first else s, b=s if io_first else io, s=s,
                                                    place=rng.choice(corpus.PLACES), obj=rng.choice(corpus.OBJECTS))
            label = io if name == "ioi-io" else ("io_first" if io_first else "io_second")
            example = (label, "+".join(sorted((io, s))), f"template {t}")
        examples.setdefault(prompt, example)
    labels, groups, controls = (list(x) for x in zip(*examples.values()))
    rules = {"sentiment": ("by opener", "a random class per intensifier (the probed word)"),
             "ioi-io": ("by unordered name pair", "a random class per template"),
             "ioi-order": ("by unordered name pair", "a random class per template")}[name]
    return ProbeDataset(list(examples), labels, groups, controls, *rules)
