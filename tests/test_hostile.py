"""Hostile input, every command: each case is refused with exit 2, one stderr line naming the problem, no
traceback, nothing on stdout, and no run directory left behind (tests/hostile.py). In-process on the bundled
model (one shared load); a few cases through a real process for the exit code and stray warnings."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import assert_refused, refused_by_subprocess, reuse_engine, run_cli
from mechscope.cli import COMMANDS

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_B = "When Mary and John went to the store, Mary gave a drink to"
LONG = "the " * 200
HUGE = str(2 ** 64)


def _files(root, toy_engine):
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
    # ---- issue 16
    put("same_pair.json", json.dumps([{"clean": IOI, "corrupted": IOI_B, "answer": "mary", "wrong": "mary"}]))
    put("many_prompts.json", json.dumps(["the cat"] * 100_001))
    np.save(root / "float_ids.npy", np.random.default_rng(0).random(500).astype(np.float32))
    f["float_ids.npy"] = str(root / "float_ids.npy")
    for name, change in (("negative_layers", {"n_layer": -2}), ("huge_width", {"n_embd": 1e30}),
                         ("bool_heads", {"n_head": True})):
        (root / name).mkdir()
        config = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 320, "n_positions": 64}
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        f[name] = str(root / name)
    for name, edit in (("truncated", "cut"), ("bad_values", "heads")):
        shutil.copytree(root / "neox", root / name)
        if edit == "cut":  # a copy that did not finish
            weights = root / name / "model.safetensors"
            os.truncate(weights, weights.stat().st_size // 2)
        else:  # 5 heads do not divide a width of 32: transformers' own validation refuses it
            config = json.loads((root / name / "config.json").read_text())
            (root / name / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
        f[name] = str(root / name)
    for name, d_sae, files in (("checkpoint_other", 64, "all"), ("checkpoint_partial", 1024, "cfg")):
        (root / name).mkdir()
        (root / name / "cfg.json").write_text(json.dumps({"d_sae": d_sae, "d_in": 128, "metadata": {
            "hook_name": "blocks.1.hook_resid_pre", "training_architecture": "topk", "model_name": "mechscope-toy"}}))
        if files == "all":
            for other in ("sae_weights.safetensors", "trainer_state.pt", "activations_store_state.safetensors"):
                (root / name / other).write_text("x")
        f[name] = str(root / name)
    from test_sae import random_sae
    sae = random_sae(toy_engine)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    sae.save_model(root / "nan_sae")
    f["nan_sae"] = str(root / "nan_sae")
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
    # ---- issue 16: 1. an existing SAE is never overwritten (refused before the model loads, before training)
    (["sae-train", "--save-to", "{full}"], "not empty"),
    (["sae-train", "--save-to", "{a_file}"], "is a file"),
    (["sae-train", "--save-to", "{a_file}/sae"], "not a writable directory"),
    # 5. answer == wrong: a logit difference of 0 by definition, in every command that takes both
    (["patch", "--clean", IOI, "--corrupted", IOI_B, "--answer", "mary", "--wrong", "mary"], "same token"),
    (["patch", "--answer", "mary", "--wrong", "mary"], "same token"),
    (["patch", "--pairs", "{same_pair.json}"], "same token"),
    (["path-patch", "--receivers", "logits", "--answer", "john", "--wrong", "john"], "same token"),
    (["attribution-patch", "--answer", "mary", "--wrong", "mary"], "same token"),
    (["sae-ablate", "--prompt", IOI, "--answer", "mary", "--wrong", "mary"], "same token"),
    (["ablate", "--prompt", IOI, "--answer", "mary", "--wrong", "mary", "--method", "zero"], "same token"),
    # 6. garbage that used to be accepted with exit 0
    (["sae-eval", "--sae", "{nan_sae}"], "NaN"),
    (["sae-features", "--sae", "{nan_sae}"], "NaN"),
    (["sae-steer", "--sae", "{nan_sae}", "--feature", "3", "--prompt", "the cat", "--target-words", "paris"], "NaN"),
    (["detect", "--model", "{negative_layers}"], "n_layer"),
    (["detect", "--model", "{huge_width}"], "n_embd"),
    (["detect", "--model", "{bool_heads}"], "n_head"),
    (["detect", "--params", "1e30"], "100T"),
    (["detect", "--model", "mechscope-toy", "--seq-len", "100000"], "context"),
    (["detect", "--model", "gpt2-small", "--seq-len", "2048"], "context"),
    (["detect", "--params", "7B", "--batch", "100000000000"], "--batch"),
    # 8. options that were silently ignored or bypassed
    (["sae-ablate", "--positions", "999"], "--positions"),
    (["sae-ablate", "--positions", "nope"], "--positions"),
    (["sae-ablate", "--answer", "mary john"], "--answer goes with --prompt"),
    (["sae-eval", "--context", "0"], "--context"),
    (["sae-train", "--context", "0"], "--context"),
    (["heads", "--layer", "-1"], "out of range"),
    (["steer", "--layer", "-1"], "out of range"),
    (["heads", "--heads", ""], "no heads"),
    (["circuits", "--heads", ""], "no heads"),
    (["sae-features", "--features", ""], "no features"),
    (["sae-ablate", "--features", ""], "no features"),
    (["steer", "--positive-words", ""], "--positive-words is empty"),
    (["steer", "--negative-words", ","], "--negative-words is empty"),
    (["sae-steer", "--target-words", ""], "--target-words is empty"),
    (["attribution-patch", "--atp-star", "--sites", "resid"], "qkv"),
    (["heads", "--from", "END"], "prompt set"),
    (["predict", "--max-memory", "0=1GiB", "--backend", "nnsight"], "--device-map"),
    (["path-patch", "--receivers", "2.1", "--senders", "0.0,0.0"], "twice"),
    (["circuits", "--heads", "1.2,L1H2"], "twice"),
    (["ablate", "--components", "2.1,heads"], "twice"),
    (["predict", "--prompts", "{many_prompts.json}"], "at most 100000"),
    # 9. user / environment mistakes that ended in exit 1
    (["detect", "--params", "1e400"], "--params"),
    (["detect", "--params", "1.2.3"], "not a count"),
    (["new", "/proc/mechscope-test"], "cannot"),
    (["predict", "--device-map", "bogus", "--backend", "nnsight"], "--device-map"),
    (["sae-steer", "--controls", "0"], "--controls"),
    (["predict", "--model", "{truncated}"], "cut short"),
    (["predict", "--model", "{bad_values}"], "divisible"),
    (["sae-train", "--resume", "{checkpoint_other}"], "--d-sae 1024 (the checkpoint has 64)"),
    (["sae-train", "--resume", "{checkpoint_partial}"], "not a whole checkpoint"),
    # 11. messages that named the wrong cause
    (["steer", "--direction", "{zero.pt}"], "--direction"),
    (["sae-eval", "--data", "{float_ids.npy}"], "whole numbers"),
]

@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_engine):
    return _files(tmp_path_factory.mktemp("hostile"), toy_engine)


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


# ---------------------------------------------------------------- issue 16: hostile input beyond one refusal line
def _no_run_left(runs):
    assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())


def test_circuits_max_gb_message_shows_the_real_sizes(files, tmp_path, shared_engine):
    line = assert_refused(["circuits", "--heads", "1.2", "--save-full", "--max-gb", "0.000001"], "--max-gb", tmp_path)
    assert "0.00 GB" not in line and "--max-gb 1e-06" in line, line


def test_report_follows_no_link_out_of_the_run_and_embeds_only_real_pngs(tmp_path):
    import base64

    from mechscope.report import write_report

    outside = tmp_path / "secret"
    outside.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"secret-image-bytes"
    (outside / "private.png").write_bytes(png)
    (outside / "private.csv").write_text("password,hunter2\n")
    run = tmp_path / "runs" / "predict-1"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({"command": "predict", "status": "complete"}))
    (run / "result.json").write_text(json.dumps({"summary": {"note": "bell\x07 escape\x1b[31m red"}}))
    (run / "plot.png").symlink_to(outside / "private.png")
    (run / "data.csv").symlink_to(outside / "private.csv")
    (run / "fake.png").write_text("<script>not a png</script>")
    (run / "real.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"own-image")
    (run / "inner.csv").write_text("a\n")
    (run / "inner_link.csv").symlink_to(run / "inner.csv")       # a link inside the run is its own file
    page, _ = write_report([str(run)], str(tmp_path / "page.html"))
    text = page.read_text()
    assert base64.b64encode(png).decode() not in text and "private" not in text and "plot.png" not in text
    assert "data.csv" not in text
    assert base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"own-image").decode() in text      # a real PNG is embedded
    assert 'alt="fake.png"' not in text and 'href="runs/predict-1/fake.png"' in text    # a fake one only linked
    assert "inner_link.csv" in text
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", text) and "bell\\x07 escape\\x1b[31m" in text


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_a_closed_stdout_leaves_a_complete_run_and_exit_0(tmp_path, unbuffered):
    """`mechscope predict --json | true`: the reader is gone before the result is printed. Main at c14c93b: exit 1
    and meta.json "failed" (BrokenPipeError) for a run whose result.json was written (unbuffered stdout), or
    exit 120 with "Exception ignored" on stderr (buffered)."""
    from hostile import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("MECHSCOPE_DEBUG", None)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    script = (f'"{sys.executable}" -m mechscope predict --json --out "{tmp_path}" | true; '
              f'echo "exit=${{PIPESTATUS[0]}}" >&2')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "exit=0" in proc.stderr and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, \
        proc.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "complete"
    assert (run_dir / "result.json").exists()


def test_a_full_disk_is_exit_2_and_leaves_no_run_directory(tmp_path, monkeypatch, shared_engine):
    import errno

    from mechscope import runs

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(runs, "write_atomic", full)
    out = tmp_path / "new" / "runs"
    code, stdout, err = run_cli(["predict", "--out", str(out)])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert not (tmp_path / "new").exists()       # neither the run directory nor the --out folders made for it


def test_two_new_racing_for_one_path_is_exit_2(tmp_path, monkeypatch):
    from mechscope import scaffold

    target = tmp_path / "study"
    rename = os.rename

    def other_process_first(src, dst):  # another `mechscope new study` finishes between the check and the rename
        Path(dst).mkdir()
        (Path(dst) / "README.md").write_text("theirs")
        rename(src, dst)
    monkeypatch.setattr(scaffold.os, "rename", other_process_first)
    code, out, err = run_cli(["new", str(target)])
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1, err
    assert (target / "README.md").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["study"]     # no staging folder left


def test_tuned_lens_that_diverges_is_refused_and_writes_nothing(tmp_path, shared_engine):
    """--lr 1e30: the loss climbs (Adam's steps are lr-sized) yet stays finite. Main at c14c93b: exit 0 with a lens
    worse than the logit lens it starts from."""
    runs = tmp_path / "runs"
    code, out, err = run_cli(["tuned-lens", "--lr", "1e30", "--steps", "20", "--sentences", "30", "--out", str(runs)])
    assert code == 2 and "diverged" in err and len(err.strip().splitlines()) == 1, err
    _no_run_left(runs)


def test_tuned_lens_files_follow_the_umask(tmp_path, shared_engine):
    old = os.umask(0o022)
    try:
        code, out, err = run_cli(["tuned-lens", "--steps", "10", "--sentences", "30", "--out", str(tmp_path), "--json"])
    finally:
        os.umask(old)
    assert code == 0, err
    run_dir = Path(json.loads(out)["run_dir"])
    assert stat.S_IMODE((run_dir / "translators.safetensors").stat().st_mode) == 0o644


SAE_SMALL = ["--training-tokens", "16384", "--batch-tokens", "1024", "--n-tokens", "6000", "--context", "32",
             "--d-sae", "64", "--k", "4", "--eval-tokens", "1000"]


def test_sae_train_final_is_the_last_step_files_follow_the_umask_and_save_to_never_overwrites(tmp_path, shared_engine):
    """16 steps with the default --log-every 25. Main at c14c93b: "final" was step 1, sae_weights.safetensors and
    sparsity.safetensors were 0600, and a second --save-to into the same directory overwrote the first SAE."""
    target = tmp_path / "saved"
    old = os.umask(0o022)
    try:
        code, out, err = run_cli(["sae-train", *SAE_SMALL, "--save-to", str(target), "--out", str(tmp_path / "runs"),
                                  "--json"])
    finally:
        os.umask(old)
    assert code == 0, err[-2000:]
    printed = json.loads(out)
    assert printed["summary"]["final"]["step"] == 16 and printed["summary"]["final"]["tokens"] == 16384
    sae_dir = Path(printed["run_dir"]) / "sae"
    for name in ("sae_weights.safetensors", "sparsity.safetensors", "cfg.json"):
        assert stat.S_IMODE((sae_dir / name).stat().st_mode) == 0o644, name
    saved = (target / "sae_weights.safetensors").read_bytes()
    assert_refused(["sae-train", *SAE_SMALL, "--save-to", str(target)], "not empty", tmp_path / "again")
    assert (target / "sae_weights.safetensors").read_bytes() == saved


def test_sae_train_that_diverges_is_refused_and_leaves_no_run(tmp_path, shared_engine):
    runs = tmp_path / "runs"
    code, out, err = run_cli(["sae-train", *SAE_SMALL, "--lr", "1e30", "--out", str(runs)])
    assert code == 2 and out == "" and "mechscope sae-train: error: training diverged" in err, err[-2000:]
    assert "Traceback" not in err
    _no_run_left(runs)


def test_an_interrupted_checkpoint_is_never_left_half_written(tmp_path):
    """sae-lens writes a checkpoint file by file into its final folder; an interruption mid-way must leave no
    checkpoint folder (a resume from half a checkpoint fails or silently restarts)."""
    from sae_lens.training.sae_trainer import SAETrainer

    from mechscope.techniques.sae_training import _atomic_checkpoints

    def save(self, checkpoint_name, base_path=None, wandb_aliases=None):  # sae-lens's save, killed half-way
        folder = Path(base_path) / checkpoint_name
        folder.mkdir(parents=True)
        (folder / "sae_weights.safetensors").write_text("x")
        raise KeyboardInterrupt
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(checkpoint_path=str(tmp_path / "checkpoints")))
    original = SAETrainer.save_checkpoint
    SAETrainer.save_checkpoint = save
    try:
        with _atomic_checkpoints(), pytest.raises(KeyboardInterrupt):
            SAETrainer.save_checkpoint(trainer, "5120")
    finally:
        SAETrainer.save_checkpoint = original
    assert list((tmp_path / "checkpoints").iterdir()) == []


SAE_TRAIN_LONG = ["sae-train", "--training-tokens", "2560000", "--batch-tokens", "256", "--n-tokens", "6000",
                  "--context", "32", "--d-sae", "64", "--k", "4", "--log-every", "1", "--checkpoints", "100"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sae_train_killed_midway_is_interrupted_with_whole_checkpoints(tmp_path, signum, code):
    """Main at c14c93b: sae-lens's own handlers turned both signals into an exception -> exit 1, status "failed"."""
    from hostile import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    env.pop("MECHSCOPE_DEBUG", None)
    # as in a foreground process: a job started by a non-interactive shell may ignore SIGINT
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from mechscope.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, *SAE_TRAIN_LONG, "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:  # wait until training is under way and a checkpoint (every 100 steps) is written
            if "step 150 " in line:
                break
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "mechscope sae-train: interrupted" in err, err[-2000:]  # sae-lens's progress bar may close after it
    (run_dir,) = tmp_path.iterdir()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == signal.Signals(signum).name
    folders = list((run_dir / "sae" / "checkpoints").glob("*/*"))
    assert folders, "no checkpoint was written before the signal (one is due every 100 steps)"
    for folder in folders:
        assert not folder.name.startswith("."), f"a half-written checkpoint was left: {folder}"
        assert {"cfg.json", "sae_weights.safetensors", "trainer_state.pt"} <= {p.name for p in folder.iterdir()}
