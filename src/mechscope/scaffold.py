"""A research repository that fits one study: what `mechscope new` writes.

    render("factual-recall", model="EleutherAI/pythia-410m", backend="nnsight", task="facts",
           techniques=["logit-lens", "patch", "dla"], question="Where does pythia-410m look up capitals?")

templates/research-repo/ is the fixed part (README.md, CLAUDE.md, AGENTS.md, Makefile, configs/, tests/...):
a `.j2` file is rendered with jinja2 (StrictUndefined) and loses the suffix, any other file is copied, a
leading `dot-` becomes `.`. templates/techniques/<module>.py.j2 is one experiment per chosen technique
(experiments/NN_<module>.py) and test_<module>.py.j2 its known-answer test on the bundled model. The study's
prompt set goes to data/prompts.jsonl: a bundled task's (TASKS) or the user's file, checked here. This
mechscope goes to vendor/ as a wheel (built from the checkout it runs from, or repacked from its install), so
the study installs the exact version on another machine, offline; --mechscope-from names another source. The
repository is written into a temporary sibling directory and renamed into place (a failure leaves nothing
behind), then `git init` + a first commit where git is installed.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mechscope.errors import BadInput
from mechscope.paths import user_path

SCAFFOLD, TECHNIQUE_TEMPLATES = "research-repo", "techniques"
NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # a valid Python distribution name
TRACKING = ("json", "wandb")
ENGINES = {  # --backend -> what the study's docs say about it
    "tl": "transformer-lens HookedTransformer: models up to about 2B parameters, LayerNorm folded",
    "bridge": "transformer-lens TransformerBridge in compatibility mode: the Hugging Face model under "
              "transformer-lens hook names, the successor of HookedTransformer in transformer-lens 4",
    "nnsight": "nnsight on the Hugging Face model: large models with --device-map auto, 8- / 4-bit weights, "
               "NDIF remote execution; the bundled model runs through its Hugging Face export",
}
BACKENDS = tuple(ENGINES)


@dataclass(frozen=True)
class Technique:
    """One mechscope command as a study's experiment: what it answers, the control that makes it evidence,
    and the mistake to avoid. `pairs`: it reads corrupted prompts too (else clean prompts and answers, or none)."""
    name: str
    what: str
    control: str
    caution: str
    pairs: bool = False

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")


TECHNIQUES = {t.name: t for t in [
    Technique("predict", "whether the model does the task at all: its top next tokens on the study's prompts",
              "accuracy over the whole prompt set before studying a mechanism; a model that fails the task has "
              "no mechanism for it", "answers must be single tokens (mechscope refuses others, exit 2)"),
    Technique("logit-lens", "from which layer the answer can be read off the residual stream",
              "the final layer's reading equals the model's own prediction; compare early layers with the tuned "
              "lens, which the logit lens underestimates", "a layer where the answer becomes readable is not "
              "where it is computed: confirm with patching"),
    Technique("tuned-lens", "per-layer affine translators against the logit lens (KL to the final output)",
              "KL on held-out tokens, never on the training tokens; the final layer reads 0",
              "train on text like the study's (--text-file) before reading a real model's layers"),
    Technique("dla", "which heads, MLPs and neurons write answer minus wrong directly to the logits",
              "the parts must sum to the model's logit difference (summary: sum_error ~ 0); confirm the top "
              "components causally with patch or ablate", "direct effects only: what a component does "
              "through later layers is invisible to DLA"),
    Technique("patch", "where (layer x position) the information that decides the answer flows: clean "
              "activations patched into the corrupted run", "report recovery with both baselines; at layer 0 "
              "the residual at the one position where the prompts differ recovers exactly 1 and every other "
              "position 0 (the identity the tests check); --mode noise for necessity",
              "clean and corrupted prompts need the same number of tokens", pairs=True),
    Technique("attribution-patch", "gradient estimates of every patch at once (2 forwards + 1 backward)",
              "its agreement with exact patching (reported in the summary); confirm the top cells with patch",
              "a linear estimate: saturated attention gives false negatives", pairs=True),
    Technique("path-patch", "which sender -> receiver paths (via q, k, v or the logits) carry the effect",
              "compare each path with the total effect of its sender (patch); say whether MLPs are frozen",
              "a path's effect is relative to the receivers chosen: name them", pairs=True),
    Technique("discover", "which edges (head q / k / v inputs, MLPs, logits) form the circuit, and how faithful "
              "it is: EAP / EAP-IG scores, the circuit checked by exact edge patching",
              "the faithfulness curve against random edge sets, and the scores' agreement with exact single-edge "
              "effects (both reported); trust the exact curve over the scores",
              "EAP's gradients vanish where the clean run is saturated (induction on the bundled model: Spearman "
              "0.05); use EAP-IG, and read the agreement before the ranking", pairs=True),
    Technique("ablate", "what breaks when components are removed (necessity)",
              "mean or resample ablation over the prompt set (zero ablation leaves the training distribution); "
              "compare with other components of the same kind", "backup components can hide a component's "
              "effect: ablate candidate sets together too"),
    Technique("heads", "previous-token, induction, duplicate-token and BOS scores and attention patterns",
              "scores come from random repeated sequences: a high score names a candidate, ablating it on the "
              "task decides", "the induction source of destination d is d - L + 1, not d - L"),
    Technique("circuits", "QK / OV circuits, copying scores and K / Q / V composition between heads",
              "composition against its random-matrix baseline (reported)", "weights say what a head can do, "
              "not what it does on the task"),
    Technique("probe", "which layers linearly encode a property",
              "a control task and shuffled labels; selectivity = accuracy - control; split by template",
              "decodable is not used: steer or patch along the probe's direction"),
    Technique("steer", "whether adding a direction to the residual stream changes the output",
              "same-norm random directions, held-out prompts, and the LM loss on neutral text (side effect)",
              "never model.generate(fwd_hooks=...): the hooks are ignored; mechscope steer applies them"),
    Technique("sae-features", "which sparse-autoencoder features fire at a position of the study's prompts, "
              "their max-activating contexts (also from lower quantiles) and their logit effects",
              "an SAE that fits the model (mechscope refuses another model's, hook's or weight processing's); "
              "test a feature's name causally with mechscope sae-steer / sae-ablate against random features",
              "a clean max-activating list is not a use: the shipped SAE's 'country' feature looks clean and does "
              "not beat random features when steered (SAE_CARD.md)"),
    Technique("validate-circuit", "necessity, faithfulness and minimality of a candidate circuit",
              "random circuits of the same size (reported); mean ablation as the default",
              "choose --circuit from patching or path patching, not from DLA alone"),
]}


@dataclass(frozen=True)
class Task:
    """A bundled task: its prompt pairs (each pair differs in one word), a question and a falsifiable hypothesis."""
    name: str
    description: str
    question: str
    hypothesis: str
    refutation: str
    techniques: tuple[str, ...]


TASKS = {t.name: t for t in [
    Task("ioi", "indirect-object identification: \"When Mary and John went to the store, John gave a drink to\" "
         "-> Mary; the corrupted twin repeats the other name (\"..., Mary gave a drink to\"), so the answer flips",
         "Which components move the indirect object's name to the final position, and how do they pick it?",
         "Attention heads in the last layers copy the indirect object's name to the final position, guided by "
         "earlier heads that detect the repeated subject. Prediction: patching the clean residual stream into "
         "the corrupted run at the final position of the last layers recovers more than half of the logit "
         "difference, and the largest direct effects (DLA) are attention heads.",
         "No late-layer final-position patch recovers more than half of the logit difference, or the direct "
         "effect sits in MLPs rather than heads.", ("predict", "patch", "dla")),
    Task("facts", "factual recall: \"The capital of France is\" -> Paris; the corrupted twin names another "
         "country or landmark with another city (\"The capital of Italy is\" -> Rome)",
         "Where is the city retrieved: in MLPs at the subject's position, or later at the final position?",
         "MLPs at the subject's position write the attribute, and attention moves it to the final position "
         "(Meng et al. 2022; Geva et al. 2023). Prediction: patching the residual stream at the subject's "
         "position recovers more than half of the logit difference in the early layers, after which only the "
         "final position does.",
         "No layer's subject-position patch recovers more than half of the logit difference.",
         ("predict", "logit-lens", "patch", "dla")),
    Task("induction", "in-context copying: a repeated word sequence predicts the word that followed its last "
         "word the first time; the corrupted twin changes that word in the first copy",
         "Which heads copy repeated text, and do they form a previous-token -> induction head circuit?",
         "A previous-token head feeds, through K-composition, an induction head that attends to the token "
         "after the earlier occurrence and copies it (Olsson et al. 2022). Prediction: ablating the top "
         "induction head raises the second-copy loss by more than 1 nat, and the circuit of induction and "
         "previous-token heads is faithful (> 0.7) where random circuits of its size are not.",
         "Ablating the top-scoring induction head costs less than 1 nat, or the circuit is no more faithful "
         "than random circuits.", ("heads", "ablate", "validate-circuit")),
    Task("sentiment", "sentiment continuation: \"I love this! It's absolutely\" -> a positive word; the "
         "corrupted twin has the opposite opener (\"I hate this! ...\")",
         "Is sentiment a linear direction in the residual stream, and does the model use it?",
         "One direction separates positive from negative contexts from layer 1 on, and adding it steers the "
         "continuation. Prediction: a linear probe beats its control by more than 0.3 from layer 1, and the "
         "contrast vector shifts the logit difference more than every same-norm random direction.",
         "The probe is no better than its control, or random directions steer as much.", ("probe", "steer")),
]}
DEFAULT_TASK = "ioi"
OWN_TASK_HYPOTHESIS = ("Write it before running anything: which component (layer, head, position) does what, "
                       "and the number you expect (e.g. patching L.H recovers > 0.5 of the logit difference).")
OWN_TASK_REFUTATION = "Write the result that would prove the hypothesis wrong, before you see any result."


# ------------------------------------------------------------------------------------------ prompts
def _proper_nouns() -> set[str]:
    from mechscope.toy import corpus

    landmark_words = {w for mark in corpus.LANDMARKS for w in mark.split()} - {"the", "city"}
    return set(corpus.NAMES) | set(corpus.CAPITALS) | set(corpus.CAPITALS.values()) | \
        set(corpus.LANDMARKS.values()) | landmark_words


def _sentence(words: str) -> str:
    """Word-level corpus text as written English: "when mary and john ... , john" -> "When Mary and John..., John"."""
    proper = _proper_nouns()
    out = " ".join(w.capitalize() if w in proper else w for w in words.split())
    out = re.sub(r" ([,.!?])", r"\1", out).replace(" ' s", "'s")
    return re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), out)


def _word(word: str) -> str:
    return word.capitalize() if word in _proper_nouns() else word


def _pair(clean: str, corrupted: str, answer: str, wrong: str, group: str, positions: dict | None = None) -> dict:
    """A pair record as mechscope.tasks.read_pair_file reads it (named positions by word, a split group)."""
    out = {"clean": _sentence(clean), "corrupted": _sentence(corrupted), "answer": _word(answer), "wrong": _word(wrong),
           "group": group}
    return out | ({"positions": positions} if positions else {})


def task_prompts(name: str, n: int = 40, seed: int = 0) -> list[dict]:
    """A bundled task's prompt pairs {clean, corrupted, answer, wrong, group, positions?} in the words of the
    bundled model's corpus, written as English (any tokenizer reads them); clean and corrupted differ in one
    word. IOI draws only (template, name pair) combinations held out of the bundled model's training.
    (mechscope.tasks.load_task builds a task for a given model's tokenizer at run time.)"""
    from mechscope.toy import corpus

    rng = random.Random(seed)
    pairs = []
    if name == "ioi":
        while len(pairs) < n:
            t = rng.randrange(len(corpus.IOI_TEMPLATES))
            io, s = rng.sample(corpus.NAMES, 2)
            if not corpus.ioi_is_held_out(t, io, s):
                continue
            a, b = (io, s) if rng.random() < 0.5 else (s, io)
            fill = {"a": a, "b": b, "place": rng.choice(corpus.PLACES), "obj": rng.choice(corpus.OBJECTS)}
            template = corpus.IOI_TEMPLATES[t]
            pairs.append(_pair(template.format(s=s, **fill), template.format(s=io, **fill), io, s, f"t{t}",
                               {"IO": [_word(io), 1], "S1": [_word(s), 1], "S2": [_word(s), 2]}))
    elif name == "facts":
        countries = list(corpus.CAPITALS)
        for country in countries:
            other = rng.choice([c for c in countries if c != country])
            pairs.append(_pair(f"the capital of {country} is", f"the capital of {other} is", corpus.CAPITALS[country],
                               corpus.CAPITALS[other], country, {"SUBJECT": [_word(country), 1], "RELATION": "capital"}))
        one_word = [m for m in corpus.LANDMARKS if m.startswith("the ") and len(m.split()) == 2]
        for mark in one_word:
            other = rng.choice([m for m in one_word if corpus.LANDMARKS[m] != corpus.LANDMARKS[mark]])
            pairs.append(_pair(f"{mark} is in the city of", f"{other} is in the city of", corpus.LANDMARKS[mark],
                               corpus.LANDMARKS[other], mark, {"SUBJECT": [_word(mark.split()[-1]), 1], "RELATION": "city"}))
    elif name == "induction":
        words = sorted(set(corpus.FILLER_NOUNS + corpus.FILLER_ADJECTIVES + corpus.FILLER_ACTIONS))
        while len(pairs) < n:
            *first, answer, wrong = rng.sample(words, 7)       # 5 words, then the one that follows them
            pairs.append({"clean": " ".join(first + [answer]) + " . " + " ".join(first),
                          "corrupted": " ".join(first + [wrong]) + " . " + " ".join(first),
                          "answer": answer, "wrong": wrong, "group": f"s{len(pairs)}"})
    elif name == "sentiment":
        for good, bad in zip(corpus.POSITIVE_OPENERS, corpus.NEGATIVE_OPENERS):
            for word in corpus.INTENSIFIERS:
                pairs.append(_pair(f"{good} it ' s {word}", f"{bad} it ' s {word}", "wonderful", "terrible", good))
    else:
        raise BadInput(f"unknown task {name!r}; use {', '.join(TASKS)} or a prompt file (JSON / JSONL)")
    return pairs[:n]


def read_prompt_file(path: Path, techniques: list[Technique]) -> list[dict]:
    """The records of the user's prompt file, as mechscope.tasks reads them: pairs {clean, corrupted, answer,
    wrong} (required when a chosen technique patches) or prompts {prompt, answer, wrong?}."""
    from mechscope import tasks

    first = tasks._read_objects(str(path))[0]
    if isinstance(first, dict) and "clean" in first:
        pairs = tasks.read_pair_file(str(path)).prompts
        return [{"clean": p.text, "corrupted": p.corrupted, "answer": p.answer, "wrong": p.wrong,
                 **({"group": p.group} if p.group else {}), **({"positions": p.positions} if p.positions else {})}
                for p in pairs]
    if any(t.pairs for t in techniques):
        raise BadInput(f"prompt file {path} holds prompts, not pairs: {', '.join(t.name for t in techniques if t.pairs)} "
                       f"patches, so write {{\"clean\", \"corrupted\", \"answer\", \"wrong\"}} per line")
    prompts = tasks.read_prompt_file(str(path)).prompts
    missing = [i for i, p in enumerate(prompts, 1) if not p.answer]
    if missing:
        raise BadInput(f"prompt file {path}: prompt {missing[0]} has no \"answer\" (the token it should predict)")
    return [{"prompt": p.text, "answer": p.answer, **({"wrong": p.wrong} if p.wrong else {}),
             **({"group": p.group} if p.group else {}), **({"positions": p.positions} if p.positions else {})}
            for p in prompts]


# ------------------------------------------------------------------------------------------ checks
def project_name(target: Path, name: str | None) -> str:
    """`name`, or one made from the target folder's name; must be a valid distribution name."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", target.resolve().name).strip("-._").lower()
    if not NAME_RE.fullmatch(name or ""):
        raise BadInput(f"{name!r} is not a valid project name: use letters, digits, '-', '_' or '.', "
                       f"starting and ending with a letter or digit (pass --name)")
    return name


def check_target(text: str) -> Path:
    """The directory to create: a new path, or an empty directory that is not the current one or a link."""
    target = user_path(str(text), "the directory")
    if target.is_symlink():
        state = "a dangling symbolic link" if not target.exists() else "a symbolic link"
        raise BadInput(f"{text} is {state}; pass a new directory path (mechscope new never writes through links)")
    if target.exists() and target.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise BadInput(f"{text} is the current directory (or above it); pass a new directory, e.g. mechscope new my-study")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(f"{text} already exists and is not an empty directory; pick a new path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"cannot create {text}: {parent} is not a directory")
    return target


def choose_techniques(names: list[str] | None, task: str) -> list[Technique]:
    if not names:
        return [TECHNIQUES[n] for n in TASKS.get(task, TASKS[DEFAULT_TASK]).techniques]
    chosen = []
    for item in (n.strip() for spec in names for n in spec.split(",")):
        if item and item not in TECHNIQUES:
            raise BadInput(f"unknown --technique {item!r}; use one or more of {', '.join(TECHNIQUES)}")
        if item and TECHNIQUES[item] not in chosen:
            chosen.append(TECHNIQUES[item])
    if not chosen:
        raise BadInput(f"--technique is empty; use one or more of {', '.join(TECHNIQUES)}")
    return chosen


def _checkout() -> Path | None:
    """The source checkout this mechscope runs from (pyproject.toml beside src/mechscope), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "mechscope").is_dir() else None


def _build_from_checkout(root: Path, out: Path) -> Path:
    """`pip wheel` of a copy of the checkout (links followed, so templates/ comes along; the checkout gets no
    build/ or egg-info), offline where setuptools is importable (no build isolation)."""
    import importlib.util
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "mechscope"
        shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(root / name, source / name)
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation,
                                 "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    wheels = sorted(out.glob("mechscope-*.whl"))
    if result.returncode or len(wheels) != 1:
        detail = (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise BadInput(f"cannot build mechscope's wheel from {root} ({detail}); pass --mechscope-from "
                       f"(a pip requirement, URL or path) instead")
    return wheels[0]


def _repack_installed(out: Path) -> Path:
    """The installed (not editable) mechscope distribution written back as its wheel: its package files and
    dist-info as installed, less what the installer adds, with a new RECORD."""
    import base64
    import hashlib
    import zipfile
    from importlib import metadata

    from mechscope import __version__

    try:
        dist = metadata.distribution("mechscope")
    except metadata.PackageNotFoundError:
        dist = None
    info = f"mechscope-{__version__}.dist-info"
    files = sorted((f for f in (dist.files or []) if dist and f.parts[0] in ("mechscope", info)
                    and "__pycache__" not in f.parts and f.name not in ("INSTALLER", "RECORD", "REQUESTED",
                                                                         "direct_url.json")), key=str)
    if not any(f.parts[0] == "mechscope" for f in files):
        raise BadInput("this mechscope is neither a source checkout nor an installed wheel, so `new` cannot put it "
                       "in the study; pass --mechscope-from (a pip requirement, URL or path)")
    wheel, record = out / f"mechscope-{__version__}-py3-none-any.whl", []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            data = Path(f.locate()).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
            z.writestr(f.as_posix(), data)
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return wheel


@functools.cache
def mechscope_wheel() -> Path:
    """This mechscope as a wheel (built once per process, in a temporary folder removed at exit): built from
    the source checkout it runs from, else repacked from its installed distribution."""
    out = Path(tempfile.mkdtemp(prefix="mechscope-wheel-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    root = _checkout()
    return _build_from_checkout(root, out) if root else _repack_installed(out)


def templates_dir() -> Path:
    """templates/ as installed (package data under mechscope/templates) or in a source checkout / skill folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parents[1] / "templates"):
        if (candidate / SCAFFOLD).is_dir():
            return candidate
    raise FileNotFoundError(f"mechscope's templates/ folder is missing (looked in {here} and {here.parents[1]})")


def output_path(relative: Path) -> Path:
    parts = [("." + p[4:]) if p.startswith("dot-") else p for p in relative.parts]
    if parts[-1].endswith(".j2"):
        parts[-1] = parts[-1][:-3]
    return Path(*parts)


# ------------------------------------------------------------------------------------------ writing
@dataclass
class Created:
    path: Path                 # absolute
    files: list[str]
    git: str                   # what happened to `git init` + the first commit


def study_variables(name: str, model: str, backend: str, task: str, techniques: list[Technique],
                    question: str | None, tracking: str, records: list[dict], source: str = "mechscope") -> dict:
    """Everything the templates may use (StrictUndefined: a missing one is an error, not an empty string)."""
    from mechscope import __version__

    bundled = TASKS.get(task)
    return {
        "name": name, "model": model, "backend": backend, "tracking": tracking,
        "engine_note": ENGINES[backend],
        "question": " ".join((question or (bundled.question if bundled else
                                           "Which components implement the behaviour in my prompt set, and how?")).split()),
        "task": {"name": task if bundled else "own", "source": task if bundled else f"your file {Path(task).name}",
                 "description": bundled.description if bundled else f"your prompt set ({Path(task).name})",
                 "hypothesis": bundled.hypothesis if bundled else OWN_TASK_HYPOTHESIS,
                 "refutation": bundled.refutation if bundled else OWN_TASK_REFUTATION,
                 "n_prompts": len(records), "pairs": all("corrupted" in r for r in records),
                 "example": {"text": records[0].get("clean", records[0].get("prompt")), **records[0]}},
        "techniques": [dict(asdict(t), module=t.module, file=f"{i:02d}_{t.module}.py")
                       for i, t in enumerate(techniques, 1)],
        "mechscope_version": __version__, "mechscope_source": source,
        "toy_prompts": "data/prompts.jsonl" if bundled else "tests/data/toy_prompts.jsonl",
        "toy_task": task if bundled else DEFAULT_TASK,     # the bundled task whose prompts the tests use
    }


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["quote"] = lambda s: json.dumps(s)  # a literal valid in Python, TOML and JSON
    env.filters["pydoc"] = lambda s: str(s).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')  # inside a docstring
    env.filters["make"] = lambda s: str(s).replace("$", "$$").replace("#", "\\#")  # a Makefile variable's value
    return env


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _files(variables: dict, records: list[dict]) -> dict[str, str]:
    """relative path -> text of every file of the repository."""
    env, root = _environment(), templates_dir()
    out = {}
    for path in sorted(p for p in (root / SCAFFOLD).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(root / SCAFFOLD)
        text = env.get_template(f"{SCAFFOLD}/{relative.as_posix()}").render(**variables) \
            if path.suffix == ".j2" else path.read_text()
        out[output_path(relative).as_posix()] = text
    for t in variables["techniques"]:
        out[f"experiments/{t['file']}"] = env.get_template(f"{TECHNIQUE_TEMPLATES}/{t['module']}.py.j2").render(
            technique=t, **variables)
        out[f"tests/test_{t['file']}"] = env.get_template(f"{TECHNIQUE_TEMPLATES}/test_{t['module']}.py.j2").render(
            technique=t, **variables)
    out["data/prompts.jsonl"] = _jsonl(records)
    if variables["task"]["name"] == "own":
        out["tests/data/toy_prompts.jsonl"] = _jsonl(task_prompts(DEFAULT_TASK))
    return out


def git_init(path: Path) -> str:
    """`git init` and a first commit of everything; a note instead where git is missing or fails."""
    git = shutil.which("git")
    if git is None:
        return "git is not installed: no repository initialised (run `git init` later)"
    env = dict(os.environ)
    identity = [subprocess.run([git, "config", key], cwd=path, capture_output=True, text=True).stdout.strip()
                for key in ("user.name", "user.email")]
    if not all(identity):  # no git identity configured: commit as "mechscope new" rather than fail
        env.update(GIT_AUTHOR_NAME="mechscope new", GIT_AUTHOR_EMAIL="mechscope@localhost",
                   GIT_COMMITTER_NAME="mechscope new", GIT_COMMITTER_EMAIL="mechscope@localhost")
    try:
        for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "Scaffold from mechscope new"]):
            subprocess.run([git, *argv], cwd=path, env=env, check=True, capture_output=True, text=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = (getattr(e, "stderr", "") or "").strip().splitlines()
        return f"git init / first commit failed ({detail[-1] if detail else e}); the files are written, commit them by hand"
    return "git repository initialised with a first commit"


def render(target: str | Path, name: str | None = None, model: str = "mechscope-toy", question: str | None = None,
           backend: str = "tl", techniques: list[str] | None = None, task: str = DEFAULT_TASK,
           tracking: str = "json", git: bool = True, mechscope_from: str | None = None) -> Created:
    """Write the study's repository at `target` (a new path, or an empty directory); see the module docstring.
    mechscope_from: where the study's `make` installs mechscope from (a pip requirement, URL or path); by
    default this mechscope's wheel, written into the study's vendor/ (offline, pinned)."""
    target = check_target(str(target))
    if not model or not model.strip():
        raise BadInput("--model is empty; pass a model name or directory (default: mechscope-toy)")
    if any(ord(c) < 32 or ord(c) == 127 for c in model):
        raise BadInput(f"--model {model!r} holds control characters; pass a model name or directory")
    if backend not in BACKENDS:
        raise BadInput(f"unknown --backend {backend!r}; use {', '.join(BACKENDS)}")
    if tracking not in TRACKING:
        raise BadInput(f"unknown --tracking {tracking!r}; use {', '.join(TRACKING)}")
    name = project_name(target, name)
    chosen = choose_techniques(techniques, task)
    if task in TASKS:
        records = task_prompts(task)
    else:
        prompt_file = user_path(task, "--task")
        if not prompt_file.is_file():
            raise BadInput(f"--task {task!r} is neither a bundled task ({', '.join(TASKS)}) nor a prompt file")
        records = read_prompt_file(prompt_file, chosen)
    if mechscope_from is not None and (not mechscope_from.strip() or any(ord(c) < 32 for c in mechscope_from)):
        raise BadInput("--mechscope-from is empty or holds control characters; pass a pip requirement, URL or path")
    wheel = None if mechscope_from is not None else mechscope_wheel()
    source = mechscope_from.strip() if wheel is None else f"vendor/{wheel.name}"
    files = _files(study_variables(name, model.strip(), backend, task, chosen, question, tracking, records, source),
                   records)

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {target.parent}: {e.strerror}; pick another path") from None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:  # /proc, a read-only or full disk
        raise BadInput(f"cannot write in {target.parent}: {e.strerror}; pick another path") from None
    try:
        for relative, text in files.items():
            out = staging / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        if wheel is not None:
            (staging / "vendor").mkdir()
            shutil.copy(wheel, staging / source)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.rename(staging, target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):  # made meanwhile (another `new`)
            raise BadInput(f"{target} already exists (created while this ran); pick a new path") from None
        raise BadInput(f"cannot create {target}: {e.strerror}; pick another path") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Created(target.resolve(), sorted([*files, *([source] if wheel else [])]), git_init(target) if git else "git skipped (git=False)")
