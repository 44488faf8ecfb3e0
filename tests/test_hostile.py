"""Hostile input, every command: each case is refused with exit 2, one stderr line naming the problem, no
traceback, nothing on stdout, and no run directory left behind (tests/hostile.py). In-process on the bundled
model (one shared load); a few cases through a real process for the exit code and stray warnings."""
import json
import re

import numpy as np
import pytest
import torch

from hostile import assert_refused, refused_by_subprocess, reuse_engine
from mechscope.cli import COMMANDS

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_B = "When Mary and John went to the store, Mary gave a drink to"
LONG = "the " * 200
HUGE = str(2 ** 64)


def _files(root):
    """Hostile files, by name -> path."""
    f = {}

    def put(name, text):
        path = root / name
        path.write_text(text)
        f[name] = str(path)

    put("not.json", "{not json")
    put("empty.json", "")
    put("strings.json", '["a", "b"]')
    put("list.json", "[]")
    put("number.json", "42")
    put("missing_keys.json", json.dumps([{"clean": IOI}]))
    put("diff_len.json", json.dumps([{"clean": IOI, "corrupted": "The capital of France is", "answer": "mary",
                                      "wrong": "john"}]))
    put("two_tokens.json", json.dumps([{"clean": IOI, "corrupted": IOI_B, "answer": "mary john", "wrong": "john"}]))
    put("numeric_prompt.json", json.dumps([{"clean": 5, "corrupted": 7, "answer": "mary", "wrong": "john"}]))
    put("empty_prompt.json", json.dumps([{"clean": "  ", "corrupted": "  ", "answer": "mary", "wrong": "john"}]))
    put("long_pair.json", json.dumps([{"clean": LONG, "corrupted": LONG, "answer": "mary", "wrong": "john"}]))
    put("prompts_cut.json", '["a",')
    put("prompts_missing_word.json", json.dumps([{"prompt": "the cat", "positions": {"X": "dog"}}]))
    put("prompts_two_tokens.json", json.dumps([{"prompt": "the cat", "answer": "mary john"}]))
    put("prompts_same.json", json.dumps([{"prompt": "the cat", "answer": "mary", "wrong": "mary"}]))
    put("prompts_numbers.json", "[5]")
    put("bad.jsonl", '{"prompt": "i love this", "label": "pos"}\n{oops\n')
    put("no_label.jsonl", '{"prompt": "i love this"}\n')
    put("list_rows.jsonl", "[1, 2]\n")
    put("blank.jsonl", "\n\n")
    put("one_class.jsonl", "".join(json.dumps({"prompt": f"i love this {i}", "label": "pos"}) + "\n"
                                   for i in range(40)))
    put("few.jsonl", "".join(json.dumps({"prompt": "i love this", "label": y}) + "\n" for y in ("a", "b", "a")))
    put("bad_position.jsonl", "".join(json.dumps({"prompt": "i love this", "label": y, "position": 99}) + "\n"
                                      for y in ("a", "b") * 20))
    put("no_columns.csv", "text,y\ni love this,pos\n")
    put("empty.txt", "")
    put("short.txt", "the cat .")
    put("long.txt", "the cat sat on the mat . " * 400)
    for name, value in (("nan.pt", torch.full((128,), float("nan"))), ("inf.pt", torch.full((128,), float("inf"))),
                        ("shape.pt", torch.ones(5)), ("matrix.pt", torch.ones(128, 2)),
                        ("zero.pt", torch.zeros(128))):
        torch.save(value, root / name)
        f[name] = str(root / name)
    torch.save({"a": 1}, root / "dict.pt")
    f["dict.pt"] = str(root / "dict.pt")
    np.save(root / "nan.npy", np.full(128, np.nan, dtype=np.float32))
    f["nan.npy"] = str(root / "nan.npy")
    put("garbage.pt", "not a tensor")
    (root / "binary.dat").write_bytes(bytes(range(128, 256)) * 3)
    (root / "binary.csv").write_bytes(bytes(range(128, 256)) * 3)
    f["binary.dat"], f["binary.csv"] = str(root / "binary.dat"), str(root / "binary.csv")
    (root / "dangling").symlink_to(root / "nowhere")
    f["dangling"] = str(root / "dangling")
    put("a_file", "x")
    f["under_file"] = str(root / "a_file" / "runs")
    for name, config in (("bad_config", "{oops"), ("list_config", "[1]"), ("empty_config", "{}"),
                         ("no_weights", json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                    "vocab_size": 10, "n_positions": 8, "n_ctx": 8}))):
        (root / name).mkdir()
        if config is not None:
            (root / name / "config.json").write_text(config)
        f[name] = str(root / name)
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_text("x")
    f["no_config"] = str(root / "no_config")
    from test_models import _save_tiny
    for kind in ("neox", "gpt2"):  # a parallel-block model (no resid_mid) and a plain one, both tiny and random
        _save_tiny(kind, root / kind)
        f[kind] = str(root / kind)
    for name, meta in (("run_ok", json.dumps({"command": "predict", "status": "complete"})), ("run_bad", "{oops")):
        (root / name).mkdir()
        (root / name / "meta.json").write_text(meta)
        (root / name / "result.json").write_text(json.dumps({"summary": {}}))
        f[name] = str(root / name)
    (root / "full").mkdir()
    (root / "full" / "keep").write_text("x")
    f["full"] = str(root / "full")
    return f


# (argv, a word of the expected message); "{name}" is replaced by the path of file `name` above
CASES = [
    # ---- options every model command shares (spread over the commands)
    (["predict", "--model", "gpt2-smal"], "unknown model"),
    (["dla", "--model", "no-such-model-xyz"], "unknown model"),
    (["logit-lens", "--model", "./nope"], "does not exist"),
    (["heads", "--model", "{no_config}"], "config.json"),
    (["predict", "--model", "{bad_config}"], "config.json"),
    (["patch", "--model", "{list_config}"], "config.json"),
    (["probe", "--model", "{empty_config}"], "config.json"),
    (["predict", "--model", "{no_weights}"], "weights"),
    (["predict", "--model", ""], "empty"),
    (["patch", "--component", "resid_mid", "--model", "{neox}"], "no resid_mid"),
    (["patch", "--component", "resid_pre,resid_mid", "--model", "{neox}"], "no resid_mid"),
    (["dla", "--answer", "zzqqxx", "--model", "{gpt2}"], "single token"),
    (["ablate", "--components", "mlp0.64", "--model", "{neox}"], "out of range"),
    (["predict", "--device", "mps"], "mps"),
    (["dla", "--device", "cuda"], "cuda"),
    (["heads", "--device", "cuda:1"], "cuda"),
    (["patch", "--device", "tpu"], "unknown device"),
    (["predict", "--device", ""], "device"),
    (["predict", "--dtype", "float7"], "dtype"),
    (["steer", "--dtype", "int8"], "dtype"),
    (["predict", "--backend", "jax"], "invalid choice"),
    (["predict", "--device-map", "auto", "--backend", "tl"], "nnsight"),
    (["predict", "--quantization", "8bit", "--backend", "tl"], "nnsight"),
    (["predict", "--max-memory", "lots", "--backend", "nnsight"], "max-memory"),
    (["predict", "--max-memory", ",", "--backend", "nnsight"], "max-memory"),
    (["predict", "--remote", "--backend", "bridge"], "nnsight"),
    (["predict", "--seed", "-1"], "seed"),
    (["probe", "--seed", HUGE], "seed"),
    (["heads", "--seed", "1.5"], "seed"),
    (["predict", "--seed", "abc"], "seed"),
    (["predict", "--out", "{a_file}"], "--out"),
    (["predict", "--out", "{dangling}"], "dangling"),
    (["predict", "--out", ""], "--out is empty"),
    (["dla", "--out", "{under_file}"], "--out"),
    (["predict", "--no-such-flag"], "unrecognized"),
    (["no-such-command"], "invalid choice"),
    # ---- prompt sets (--task / --prompts, shared by predict, logit-lens, dla, heads, ablate, steer, ...)
    (["dla", "--prompts", "{prompts_cut.json}"], "not JSON"),
    (["dla", "--prompts", "{list.json}"], "no prompts"),
    (["dla", "--prompts", "{prompts_missing_word.json}"], "not in the prompt"),
    (["dla", "--prompts", "{prompts_two_tokens.json}"], "single token"),
    (["dla", "--prompts", "{prompts_same.json}"], "same token"),
    (["dla", "--task", "ioi", "--n", "0"], "--n"),
    (["dla", "--task", "ioi", "--n", "1000000000"], "at most"),
    (["predict", "--prompts", "{prompts_numbers.json}"], "prompt"),
    (["predict", "--prompts", "{full}"], "not a file"),
    (["logit-lens", "--prompts", "{binary.dat}"], "cannot read"),
    (["heads", "--prompts", "{prompts_missing_word.json}", "--from", "X"], "not in the prompt"),
    (["heads", "--task", "ioi", "--from", "NOPE"], "named position"),
    (["probe", "--prompts", "{prompts_numbers.json}"], "prompt"),
    # ---- predict
    (["predict", "--prompt", ""], "empty"),
    (["predict", "--prompt", "   "], "empty"),
    (["predict", "--prompt", LONG], "context"),
    (["predict", "--prompt", "the cat", "--prompt", ""], "empty"),
    (["predict", "--top-k", "0"], "top-k"),
    (["predict", "--top-k", "-3"], "top-k"),
    (["predict", "--top-k", "100000"], "vocabulary"),
    (["predict", "--top-k", "two"], "invalid int"),
    # ---- logit-lens
    (["logit-lens", "--prompt", ""], "empty"),
    (["logit-lens", "--prompt", LONG], "context"),
    (["logit-lens", "--pos", "99"], "out of range"),
    (["logit-lens", "--pos", "-99"], "out of range"),
    (["logit-lens", "--target", "mary john"], "single token"),
    (["logit-lens", "--target", ""], "empty"),
    (["logit-lens", "--target", "zzqqxx"], "single token"),
    (["logit-lens", "--top-k", "0"], "top-k"),
    (["logit-lens", "--top-k", "100000"], "vocabulary"),
    (["logit-lens", "--pos", "nan"], "invalid int"),
    (["logit-lens", "--pos", "1" + "0" * 24], "out of range"),
    # ---- tuned-lens
    (["tuned-lens", "--lr", "nan"], "finite"),
    (["tuned-lens", "--lr", "inf"], "finite"),
    (["tuned-lens", "--lr", "-1"], "--lr"),
    (["tuned-lens", "--lr", "0"], "--lr"),
    (["tuned-lens", "--lr", "1e309"], "finite"),
    (["tuned-lens", "--steps", "0"], "--steps"),
    (["tuned-lens", "--batch-tokens", "0"], "--batch-tokens"),
    (["tuned-lens", "--seq-len", "1"], "--seq-len"),
    (["tuned-lens", "--seq-len", "100000"], "--seq-len"),
    (["tuned-lens", "--sentences", "5"], "--sentences"),
    (["tuned-lens", "--sentences", "1000000000"], "--sentences"),
    (["tuned-lens", "--batch-tokens", "1000000000000", "--steps", "1"], "out of memory"),
    (["tuned-lens", "--text-file", "{a_file}/nope.txt"], "does not exist"),
    (["tuned-lens", "--text-file", "{empty.txt}"], "rows"),
    (["tuned-lens", "--text-file", "{short.txt}"], "rows"),
    (["tuned-lens", "--text-file", "{short.txt}", "--held-out", "0"], "--held-out"),
    (["tuned-lens", "--text-file", "{short.txt}", "--held-out", "1"], "--held-out"),
    (["tuned-lens", "--held-out", "nan"], "finite"),
    (["tuned-lens", "--text-file", "{long.txt}", "--max-tokens", "-5"], "--max-tokens"),
    (["tuned-lens", "--text-file", "{long.txt}", "--max-tokens", "10"], "--max-tokens"),
    (["tuned-lens", "--prompt", "   "], "empty"),
    (["tuned-lens", "--prompt", LONG], "context"),
    # ---- dla
    (["dla", "--prompt", ""], "empty"),
    (["dla", "--prompt", LONG], "context"),
    (["dla", "--answer", "mary john"], "single token"),
    (["dla", "--answer", ""], "empty"),
    (["dla", "--prompt", IOI, "--answer", "mary", "--wrong", "mary"], "same token"),
    (["dla", "--prompt", IOI, "--answer", "mary", "--wrong", "zzqqxx"], "single token"),
    (["dla", "--prompt", IOI, "--wrong", "john"], "needs --answer"),
    (["dla", "--neurons", "-1"], "--neurons"),
    (["dla", "--top", "0"], "--top"),
    # ---- patch
    (["patch", "--clean", IOI], "--corrupted"),
    (["patch", "--clean", IOI, "--corrupted", "The capital of France is", "--answer", "mary", "--wrong", "john"],
     "same number of tokens"),
    (["patch", "--clean", IOI, "--corrupted", IOI_B, "--answer", "mary john", "--wrong", "john"], "single token"),
    (["patch", "--clean", "", "--corrupted", IOI_B, "--answer", "mary", "--wrong", "john"], "--corrupted"),
    (["patch", "--clean", LONG, "--corrupted", LONG, "--answer", "mary", "--wrong", "john"], "context"),
    (["patch", "--pairs", "{a_file}/nope.json"], "does not exist"),
    (["patch", "--pairs", "{not.json}"], "not JSON"),
    (["patch", "--pairs", "{binary.dat}"], "UTF-8"),
    (["patch", "--pairs", "{full}"], "directory"),
    (["patch", "--pairs", "{empty.json}"], "no prompt pairs"),
    (["patch", "--pairs", "{strings.json}"], "object"),
    (["patch", "--pairs", "{list.json}"], "no prompt pairs"),
    (["patch", "--pairs", "{number.json}"], "object"),
    (["patch", "--pairs", "{missing_keys.json}"], "lacks"),
    (["patch", "--pairs", "{diff_len.json}"], "same number of tokens"),
    (["patch", "--pairs", "{two_tokens.json}"], "single token"),
    (["patch", "--pairs", "{numeric_prompt.json}"], "text"),
    (["patch", "--pairs", "{empty_prompt.json}"], "empty"),
    (["patch", "--pairs", "{long_pair.json}"], "context"),
    (["patch", "--pairs", "{list.json}", "--clean", IOI], "not both"),
    (["patch", "--component", "nope"], "unknown component"),
    (["patch", "--component", ","], "unknown component"),
    (["patch", "--batch-size", "0"], "--batch-size"),
    (["patch", "--batch-size", "1" + "0" * 20], "--batch-size"),
    (["patch", "--metric", "accuracy"], "invalid choice"),
    (["patch", "--mode", "both"], "invalid choice"),
    # ---- attribution-patch
    (["attribution-patch", "--sites", "nope"], "unknown site"),
    (["attribution-patch", "--sites", ""], "unknown site"),
    (["attribution-patch", "--top-k", "0"], "top-k"),
    (["attribution-patch", "--clean", IOI], "--corrupted"),
    (["attribution-patch", "--pairs", "{not.json}"], "not JSON"),
    (["attribution-patch", "--pairs", "{diff_len.json}"], "same number of tokens"),
    (["attribution-patch", "--answer", "zzqqxx"], "single token"),
    (["attribution-patch", "--compare-exact", "maybe"], "invalid choice"),
    # ---- path-patch
    (["path-patch"], "--receivers"),
    (["discover", "--target", "1.5"], "(0, 1]"),
    (["discover", "--target", "0.5", "--edges", "3"], "not both"),
    (["discover", "--edges", "0"], "at least 1"),
    (["discover", "--edges", "99999"], "at most 262"),
    (["discover", "--steps", "0"], "--steps"),
    (["discover", "--check", "1"], "--check"),
    (["discover", "--task", "induction", "--n", "0"], "--n"),
    (["path-patch", "--receivers", "9.9"], "out of range"),
    (["path-patch", "--receivers", "1.9"], "out of range"),
    (["path-patch", "--receivers", "2.1:x"], "qkv"),
    (["path-patch", "--receivers", ""], "no receivers"),
    (["path-patch", "--receivers", "garbage"], "cannot read head"),
    (["path-patch", "--receivers", "1.0", "--senders", "2.0"], "before"),
    (["path-patch", "--receivers", "1.0", "--senders", "0.9"], "out of range"),
    (["path-patch", "--receivers", "2.1", "--senders", ""], "no heads"),
    (["path-patch", "--receivers", "logits", "--sweep", "receivers"], "--sweep"),
    (["path-patch", "--receivers", "1.2:k", "--task", "induction", "--n", "0"], "--n"),
    (["path-patch", "--receivers", "1.2:k", "--task", "induction", "--n", "1000000000"], "--n"),
    (["path-patch", "--receivers", "1.2:k", "--task", "induction", "--seq-len", "1"], "--seq-len"),
    (["path-patch", "--receivers", "1.2:k", "--task", "induction", "--seq-len", "1000"], "--seq-len"),
    (["path-patch", "--receivers", "logits", "--pairs", "{diff_len.json}"], "same number of tokens"),
    (["path-patch", "--receivers", "logits", "--clean", IOI], "--corrupted"),
    # ---- ablate
    (["ablate", "--components", "9.0"], "out of range"),
    (["ablate", "--components", "0.9"], "out of range"),
    (["ablate", "--components", "mlp9"], "out of range"),
    (["ablate", "--components", "mlp0.99999"], "out of range"),
    (["ablate", "--components", "nope"], "cannot read component"),
    (["ablate", "--components", ","], "no components"),
    (["ablate", "--method", "delete"], "--method"),
    (["ablate", "--method", ","], "--method"),
    (["ablate", "--n", "0"], "--n"),
    (["ablate", "--task", "ioi", "--n", "1000000000"], "--n"),
    (["ablate", "--seq-len", "1"], "--seq-len"),
    (["ablate", "--seq-len", "1000"], "--seq-len"),
    (["ablate", "--prompt", IOI], "--answer"),
    (["ablate", "--prompt", IOI, "--task", "ioi"], "one source of prompts"),
    (["ablate", "--prompt", IOI, "--answer", "mary", "--answer", "john", "--answer", "mary"], "one per prompt"),
    (["ablate", "--prompt", IOI, "--answer", "mary john"], "single token"),
    (["ablate", "--prompt", "", "--answer", "mary"], "empty"),
    (["ablate", "--prompt", IOI, "--answer", "mary", "--reference", "the cat", "--per-position"], "per-position"),
    (["ablate", "--reference", ""], "empty"),
    (["ablate", "--task", "sentiment"], "invalid choice"),
    # ---- heads
    (["heads", "--heads", "9.9"], "out of range"),
    (["heads", "--heads", "0.9"], "out of range"),
    (["heads", "--heads", "zz"], "cannot read head"),
    (["heads", "--heads", ","], "no heads"),
    (["heads", "--layer", "9"], "out of range"),
    (["heads", "--layer", "-9"], "out of range"),
    (["heads", "--layer", "1", "--heads", "1.2"], "not allowed"),
    (["heads", "--n-sequences", "0"], "--n-sequences"),
    (["heads", "--n-sequences", "1000000000"], "--n-sequences"),
    (["heads", "--seq-len", "1"], "--seq-len"),
    (["heads", "--seq-len", "1000"], "--seq-len"),
    (["heads", "--top-k", "0"], "--top-k"),
    (["heads", "--prompt", ""], "empty"),
    (["heads", "--prompt", LONG], "context"),
    # ---- circuits
    (["circuits", "--heads", "9.9"], "out of range"),
    (["circuits", "--tokens", ""], "--tokens"),
    (["circuits", "--tokens", ",,,"], "--tokens"),
    (["circuits", "--tokens", "mary john"], "single token"),
    (["circuits", "--tokens", "zzqqxx"], "single token"),
    (["circuits", "--top-k", "0"], "--top-k"),
    (["circuits", "--top-k", "100000"], "vocabulary"),
    (["circuits", "--baseline-seeds", "1"], "--baseline-seeds"),
    (["circuits", "--baseline-seeds", "1" + "0" * 20], "--baseline-seeds"),
    (["circuits", "--max-gb", "nan"], "finite"),
    (["circuits", "--max-gb", "-1"], "--max-gb"),
    (["circuits", "--heads", "1.2", "--save-full", "--max-gb", "1e-9"], "--max-gb"),
    (["circuits", "--embedding", "cooked"], "invalid choice"),
    # ---- probe
    (["probe", "--split", "nan,0.5,0.5"], "finite"),
    (["probe", "--split", "inf,0,0"], "finite"),
    (["probe", "--split", "0.5,0.5"], "--split"),
    (["probe", "--split", "a,b,c"], "--split"),
    (["probe", "--split", "0.9,0.9,-0.8"], "--split"),
    (["probe", "--l2", "nan"], "finite"),
    (["probe", "--l2", "-1"], "--l2"),
    (["probe", "--l2", ""], "--l2"),
    (["probe", "--n", "5"], "--n"),
    (["probe", "--n", "1000000000"], "--n"),
    (["probe", "--batch-size", "0"], "--batch-size"),
    (["probe", "--data", "{a_file}/nope.jsonl"], "does not exist"),
    (["probe", "--data", "{bad.jsonl}"], "not JSON"),
    (["probe", "--data", "{binary.dat}"], "UTF-8"),
    (["probe", "--data", "{binary.csv}"], "UTF-8"),
    (["probe", "--data", "{no_label.jsonl}"], "label"),
    (["probe", "--data", "{list_rows.jsonl}"], "label"),
    (["probe", "--data", "{blank.jsonl}"], "no examples"),
    (["probe", "--data", "{one_class.jsonl}"], "two or more labels"),
    (["probe", "--data", "{few.jsonl}"], "examples"),
    (["probe", "--data", "{bad_position.jsonl}"], "position"),
    (["probe", "--data", "{no_columns.csv}"], "prompt"),
    (["probe", "--position", "99"], "position"),
    (["probe", "--position", "-999"], "position"),
    (["probe", "--position", "zzqqxx"], "position"),
    (["probe", "--data", "{few.jsonl}", "--task", "sentiment"], "not allowed"),
    # ---- steer
    (["steer", "--strengths", "nan,inf"], "finite"),
    (["steer", "--strengths", "0,-inf"], "finite"),
    (["steer", "--strengths", "1e308"], "1e6"),
    (["steer", "--strengths", "1e309"], "finite"),
    (["steer", "--strengths", ""], "--strengths"),
    (["steer", "--strengths", "a,b"], "--strengths"),
    (["steer", "--strengths", ",".join(["1"] * 21)], "--strengths"),
    (["steer", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["steer", "--max-new-tokens", "100000"], "--max-new-tokens"),
    (["steer", "--layer", "9"], "out of range"),
    (["steer", "--from-position", "-1"], "--from-position"),
    (["steer", "--from-position", "999"], "--from-position"),
    (["steer", "--direction", "{a_file}/nope.pt"], "does not exist"),
    (["steer", "--direction", "{nan.pt}"], "finite"),
    (["steer", "--direction", "{inf.pt}"], "finite"),
    (["steer", "--direction", "{nan.npy}"], "finite"),
    (["steer", "--direction", "{shape.pt}"], "shape"),
    (["steer", "--direction", "{matrix.pt}"], "shape"),
    (["steer", "--direction", "{dict.pt}"], "shape"),
    (["steer", "--direction", "{garbage.pt}"], "cannot read"),
    (["steer", "--direction", "{zero.pt}"], "zero"),
    (["steer", "--positive-words", "zzqqxx,qqzzyy"], "single token"),
    (["steer", "--prompt", ""], "empty"),
    (["steer", "--prompt", "the " * 120], "context"),
    (["steer", "--positive", ""], "--negative"),
    (["steer", "--positive", "", "--negative", "i hate this !"], "contrast prompts"),  # "" is in every prompt
    (["steer", "--positive", "i love this !", "--negative", "i love this !"], "zero"),
    (["steer", "--vector-position", "first"], "invalid choice"),
    # ---- validate-circuit
    (["validate-circuit"], "--circuit"),
    (["validate-circuit", "--circuit", "9.9"], "out of range"),
    (["validate-circuit", "--circuit", "nope"], "cannot read component"),
    (["validate-circuit", "--circuit", "0.1", "--random", "-1"], "--random"),
    (["validate-circuit", "--circuit", "0.1", "--random", "1000000"], "--random"),
    (["validate-circuit", "--circuit", "0.1", "--method", "delete"], "invalid choice"),
    (["validate-circuit", "--circuit", "0.1", "--n", "0"], "--n"),
    (["validate-circuit", "--circuit", "0.1", "--prompt", IOI], "--answer"),
    (["validate-circuit", "--circuit", "0.1", "--seq-len", "1000"], "--seq-len"),
    # ---- model-card
    (["model-card", "--model", "gpt2-smal"], "unknown model"),
    (["model-card", "--seed", "-5"], "seed"),
    (["model-card", "--out", "{a_file}"], "--out"),
    (["model-card", "--device", "mps"], "mps"),
    # ---- detect (no run directory)
    (["detect", "--params", "nan"], "--params"),
    (["detect", "--params", "inf"], "--params"),
    (["detect", "--params", "-5"], "--params"),
    (["detect", "--params", "12"], "million"),
    (["detect", "--model", "gpt2-smal"], "unknown model"),
    (["detect", "--model", "{bad_config}"], "config.json"),
    (["detect", "--model", "x", "--params", "7B"], "not allowed"),
    # ---- new (no run directory)
    (["new", "{full}"], "already exists"),
    (["new", "{a_file}"], "already exists"),
    (["new"], "required"),
    # ---- report (no run directory; writes one HTML file)
    (["report"], "required"),
    (["report", "{a_file}/nope"], "does not exist"),
    (["report", "{a_file}"], "not a directory"),
    (["report", "{full}"], "not a run directory"),
    (["report", "{run_bad}"], "not valid JSON"),
    (["report", "{run_ok}", "--out", "{full}"], "is a directory"),
    (["report", "{run_ok}", "--out", "{a_file}"], "not a mechscope report"),
    (["report", "{run_ok}", "--out", "{under_file}/page.html"], "not a directory"),
    # ---- SAE commands (SAEs that do not fit the model: tests/test_sae_cli.py)
    (["sae-eval", "--sae", "/no/such/sae"], "does not exist"),
    (["sae-eval", "--n-tokens", "0"], "--n-tokens must be"),
    (["sae-features", "--features", "99999"], "out of range"),
    (["sae-features", "--prompt", ""], "empty"),
    (["sae-steer", "--feature", "3", "--strengths", "nan,1"], "finite"),
    (["sae-steer", "--feature", "3", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sae-ablate", "--prompt", "the capital of france is"], "needs --answer"),
    (["sae-ablate", "--features", "3", "--positions", "99"], "--positions must be"),
    (["sae-train", "--lr", "nan"], "positive finite"),
    (["sae-train", "--hook", "blocks.7.hook_resid_pre"], "blocks.7.hook_resid_pre"),
]

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("hostile"))


@pytest.fixture()
def shared_engine(monkeypatch, toy_engine):
    reuse_engine(monkeypatch, toy_engine)


def _argv(argv, files):
    return [re.sub(r"\{([\w.]+)\}", lambda m: files[m.group(1)], a) for a in argv]


def _id(case):
    argv, _ = case
    return " ".join(a if len(a) < 24 else a[:20] + "..." for a in argv)


@pytest.mark.parametrize("argv, message", CASES, ids=[_id(c) for c in CASES])
def test_hostile_input_is_refused(argv, message, files, tmp_path, shared_engine):
    assert_refused(_argv(argv, files), message, tmp_path)


# through a real process: the real exit code, and any library warning printed on the way counts as a line
SUBPROCESS_CASES = [
    (["predict", "--device", "mps"], "mps"),
    (["predict", "--model", "{bad_config}"], "not JSON"),
    (["steer", "--strengths", "nan,inf"], "finite"),
    pytest.param(["dla", "--answer", "zzqqxx"], "single token", marks=pytest.mark.slow),  # loads the model: ~7 s
]


@pytest.mark.parametrize("argv, message", SUBPROCESS_CASES)
def test_hostile_input_is_refused_by_the_process(argv, message, files, tmp_path):
    refused_by_subprocess(_argv(argv, files), message, tmp_path)


def test_the_table_covers_every_command_and_is_large():
    assert len(CASES) >= 150
    covered = {argv[0] for argv, _ in CASES}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered
