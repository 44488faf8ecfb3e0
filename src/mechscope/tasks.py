"""Prompt sets: the bundled tasks by name, prompt / pair files, and named positions.

    ps = load_task(engine, "ioi", n=64, seed=0)     # held-out IOI prompts with corrupted twins
    ps = read_prompt_file("prompts.jsonl")          # your own prompts
    ps = read_pair_file("pairs.jsonl")              # your own clean / corrupted pairs
    rows, positions = ps.tokens(engine)             # n x [seq_i] ids, and {name: [n] token index}

Tasks (`TASKS`): ioi (Wang et al.: "When Mary and John went to the store, John gave a drink to" -> Mary;
corrupted twin: the second subject replaced by the indirect object, so the answer flips; positions IO, S1,
S2, END), facts (capitals and landmarks; corrupted twin: another subject of the same length with its own
answer; positions SUBJECT, RELATION, END), sentiment (positive / negative openers with a label; for
probes and steering), induction (repeated random token sequences; built from tokens, see
techniques.heads.repeated_random_tokens). On the bundled model the prompts come from its generated corpus
(IOI from held-out template / name combinations); on other models from built-in templates with only the
names and answers that are one token for that tokenizer, and pairs of equal token length.

Files: JSON (a list) or JSONL (one object per line). A prompt is a string or {"prompt", "answer"?,
"wrong"?, "label"?, "group"?, "positions"?}; a pair is {"clean", "corrupted", "answer", "wrong",
"group"?, "positions"?}. "positions" names positions by word: {"S2": "John"} (its last occurrence),
{"S1": ["John", 1]} (its first), {"X": 3} (a token index); END (the last token) is always defined.
"group" (default: the template, where known) keeps related prompts on one side of a train / test split, and
is the unit that intervals resample (cluster bootstrap, `mechscope.stats`): the bundled tasks group ioi by
template, facts by subject, sentiment by opener.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mechscope.errors import BadInput

TASKS = ("ioi", "facts", "sentiment", "induction")
END = "END"


@dataclass
class Prompt:
    """One prompt. corrupted: its twin of equal token length (for patching); positions: name -> word spec."""
    text: str
    answer: str | None = None
    wrong: str | None = None
    corrupted: str | None = None
    label: str | None = None
    group: str | None = None
    positions: dict = field(default_factory=dict)


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt]
    position_names: tuple[str, ...] = (END,)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def groups(self) -> list[str] | None:
        """[n] each prompt's group (a prompt without one is its own), the unit that stats resamples; None when
        no prompt has a group (every prompt is then its own unit)."""
        if all(p.group is None for p in self.prompts):
            return None
        return [p.group if p.group is not None else f"#{i}" for i, p in enumerate(self.prompts)]

    def tokens(self, engine, corrupted: bool = False):
        """(rows: n x [seq_i] token ids, {position name: [n] token index}) on this engine's tokenizer.
        corrupted=True: the corrupted twins' tokens, with the clean prompts' positions (pairs align)."""
        import torch

        rows, where = [], {name: [] for name in self.position_names}
        for i, p in enumerate(self.prompts):
            if corrupted and p.corrupted is None:
                raise BadInput(f"prompt {i} of {self.name} has no corrupted twin; pass pairs (clean, corrupted)")
            clean = prompt_tokens(engine, p.text)
            rows.append(prompt_tokens(engine, p.corrupted) if corrupted else clean)
            for name in self.position_names:
                where[name].append(resolve_position(engine, p.text, clean, p.positions.get(name), name))
        return rows, {name: torch.tensor(v) for name, v in where.items()}

    def answer_ids(self, engine):
        """(answers, wrongs): [n] token ids of each prompt's answer / wrong word, or None where no prompt
        has one (BadInput when only some prompts do, or a word is not one token)."""
        import torch

        from mechscope import inputs

        out = []
        for key in ("answer", "wrong"):
            words = [getattr(p, key) for p in self.prompts]
            given = sum(w is not None for w in words)
            if 0 < given < len(words):
                raise BadInput(f"{self.name}: {given} of {len(words)} prompts have a \"{key}\"; give every "
                               f"prompt one or none")
            out.append(torch.tensor([inputs.single_token(engine, w) for w in words]) if given else None)
        return tuple(out)

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple["PromptSet", "PromptSet"]:
        """(train, test) with whole groups on one side (prompts without a group are their own group)."""
        groups = sorted({p.group or f"#{i}" for i, p in enumerate(self.prompts)})
        if len(groups) < 2:
            raise BadInput(f"{self.name}: a train / test split needs prompts from 2+ groups (templates)")
        random.Random(seed).shuffle(groups)
        n_test = min(len(groups) - 1, max(1, round(test_fraction * len(groups))))
        test_groups = set(groups[:n_test])
        key = [p.group or f"#{i}" for i, p in enumerate(self.prompts)]
        train = [p for p, g in zip(self.prompts, key) if g not in test_groups]
        test = [p for p, g in zip(self.prompts, key) if g in test_groups]
        return replace(self, prompts=train, name=self.name + ":train"), replace(self, prompts=test,
                                                                                name=self.name + ":test")


# ------------------------------------------------------------------------------------ tokens and positions
def prompt_tokens(engine, text: str):
    """[seq] ids of a non-empty prompt that fits the context (BOS first)."""
    from mechscope import inputs

    return inputs.tokens(engine, text)[0]


def padded(engine, rows):
    """(tokens [n, longest], lengths [n]) from n x [seq_i] ids, on the rows' device: each row right-padded with
    its own last token, never a pad or special id (which a tokenizer or an SAE's special-token rule would treat
    apart). Right padding leaves a causal model's real positions unchanged: read each row at its own
    positions. mechscope's one padding helper; `engine` is accepted for its callers (the padding needs none)."""
    import torch

    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    rows = [torch.as_tensor(r) for r in rows]
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows]), lengths


def resolve_position(engine, text: str, row, spec, name: str) -> int:
    """The token index of a named position in `text` (tokenised as `row`, BOS first).

    spec: None for END (or an unknown name: BadInput), an int index, a word (its last occurrence) or
    [word, k] (its k-th occurrence, 1-based). A word's position is its last token."""
    seq = len(row)
    if spec is None:
        if name == END:
            return seq - 1
        raise BadInput(f"position {name!r} is not defined for the prompt {text!r}; add it to its \"positions\"")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not -seq <= spec < seq:
            raise BadInput(f"position {name}={spec} is outside the prompt {text!r} ({seq} tokens)")
        return spec % seq
    word, k = (spec, -1) if isinstance(spec, str) else (spec[0], int(spec[1]))
    spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)]
    if not spans or not (k == -1 or 1 <= k <= len(spans)):
        raise BadInput(f"position {name}: word {word!r} (occurrence {k}) is not in the prompt {text!r}")
    end = spans[-1 if k == -1 else k - 1][1]
    prefix = engine.to_tokens(text[:end])[0]
    if len(prefix) > seq or prefix.tolist() != row[:len(prefix)].tolist():
        raise BadInput(f"position {name}: the tokens of {text[:end]!r} are not a prefix of the prompt's tokens; "
                       f"give the position as a token index")
    from mechscope import inputs

    inputs.refuse_unknown(engine, int(row[len(prefix) - 1]), f"position {name} ({word!r} in {text!r})")
    return len(prefix) - 1


# ------------------------------------------------------------------------------------ bundled tasks
def load_task(engine, name: str, n: int = 64, seed: int = 0) -> PromptSet:
    """A bundled task's prompt set for this engine's model (see the module docstring)."""
    if name not in TASKS:
        raise BadInput(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    if name == "induction":
        raise BadInput("the induction task is built from random tokens (techniques.heads.repeated_random_tokens), "
                       "not prompts; this command takes --task ioi, facts or sentiment")
    if n < 1:
        raise BadInput("the number of prompts must be at least 1")
    toy = engine.cfg.model_name == "mechscope-toy"
    build = {"ioi": _toy_ioi if toy else _ioi, "facts": _toy_facts if toy else _facts,
             "sentiment": _toy_sentiment if toy else _sentiment}[name]
    return build(engine, n, seed)


def _ioi_prompt(template: str, io: str, s: str, order_io_first: bool, group: str, **slots) -> Prompt:
    a, b = (io, s) if order_io_first else (s, io)
    text = template.format(a=a, b=b, s=s, **slots)
    corrupted = template.format(a=a, b=b, s=io, **slots)
    return Prompt(text, answer=io, wrong=s, corrupted=corrupted, group=group,
                  positions={"IO": [io, 1], "S1": [s, 1], "S2": [s, 2]})


def _toy_ioi(engine, n: int, seed: int) -> PromptSet:
    from mechscope.toy import corpus

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        t, _, io, s = corpus.ioi_example(rng, held_out=True)
        prompts.append(_ioi_prompt(corpus.IOI_TEMPLATES[t], io, s, rng.random() < 0.5,
                                   group=f"t{t}", place=rng.choice(corpus.PLACES), obj=rng.choice(corpus.OBJECTS)))
    return PromptSet("ioi", prompts, ("IO", "S1", "S2", END))


# Templates after Wang et al. 2022 (BABA / ABBA orders come from {a} {b}); names and objects are kept only
# where they are one token for the model's tokenizer. No name opens a prompt: a BPE vocabulary reads a first
# word without its leading space ("Joe", not " Joe"), another token than the answer's.
IOI_TEMPLATES = [
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to",
    "While {a} and {b} were working at the {place}, {s} gave a {obj} to",
    "Then, {a} and {b} had a long argument, and afterwards {s} said to",
    "When {a} and {b} got a {obj} at the {place}, {s} decided to give it to",
    "Friends {a} and {b} found a {obj} at the {place}. {s} gave it to",
    "Later, {a} and {b} were working at the {place}. {s} decided to give a {obj} to",
    "The {place} {a} and {b} went to had a {obj}. {s} gave it to",
]
IOI_NAMES = ("Mary John Alice Bob Tom Sarah James Emma David Anna Michael Lisa Daniel Laura Chris Kate Paul "
             "Mark Susan Peter Linda George Helen Frank Grace Henry Jack Lucy Sam Ben Amy Max Rose Adam Ryan "
             "Luke Oscar Carl Dan Victor Jane Kevin Steven Eric Brian Jason Matt Andrew Joe Tim").split()
IOI_PLACES = "store park school office beach restaurant garden hospital market library station house".split()
IOI_OBJECTS = "drink book ball gift letter key bag flower ring pen cake map phone".split()


def _single_token(engine, word: str) -> bool:
    ids = engine.to_tokens(" " + word, prepend_bos=False)[0]
    return len(ids) == 1


def _ioi(engine, n: int, seed: int) -> PromptSet:
    names = [w for w in IOI_NAMES if _single_token(engine, w)]
    if len(names) < 2:
        raise BadInput("fewer than 2 of the IOI names are single tokens for this tokenizer; pass --pairs FILE")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        t = rng.randrange(len(IOI_TEMPLATES))
        io, s = rng.sample(names, 2)
        prompts.append(_ioi_prompt(IOI_TEMPLATES[t], io, s, rng.random() < 0.5, group=f"t{t}",
                                   place=rng.choice(IOI_PLACES), obj=rng.choice(IOI_OBJECTS)))
    return PromptSet("ioi", _same_length_pairs(engine, prompts), ("IO", "S1", "S2", END))


def _same_length_pairs(engine, prompts: list[Prompt]) -> list[Prompt]:
    """Keep prompts whose corrupted twin has the same token count (BadInput if none is left)."""
    kept = [p for p in prompts if len(engine.to_tokens(p.text)[0]) == len(engine.to_tokens(p.corrupted)[0])]
    if not kept:
        raise BadInput("no generated prompt has a corrupted twin of the same token length; pass --pairs FILE")
    return kept


def _fact_set(engine, facts: list[tuple[str, str, str]], n: int, seed: int) -> PromptSet:
    """facts: (template with {x}, subject, answer) -> pairs whose corrupted subject has another answer and
    the same token count; positions SUBJECT (its last token), RELATION (the relation's noun, e.g.
    "capital" / "city"), END."""
    rng = random.Random(seed)
    prompts = []
    for i, (template, subject, answer) in enumerate(facts):
        text = template.format(x=subject)
        length = len(engine.to_tokens(text)[0])
        others = [(s, a) for t, s, a in facts if t == template and a != answer
                  and len(engine.to_tokens(template.format(x=s))[0]) == length]
        if not others:
            continue
        other, other_answer = rng.choice(others)
        relation = next(w for w in ("capital", "city", "located") if w in template.split())
        prompts.append(Prompt(text, answer=answer, wrong=other_answer, corrupted=template.format(x=other),
                              group=subject, positions={"SUBJECT": [subject.split()[-1], 1], "RELATION": relation}))
    if not prompts:
        raise BadInput("no fact prompt has a corrupted twin of the same token length for this tokenizer; "
                       "pass --pairs FILE")
    rng.shuffle(prompts)
    return PromptSet("facts", prompts[:n], ("SUBJECT", "RELATION", END))


def _toy_facts(engine, n: int, seed: int) -> PromptSet:
    from mechscope.toy import corpus

    facts = [("the capital of {x} is", c, city) for c, city in corpus.CAPITALS.items()]
    facts += [("{x} is in the city of", m, city) for m, city in corpus.LANDMARKS.items()]
    return _fact_set(engine, facts, n, seed)


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens", "Austria": "Vienna",
            "Poland": "Warsaw", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
            "Portugal": "Lisbon", "Hungary": "Budapest", "Kenya": "Nairobi", "Canada": "Ottawa",
            "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok", "Turkey": "Ankara"}


def _facts(engine, n: int, seed: int) -> PromptSet:
    facts = [("The capital of {x} is", c, city) for c, city in CAPITALS.items()
             if _single_token(engine, city)]
    return _fact_set(engine, facts, n, seed)


def _toy_sentiment(engine, n: int, seed: int) -> PromptSet:
    from mechscope.toy import corpus

    prompts = []
    for label, openers in (("positive", corpus.POSITIVE_OPENERS), ("negative", corpus.NEGATIVE_OPENERS)):
        prompts += [Prompt(f"{o} it ' s {i}", label=label, group=o) for o in openers for i in corpus.INTENSIFIERS]
    random.Random(seed).shuffle(prompts)
    return PromptSet("sentiment", prompts[:n])


POSITIVE_OPENERS = ["I love this!", "I adore this!", "This is great!", "What a delight!", "I really like it!"]
NEGATIVE_OPENERS = ["I hate this!", "I despise this!", "This is awful!", "What a disaster!", "I really dislike it!"]
INTENSIFIERS = ["absolutely", "truly", "really", "so", "very", "totally"]


def _sentiment(engine, n: int, seed: int) -> PromptSet:
    prompts = []
    for label, openers in (("positive", POSITIVE_OPENERS), ("negative", NEGATIVE_OPENERS)):
        prompts += [Prompt(f"{o} It's {i}", label=label, group=o) for o in openers for i in INTENSIFIERS]
    random.Random(seed).shuffle(prompts)
    return PromptSet("sentiment", prompts[:n])


NEUTRAL_TEXTS = [
    "The train leaves the station at nine and arrives in the city before noon.",
    "She opened the window, put the kettle on and read the morning paper.",
    "The library is on the second floor, next to the room with the maps.",
    "He parked the car behind the house and carried the boxes inside.",
    "The river runs through the valley and past the old mill.",
    "They met at the corner of the street and walked to the market together.",
    "The meeting was moved to Thursday because the room was booked.",
    "A small bird sat on the fence and watched the garden.",
    "The recipe needs two eggs, a cup of flour and some milk.",
    "The bus was late, so the children waited under the bridge.",
    "Our office has a long table, six chairs and a large screen.",
    "The farmer counted the sheep and closed the gate for the night.",
]


def neutral_texts(engine, n: int = 32, seed: int = 0) -> list[str]:
    """n texts with no sentiment, to measure what an intervention costs the language model (its loss there).
    On the bundled model: pairs of its filler sentences ("the old cat sees the dog . mary likes to swim in the
    park ."); on others: built-in plain sentences (at most len(NEUTRAL_TEXTS))."""
    if engine.cfg.model_name != "mechscope-toy":
        return NEUTRAL_TEXTS[:n]
    from mechscope.toy import corpus

    rng = random.Random(seed)
    return [" ".join(corpus.filler_sentence(rng) + corpus.filler_sentence(rng)) for _ in range(n)]


# ------------------------------------------------------------------------------------ files
def _read_objects(path: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{path} does not exist or is not a file")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not JSON / JSONL ({e.msg}, line {e.lineno})") from None
    if not data:
        raise BadInput(f"{path} holds no prompts")
    return data


def _positions(item: dict, where: str) -> dict:
    positions = item.get("positions") or {}
    if not isinstance(positions, dict):
        raise BadInput(f"{where}: \"positions\" must be an object {{name: word | [word, k] | index}}")
    return positions


def _position_names(prompts: list[Prompt]) -> tuple[str, ...]:
    names = [name for p in prompts for name in p.positions]
    return tuple(dict.fromkeys(names)) + (END,) if names else (END,)


def read_prompt_file(path: str) -> PromptSet:
    """A PromptSet from a JSON / JSONL file of strings or {"prompt", "answer", "wrong", "label", ...}."""
    prompts = []
    for i, item in enumerate(_read_objects(path)):
        where = f"{path}: item {i + 1}"
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise BadInput(f"{where} needs a non-empty \"prompt\" string")
        extra = {k: item.get(k) for k in ("answer", "wrong", "label", "group")}
        if any(v is not None and not isinstance(v, str) for v in extra.values()):
            raise BadInput(f"{where}: answer / wrong / label / group must be strings")
        prompts.append(Prompt(item["prompt"], positions=_positions(item, where), **extra))
    return PromptSet(Path(path).name, prompts, _position_names(prompts))


def read_pair_file(path: str) -> PromptSet:
    """A PromptSet of pairs from a JSON / JSONL file of {"clean", "corrupted", "answer", "wrong", ...}."""
    prompts = []
    for i, item in enumerate(_read_objects(path)):
        where = f"{path}: pair {i + 1}"
        if not isinstance(item, dict):
            raise BadInput(f"{where} must be an object with clean, corrupted, answer, wrong")
        not_text = [k for k in ("clean", "corrupted", "answer", "wrong") if item.get(k) is not None
                    and not isinstance(item[k], str)]
        if not_text:
            raise BadInput(f"{where}: {', '.join(not_text)} must be text (a string)")
        missing = [k for k in ("clean", "corrupted", "answer", "wrong") if not item.get(k) or not item[k].strip()]
        if missing:
            raise BadInput(f"{where} lacks {', '.join(missing)}: each pair needs clean, corrupted, answer, wrong")
        prompts.append(Prompt(item["clean"], answer=item["answer"], wrong=item["wrong"], corrupted=item["corrupted"],
                              group=item.get("group"), positions=_positions(item, where)))
    return PromptSet(Path(path).name, prompts, _position_names(prompts))
