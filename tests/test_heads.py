"""Head scores: exact values on hand-built attention patterns, agreement with transformer-lens's head
detector, per-sequence scores and intervals, the bundled model's measured previous-token and induction heads
on every engine, attention read-outs over a prompt set (the cached pattern at the named positions; the IOI
heads that look at the second name and at S2), and the `heads` command."""
import json

import pytest
import torch

from mechscope.cli import main
from mechscope import tasks
from mechscope.techniques.heads import (SCORE_NAMES, attention_patterns, attention_readout, head_scores,
                                        non_special_token_ids, per_sequence_scores, repeated_random_tokens,
                                        scores_from_patterns)

L = 4                 # repeated part length: sequences are [BOS, r_1..r_4, r_1..r_4], 9 positions
SEQ = 2 * L + 1


def _pattern(target) -> torch.Tensor:
    """[SEQ, SEQ] one-hot attention: destination d attends to target(d) (default BOS)."""
    p = torch.zeros(SEQ, SEQ)
    for d in range(SEQ):
        p[d, target(d)] = 1.0
    return p


def _second_copy(d):
    return d >= L + 1


HAND_BUILT = {  # name -> (pattern, expected scores)
    "previous": (_pattern(lambda d: max(d - 1, 0)),
                 {"previous_token": 1.0, "induction": 0.0, "duplicate_token": 0.0, "bos": 1 / (2 * L)}),
    "duplicate": (_pattern(lambda d: d - L if _second_copy(d) else 0),
                  {"previous_token": 1 / (2 * L), "induction": 0.0, "duplicate_token": 1.0, "bos": 0.5}),
    "induction": (_pattern(lambda d: d - L + 1 if _second_copy(d) else 0),
                  {"previous_token": 1 / (2 * L), "induction": 1.0, "duplicate_token": 0.0, "bos": 0.5}),
    "bos": (_pattern(lambda d: 0), {"previous_token": 1 / (2 * L), "induction": 0.0, "duplicate_token": 0.0, "bos": 1.0}),
}


def test_scores_are_the_definition_on_hand_built_patterns():
    uniform = torch.tril(torch.ones(SEQ, SEQ))
    uniform = uniform / uniform.sum(-1, keepdim=True)           # destination d spreads 1/(d+1) over 0..d
    heads = [p for p, _ in HAND_BUILT.values()] + [uniform]
    patterns = torch.stack(heads)[None, None].expand(2, 3, -1, -1, -1)   # [layers 2, batch 3, heads 5, SEQ, SEQ]
    scores = scores_from_patterns(patterns, L)
    for h, (name, (_, expected)) in enumerate(HAND_BUILT.items()):
        for score, value in expected.items():
            assert scores[score][:, h].tolist() == pytest.approx([value, value], abs=1e-6), (name, score)
    inv = 1 / torch.arange(1, SEQ + 1).float()                 # uniform head: attention 1/(d+1) on every source
    assert scores["previous_token"][0, 4] == pytest.approx(inv[1:].mean().item(), abs=1e-6)
    assert scores["induction"][0, 4] == pytest.approx(inv[L + 1:].mean().item(), abs=1e-6)
    assert scores["duplicate_token"][0, 4] == pytest.approx(inv[L + 1:].mean().item(), abs=1e-6)
    assert scores["bos"][0, 4] == pytest.approx(inv[1:].mean().item(), abs=1e-6)


def test_induction_score_uses_offset_one_minus_L_not_minus_L():
    """A head that attends to the earlier copy of the *same* token is a duplicate-token head, not an induction head."""
    duplicate, _ = HAND_BUILT["duplicate"]
    induction, _ = HAND_BUILT["induction"]
    scores = scores_from_patterns(torch.stack([duplicate, induction])[None, None], L)
    assert scores["induction"][0].tolist() == [0.0, 1.0]
    assert scores["duplicate_token"][0].tolist() == [1.0, 0.0]


def test_random_tokens_never_include_special_tokens(toy_model):
    special = set(toy_model.tokenizer.all_special_ids)
    assert special and len(special) >= 4                       # pad, bos, eos, unk
    pool = non_special_token_ids(toy_model)
    assert not special & set(pool.tolist()) and len(pool) == toy_model.cfg.d_vocab - len(special)
    toks = repeated_random_tokens(toy_model, 200, 30, seed=1)
    assert (toks[:, 0] == toy_model.tokenizer.bos_token_id).all()
    assert not special & set(toks[:, 1:].unique().tolist())
    assert torch.equal(toks[:, 1:31], toks[:, 31:])
    assert len(toks[:, 1:].unique()) > 0.9 * len(pool)       # draws cover the vocabulary


def test_scores_agree_with_transformer_lens_head_detector(toy_model):
    """Our batched scores on one sequence = TL's `detect_head` ("mul") rescaled: TL divides by all 2L+1 rows."""
    from transformer_lens.head_detector import detect_head

    seq_len = 12
    pool = [i for i in non_special_token_ids(toy_model).tolist() if toy_model.to_single_str_token(i).isalpha()]
    r = torch.tensor(pool)[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:seq_len]]
    toks = torch.cat([torch.tensor([toy_model.tokenizer.bos_token_id]), r, r])[None]   # no repeats inside r
    text = " ".join(toy_model.to_str_tokens(toks[0, 1:]))
    assert torch.equal(toy_model.to_tokens(text), toks)
    _, cache = toy_model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    ours = scores_from_patterns(torch.stack([cache["pattern", la] for la in range(toy_model.cfg.n_layers)]), seq_len)
    n_rows = 2 * seq_len + 1
    for ours_name, tl_name, scale in (("previous_token", "previous_token_head", n_rows / (2 * seq_len)),
                                      ("induction", "induction_head", n_rows / seq_len),
                                      ("duplicate_token", "duplicate_token_head", n_rows / seq_len)):
        theirs = detect_head(toy_model, text, tl_name) * scale
        torch.testing.assert_close(ours[ours_name], theirs.float(), atol=1e-5, rtol=1e-4)


def test_bundled_model_card_heads_come_out_on_top(toy_on, toy_card):
    """On every engine: the model card's previous-token (L1H2) and induction (L2H1) heads (measured, and the
    induction head's ablation destroys in-context copying) top their scores, an earlier layer feeding a later
    one, with intervals over the sequences that exclude the runner-up's mean."""
    card = toy_card["induction"]
    assert card["previous_token_head"] == [1, 2] and card["induction_head"] == [2, 1]
    scores = head_scores(toy_on, n_sequences=32, seq_len=20, seed=1)   # other random sequences than the card
    prev_layer, prev_head, prev_score = scores.top("previous_token", 1)[0]
    ind_layer, ind_head, ind_score = scores.top("induction", 1)[0]
    assert [prev_layer, prev_head] == card["previous_token_head"]
    assert [ind_layer, ind_head] == card["induction_head"]
    assert prev_layer < ind_layer
    assert prev_score >= 0.5 and ind_score >= 0.5
    assert card["ablation_loss_increase"]["mean"] > 1.0                  # the induction head does the copying
    # measured on the shipped weights: previous-token L1H2 0.90, induction L2H1 0.94 (L2H2 0.92 close behind);
    # neither is a duplicate-token head
    assert scores.duplicate_token[ind_layer, ind_head] < 0.1 and scores.duplicate_token[prev_layer, prev_head] < 0.1
    prev = scores.per_sequence["previous_token"][:, prev_layer, prev_head]
    runner_up = scores.top("previous_token", 2)[1][2]
    assert prev.shape == (32,) and prev.min() > runner_up                 # every sequence agrees


def test_per_sequence_scores_average_to_the_scores(toy_engine):
    """Chunked forwards give the same scores; the mean pattern over the sequences carries the induction stripe."""
    one = head_scores(toy_engine, n_sequences=10, seq_len=8, seed=2, batch_size=10)
    chunked = head_scores(toy_engine, n_sequences=10, seq_len=8, seed=2, batch_size=3)
    for name in SCORE_NAMES:
        torch.testing.assert_close(chunked.per_sequence[name], one.per_sequence[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.per_sequence[name].mean(0), getattr(one, name), atol=1e-6, rtol=1e-6)
    stripe = one.mean_pattern[2, 1].diagonal(offset=1 - 8)[2:]    # (d, d - L + 1) for d = L+1..2L, L = 8
    torch.testing.assert_close(stripe.mean(), one.induction[2, 1], atol=1e-5, rtol=1e-5)
    per_seq = per_sequence_scores(torch.stack([HAND_BUILT["induction"][0]] * 2)[:, None, None].expand(2, 3, 1, -1, -1), L)
    assert per_seq["induction"].shape == (3, 2, 1) and (per_seq["induction"] == 1).all()


def test_attention_readout_is_the_pattern_at_the_named_positions(toy_engine):
    """Right-padded prompts of different lengths: each value is the prompt's own pattern[END, key]."""
    ps = tasks.load_task(toy_engine, "ioi", n=8, seed=3)
    rows, where = ps.tokens(toy_engine)
    tokens, lengths = tasks.padded(toy_engine, rows)
    assert len(set(lengths.tolist())) > 1
    keys = {k: where[k] for k in ("IO", "S1", "S2")}
    values = attention_readout(toy_engine, tokens, where["END"], keys, batch_size=3)    # [8, L, H, 3]
    for i in (0, int(lengths.argmin())):
        _, cache = toy_engine.model.run_with_cache(rows[i][None], names_filter=lambda n: n.endswith("hook_pattern"))
        for layer in range(3):
            expected = cache["pattern", layer][0, :, -1][:, torch.stack([where[k][i] for k in keys])]   # [H, 3]
            torch.testing.assert_close(values[i, layer], expected, atol=1e-5, rtol=1e-5)


def test_ioi_readout_finds_the_s2_heads(toy_on):
    """On every engine. Measured (80 held-out IOI prompts): from END, L0H2 attends to S2 (0.75 whatever the
    name order, at least 0.48 on every prompt), with L0H0 and L0H3 (~0.4); no head of layers 1-2 puts more
    than 0.06 on any name from END, and no head more than 0.1 on IO or S1: the information about which name
    is S reaches the last token through layer 0 (patching agrees), not through an attending name mover."""
    ps = tasks.load_task(toy_on, "ioi", n=80, seed=0)
    rows, where = ps.tokens(toy_on)
    tokens, _ = tasks.padded(toy_on, rows)
    values = attention_readout(toy_on, tokens, where["END"], {k: where[k] for k in ("IO", "S1", "S2")})
    io_first = where["IO"] < where["S1"]
    for first in (True, False):
        group = values[io_first == first].mean(0)                         # [L, H, (IO, S1, S2)]
        assert int(group[..., 2].argmax()) == 2 and group[0, 2, 2] > 0.6
        assert group[0, 0, 2] > 0.25 and group[0, 3, 2] > 0.25
        assert group[1:].max() < 0.15 and group[..., :2].max() < 0.15
    assert values[:, 0, 2, 2].min() > 0.35


def test_attention_patterns_match_the_cache(toy_model):
    toks = toy_model.to_tokens("the quick brown fox jumps over the lazy dog")
    pats = attention_patterns(toy_model, toks, [(1, 0), (0, 3)])
    _, cache = toy_model.run_with_cache(toks)
    torch.testing.assert_close(pats[0], cache["pattern", 1][0, 0])
    torch.testing.assert_close(pats[1], cache["pattern", 0][0, 3])
    torch.testing.assert_close(pats.sum(-1), torch.ones(2, toks.shape[1]))


def test_heads_command(toy_card, tmp_path, capsys):
    assert main(["heads", "--out", str(tmp_path), "--json", "--n-sequences", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    for name in out["summary"]["files"] + ["result.json", "meta.json"]:
        assert (run_dir / name).stat().st_size > 0, name
    rows = (run_dir / "head_scores.csv").read_text().strip().splitlines()
    assert rows[0].startswith("layer,head,previous_token,previous_token_ci_low,") and len(rows) == 1 + 12
    ind = "L{}H{}".format(*toy_card["induction"]["induction_head"])
    top = out["summary"]["top_heads"]["induction"][0]
    assert top["head"] == ind and top["score"] >= 0.5 and top["ci_low"] <= top["score"] <= top["ci_high"]
    assert out["summary"]["rank_stability"]["previous_token"]["top_k"][0] == "L1H2"
    assert ind in out["summary"]["plotted_heads"]
    page = (run_dir / "attention.html").read_text()
    assert "http" not in page and "<script src" not in page and '"fox"' in page and ind in page


def test_heads_command_readout(tmp_path, capsys):
    assert main(["heads", "--out", str(tmp_path), "--json", "--n-sequences", "4", "--task", "ioi", "--n", "24",
                 "--from", "END", "--to", "S2,IO"]) == 0
    out = json.loads(capsys.readouterr().out)
    readout = out["summary"]["readout"]
    assert readout["to"] == ["S2", "IO"] and readout["n_prompts"] == 24
    s2 = readout["keys"]["S2"]["top"][0]
    assert s2["head"] == "L0H2" and s2["ci_low"] <= s2["attention"] <= s2["ci_high"]
    assert readout["keys"]["IO"]["top"][0]["attention"] < 0.15          # no head looks at IO from END
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert len((run_dir / "attention_readout.csv").read_text().strip().splitlines()) == 1 + 24 * 12
    assert (run_dir / "readout_END_S2.png").exists() and (run_dir / "attention_repeated.png").exists()
    assert len(out["summary"]["plotted_heads"]) >= 2


@pytest.mark.parametrize("args, words", [
    (["--heads", "7.0"], "layer 7 is out of range"),
    (["--heads", "1.9"], "head 9 is out of range"),
    (["--heads", "one.two"], "cannot read head"),
    (["--layer", "-9"], "out of range"),
    (["--seq-len", "500"], "--seq-len must be in 2..63"),
    (["--n-sequences", "0"], "--n-sequences must be at least 1"),
    (["--prompt", " "], "prompt is empty"),
    (["--task", "ioi", "--to", "XX"], "unknown --to position XX"),
    (["--task", "ioi", "--from", "S1", "--to", "S2"], "attention only looks back"),
    (["--task", "ioi", "--from", "NOPE"], "--from 'NOPE' is not a named position"),
    (["--to", "IO"], "add --task"),
])
def test_heads_bad_input(args, words, tmp_path, capsys):
    assert main(["heads", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_heads_and_layer_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["heads", "--out", str(tmp_path), "--heads", "1.2", "--layer", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and len(err.strip().splitlines()) == 1
