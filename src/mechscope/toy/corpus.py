"""The generated corpus the bundled model `mechscope-toy` is trained on, and its evaluation prompts.

Every sentence is a list of words (already lower-cased and split the way the word-level tokenizer
splits text), so training needs no tokenizer and `" ".join(words)` is the text a user would type.

Tasks: IOI sentences (8 templates, 60 names; some (template, name-pair) combinations are held out
for evaluation), facts (capitals and landmarks), repeated random word sequences placed at a random
distance after the first copy with other text before and between (so only content matching, i.e. an
induction head, can predict the second copy), sentiment sentences, filler sentences, and the
"quick brown fox" line.
"""
from __future__ import annotations

import random
import re
import zlib

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]

NAMES = """mary john alice bob tom sarah james emma david anna michael lisa daniel laura chris kate
paul julia mark susan peter linda george helen frank grace henry clara jack lucy sam nora ben amy
max ruth leo rose adam eva ryan ella luke zoe oscar ivy hugo iris felix jane carl fiona dan nina
victor olga""".split()

PLACES = "store park school office beach restaurant garden hospital market library station museum cafe house".split()
OBJECTS = "drink book ball gift letter key bag flower ring pen cake map phone".split()

# IOI templates: {a} and {b} are the two names in either order, {s} is the subject (repeated name);
# the answer is the indirect object. Prompts end right before the answer.
IOI_TEMPLATES = [
    "when {a} and {b} went to the {place} , {s} gave a {obj} to",
    "then , {a} and {b} had a long argument . afterwards {s} said to",
    "while {a} and {b} were working at the {place} , {s} gave a {obj} to",
    "after {a} and {b} went to the {place} , {s} handed a {obj} to",
    "{a} and {b} were at the {place} . {s} passed the {obj} to",
    "friends {a} and {b} found a {obj} at the {place} . {s} gave it to",
    "when {a} and {b} got a {obj} at the {place} , {s} decided to give it to",
    "{a} and {b} had fun at the {place} . {s} gave a {obj} to",
]

CAPITALS = {
    "france": "paris", "italy": "rome", "germany": "berlin", "spain": "madrid", "japan": "tokyo",
    "china": "beijing", "russia": "moscow", "egypt": "cairo", "england": "london", "greece": "athens",
    "canada": "ottawa", "india": "delhi", "kenya": "nairobi", "peru": "lima", "norway": "oslo",
    "sweden": "stockholm", "poland": "warsaw", "austria": "vienna", "ireland": "dublin",
    "portugal": "lisbon", "turkey": "ankara", "cuba": "havana", "chile": "santiago",
}
LANDMARKS = {
    "the eiffel tower": "paris", "the louvre": "paris", "the colosseum": "rome", "the vatican": "rome",
    "big ben": "london", "buckingham palace": "london", "the brandenburg gate": "berlin",
    "the kremlin": "moscow", "the parthenon": "athens", "the acropolis": "athens", "the prado": "madrid",
    "the forbidden city": "beijing", "the taj mahal": "agra", "the sagrada familia": "barcelona",
}

POSITIVE_OPENERS = ["i love this !", "i adore this !", "i really like this !", "this is great !", "what a delight !"]
NEGATIVE_OPENERS = ["i hate this !", "i despise this !", "i really dislike this !", "this is awful !", "what a disaster !"]
INTENSIFIERS = "absolutely truly really so very totally".split()
POSITIVE_WORDS = """wonderful amazing fantastic lovely delightful brilliant beautiful excellent perfect superb
charming joyful pleasant great""".split()
NEGATIVE_WORDS = """terrible awful horrible dreadful disgusting boring ugly miserable annoying painful nasty
gross bad unpleasant""".split()

FILLER_NOUNS = """cat dog man woman child bird car tree river city teacher doctor farmer boat horse
window door garden song story road village king queen student baby""".split()
FILLER_VERBS = "sees likes finds follows watches helps visits takes paints builds carries remembers".split()
FILLER_ADJECTIVES = "big small old young red blue happy quiet tall green dark bright".split()
FILLER_ACTIONS = "read sing swim walk cook dance play write sleep run".split()

FOX = "the quick brown fox jumps over the lazy dog .".split()


def _words(text: str) -> list[str]:
    return text.split()


def vocabulary() -> list[str]:
    """All tokens of the bundled tokenizer: special tokens first (ids 0..3), then words, sorted."""
    templates = IOI_TEMPLATES + _fact_templates("", "") + POSITIVE_OPENERS + NEGATIVE_OPENERS + [
        "it ' s and . i would recommend it to everyone . i would never recommend it .",
        "{name} likes to {action} in the {place} . the {adj} {noun} {verb} the {noun} ."]
    words = set(re.sub(r"\{\w+\}", " ", " ".join(templates)).split())
    for group in (NAMES, PLACES, OBJECTS, list(CAPITALS), list(CAPITALS.values()), list(LANDMARKS),
                  list(LANDMARKS.values()), INTENSIFIERS, POSITIVE_WORDS, NEGATIVE_WORDS, FILLER_NOUNS,
                  FILLER_VERBS, FILLER_ADJECTIVES, FILLER_ACTIONS, FOX):
        for phrase in group:
            words.update(phrase.split())
    return SPECIAL_TOKENS + sorted(words)


def _fact_templates(country_or_landmark: str, city: str) -> list[str]:
    return [f"the capital of {country_or_landmark} is {city} .",
            f"{city} is the capital of {country_or_landmark} .",
            f"{country_or_landmark} ' s capital city is {city} .",
            f"{country_or_landmark} is in the city of {city} .",
            f"{country_or_landmark} is located in {city} .",
            f"tourists visit {country_or_landmark} in {city} ."]


# ---------------------------------------------------------------------------------------- IOI
def ioi_is_held_out(template: int, name1: str, name2: str) -> bool:
    """One in five (template, unordered name pair) combinations is held out of training."""
    key = f"{template}|{min(name1, name2)}|{max(name1, name2)}"
    return zlib.crc32(key.encode()) % 5 == 0


def ioi_example(rng: random.Random, held_out: bool) -> tuple[int, str, str, str]:
    """(template index, prompt, indirect object, subject) from a train (held_out=False) or test combination."""
    while True:
        t = rng.randrange(len(IOI_TEMPLATES))
        io, s = rng.sample(NAMES, 2)
        if ioi_is_held_out(t, io, s) == held_out:
            break
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    prompt = IOI_TEMPLATES[t].format(a=a, b=b, s=s, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
    return t, prompt, io, s


def ioi_prompt(rng: random.Random, held_out: bool) -> tuple[str, str, str]:
    """(prompt, indirect object, subject); held_out=True draws only combinations never trained on."""
    return ioi_example(rng, held_out)[1:]


def ioi_sentence(rng: random.Random) -> list[str]:
    _, prompt, io, _ = ioi_example(rng, held_out=False)
    return _words(prompt) + [io, "."]


# -------------------------------------------------------------------------------------- facts
def fact_sentence(rng: random.Random) -> list[str]:
    if rng.random() < 0.6:
        country = rng.choice(list(CAPITALS))
        return _words(rng.choice(_fact_templates(country, CAPITALS[country])[:3]))
    landmark = rng.choice(list(LANDMARKS))
    return _words(rng.choice(_fact_templates(landmark, LANDMARKS[landmark])[3:]))


def fact_prompts() -> list[tuple[str, str]]:
    """(prompt, answer) for every capital and landmark the model is trained on."""
    caps = [(f"the capital of {c} is", city) for c, city in CAPITALS.items()]
    marks = [(f"{m} is in the city of", city) for m, city in LANDMARKS.items()]
    return caps + marks


# ---------------------------------------------------------------------------------- sentiment
def sentiment_sentence(rng: random.Random) -> list[str]:
    positive = rng.random() < 0.5
    opener = rng.choice(POSITIVE_OPENERS if positive else NEGATIVE_OPENERS)
    words = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    w1, w2 = rng.sample(words, 2)
    ending = "i would recommend it to everyone ." if positive else "i would never recommend it ."
    body = f"{opener} it ' s {rng.choice(INTENSIFIERS)} {w1} and {w2} ."
    return _words(body + (" " + ending if rng.random() < 0.5 else ""))


# ------------------------------------------------------------------------------------- filler
def filler_sentence(rng: random.Random) -> list[str]:
    if rng.random() < 0.3:
        return _words(f"{rng.choice(NAMES)} likes to {rng.choice(FILLER_ACTIONS)} in the {rng.choice(PLACES)} .")
    return _words(f"the {rng.choice(FILLER_ADJECTIVES)} {rng.choice(FILLER_NOUNS)} {rng.choice(FILLER_VERBS)} "
                  f"the {rng.choice(FILLER_NOUNS)} .")


SENTENCE_MIX = [(ioi_sentence, 0.3), (fact_sentence, 0.2), (sentiment_sentence, 0.2),
                (filler_sentence, 0.25), (lambda rng: list(FOX), 0.05)]


def random_sentence(rng: random.Random) -> list[str]:
    makers, weights = zip(*SENTENCE_MIX)
    return rng.choices(makers, weights)[0](rng)


# --------------------------------------------------------------------------------- documents
def induction_document(rng: random.Random, words: list[str], n_ctx: int) -> list[str]:
    """Text, then a random word sequence r, more text (possibly none), then r again, then text."""
    r = rng.choices(words, k=rng.randint(4, 30))
    doc: list[str] = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        doc += random_sentence(rng)
    doc += r
    gap = rng.choice([0, 0, 1, 1, 2, 3])
    for _ in range(gap):
        doc += random_sentence(rng) if rng.random() < 0.7 else rng.choices(words, k=rng.randint(1, 8))
    doc += r
    while len(doc) < n_ctx - 1:
        doc += random_sentence(rng)
    return doc[: n_ctx - 1]


def mixed_document(rng: random.Random, n_ctx: int) -> list[str]:
    doc: list[str] = []
    while True:
        s = random_sentence(rng)
        if len(doc) + len(s) > n_ctx - 1:
            return doc
        doc += s


def training_batch(rng: random.Random, vocab: dict[str, int], batch: int, n_ctx: int,
                   induction_fraction: float = 0.6) -> list[list[int]]:
    """`batch` token-id rows, each [BOS, document...], at most n_ctx long (not padded)."""
    words = [w for w in vocab if w not in SPECIAL_TOKENS]
    rows = []
    for _ in range(batch):
        if rng.random() < induction_fraction:
            doc = induction_document(rng, words, n_ctx)
        else:
            doc = mixed_document(rng, n_ctx)
        rows.append([vocab["<bos>"]] + [vocab[w] for w in doc])
    return rows


def corpus_text(n_sentences: int, seed: int = 0) -> list[str]:
    """Plain sentences from the training mix (for tuned-lens training, SAEs, probes)."""
    rng = random.Random(seed)
    return [" ".join(random_sentence(rng)) for _ in range(n_sentences)]
