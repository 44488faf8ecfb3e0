"""tasks: the bundled prompt sets resolve their named positions to the right tokens, pairs have equal
lengths and flipped answers, splits keep groups apart, and files are read with clear errors."""
import json

import pytest

from mechscope import tasks
from mechscope.errors import BadInput


@pytest.mark.parametrize("name", ["ioi", "facts"])
def test_pairs_have_equal_lengths_and_positions_name_the_right_tokens(toy_engine, name):
    ps = tasks.load_task(toy_engine, name, n=30, seed=1)
    rows, positions = ps.tokens(toy_engine)
    corrupted, _ = ps.tokens(toy_engine, corrupted=True)
    assert len(ps) == 30 and all(len(a) == len(b) for a, b in zip(rows, corrupted))
    for i, p in enumerate(ps.prompts):
        words = toy_engine.to_str_tokens(rows[i])
        assert positions["END"][i] == len(rows[i]) - 1
        if name == "ioi":
            assert words[positions["IO"][i]] == p.answer and words[positions["S1"][i]] == p.wrong
            assert words[positions["S2"][i]] == p.wrong and positions["S1"][i] < positions["S2"][i]
            assert toy_engine.to_str_tokens(corrupted[i])[positions["S2"][i]] == p.answer  # the flipped subject
        else:
            assert words[positions["RELATION"][i]] in ("capital", "city") and p.answer != p.wrong


def test_bundled_ioi_prompts_are_held_out_combinations(toy_engine):
    from mechscope.toy import corpus

    for p in tasks.load_task(toy_engine, "ioi", n=20).prompts:
        template = int(p.group[1:])
        assert corpus.ioi_is_held_out(template, p.answer, p.wrong)


def test_split_keeps_groups_apart(toy_engine):
    train, test = tasks.load_task(toy_engine, "ioi", n=60).split(0.3, seed=0)
    assert len(train) + len(test) == 60 and len(test) > 0
    assert not {p.group for p in train.prompts} & {p.group for p in test.prompts}


def test_prompt_and_pair_files(tmp_path, toy_engine):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        "the capital of france is",
        {"prompt": "when mary and john went to the store , john gave a drink to", "answer": "mary",
         "positions": {"S2": "john", "IO": ["mary", 1]}}]))
    ps = tasks.read_prompt_file(str(f))
    assert ps.position_names == ("S2", "IO", "END")
    with pytest.raises(BadInput, match="not defined"):
        ps.tokens(toy_engine)                     # the first prompt has no S2
    ps.prompts = ps.prompts[1:]
    _, positions = ps.tokens(toy_engine)
    assert positions["S2"].tolist() == [10] and positions["IO"].tolist() == [2]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"clean": "a", "corrupted": "b", "answer": "x"}]))
    with pytest.raises(BadInput, match="lacks wrong"):
        tasks.read_pair_file(str(pairs))


@pytest.mark.parametrize("content, message", [("", "no prompts"), ("{not json", "not JSON"),
                                              ('[{"prompt": ""}]', "non-empty"), ('[{"prompt": "a", "answer": 3}]', "strings")])
def test_bad_prompt_files(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(BadInput, match=message):
        tasks.read_prompt_file(str(f))


def test_unknown_task_and_missing_word(toy_engine):
    with pytest.raises(BadInput, match="unknown task"):
        tasks.load_task(toy_engine, "nope")
    with pytest.raises(BadInput, match="not in the prompt"):
        tasks.resolve_position(toy_engine, "the capital of france is", toy_engine.to_tokens("the capital of france is")[0],
                               "rome", "X")
