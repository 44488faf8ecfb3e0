"""`mechscope detect`: the memory arithmetic (by hand, against transformer-lens's real cache, against the
measured peak RSS), model shapes (against parameter counts of real models), recommendations for injected
hardware, and the CLI."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mechscope import compute
from mechscope.cli import main
from mechscope.compute import GB, Gpu, Hardware, ModelShape, count_params, estimate_memory, recommend

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelShape("tiny", n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=6, n_params=0)


def test_estimate_by_hand_for_a_tiny_config():
    """Every cached hook of a 2-layer model, d_model 8, 2 heads of 4, d_mlp 16, vocab 10; batch 2 x 3 tokens, fp32."""
    s = 3
    per_layer = {"resid_mid": 8, "resid_post": 8, "attn_out": 8, "mlp_out": 8,
                 "ln1.hook_normalized": 8, "ln1.hook_scale": 1, "ln2.hook_normalized": 8, "ln2.hook_scale": 1,
                 "q": 2 * 4, "k": 2 * 4, "v": 2 * 4, "z": 2 * 4, "attn_scores": 2 * s, "pattern": 2 * s,
                 "mlp.hook_pre": 16, "mlp.hook_post": 16}                        # elements per position: 126
    once = {"hook_embed": 8, "hook_pos_embed": 8, "blocks.0.hook_resid_pre": 8,
            "ln_final.hook_normalized": 8, "ln_final.hook_scale": 1, "logits": 10}  # 43
    positions = 2 * s
    est = estimate_memory(TINY, seq_len=s, batch=2, dtype_bytes=4)
    assert sum(per_layer.values()) == 126 and sum(once.values()) == 43
    assert est.cache == positions * (2 * 126 + 43) * 4 == 7080
    assert est.logits == positions * 10 * 4
    # working set: max(W_U copy 8*10, softmax temporaries 2*2*3*3*(2*4+1) bytes, gelu_new 3 * [6, 16])
    assert est.working == max(8 * 10 * 4, 2 * 2 * 3 * 3 * 9, 3 * positions * 16 * 4) == 1152
    # weights: 2 layers x (W_Q W_K W_V W_O 4*8*8 + b_Q b_K b_V 3*8 + b_O 8 + W_in W_out 2*8*16 + b_in 16
    # + b_out 8 + 2 LayerNorms 4*8) + W_E 80 + W_pos 48 + W_U 80 + b_U 10 + ln_final 16
    assert count_params(TINY) == 2 * (256 + 24 + 8 + 256 + 16 + 8 + 32) + 80 + 48 + 80 + 10 + 16 == 1434
    assert est.weights == 1434 * 4 and est.total == est.weights + est.cache + est.working


def _distinct_cache_bytes(cache) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.values()}.values())


@pytest.mark.parametrize("kind", ["gpt2-like fp32", "llama-like bf16"])
def test_cache_estimate_equals_transformer_lens_cache(kind):
    """The cache term is exactly the bytes of the distinct tensors run_with_cache returns (all hooks)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if kind == "gpt2-like fp32":
        cfg = dict(act_fn="gelu_new", normalization_type="LNPre", d_mlp=256)
        shape, dtype = ModelShape("a", 2, 64, 4, 16, 256, 500, 64, 0), torch.float32
    else:
        cfg = dict(act_fn="silu", normalization_type="RMSPre", d_mlp=192, positional_embedding_type="rotary",
                   rotary_dim=16, gated_mlp=True, n_key_value_heads=2)
        shape = ModelShape("b", 2, 64, 4, 16, 192, 500, 64, 0, n_kv_heads=2, gated_mlp=True, rotary=True, act_fn="silu")
        dtype = torch.bfloat16
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=500,
                                                      n_ctx=64, dtype=dtype, device="cpu", **cfg))
    with torch.no_grad():
        logits, cache = model.run_with_cache(torch.randint(1, 500, (3, 20)))
    est = estimate_memory(shape, seq_len=20, batch=3, dtype_bytes=logits.element_size())
    assert est.cache == _distinct_cache_bytes(cache)
    assert est.logits == logits.numel() * logits.element_size()
    unfolded = {"LNPre": "LN", "RMSPre": "LN"}[cfg.pop("normalization_type")]
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=500,
                                                      n_ctx=64, normalization_type=unfolded, **cfg))
    assert count_params(shape) == sum(p.numel() for p in model.parameters())


def test_bundled_shape_counts_the_real_parameters(toy_model_unfolded):
    shape = compute.model_shape("mechscope-toy")
    assert shape.d_vocab == toy_model_unfolded.cfg.d_vocab
    assert shape.n_params == count_params(shape) == sum(p.numel() for p in toy_model_unfolded.parameters())


def test_common_model_table_agrees_with_published_counts():
    """The hard-coded shapes reproduce the published parameter counts (Hugging Face layout) within 0.1%."""
    for shape in compute.COMMON_MODELS.values():
        assert count_params(shape, transformer_lens=False) == pytest.approx(shape.n_params, rel=1e-3), shape.name
    llama = compute.COMMON_MODELS["llama-3-8b"]  # untied: transformer-lens adds only zero biases
    assert count_params(llama) == pytest.approx(llama.n_params, rel=1e-3)
    gemma = compute.COMMON_MODELS["gemma-2-2b"]  # tied: transformer-lens keeps its own W_U copy
    assert count_params(gemma) - gemma.n_params == pytest.approx(gemma.d_vocab * gemma.d_model, rel=1e-2)


def test_local_hf_directory_shape(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    configs = [GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, n_ctx=64),
               LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=80, vocab_size=100, max_position_embeddings=64)]
    for i, config in enumerate(configs):
        d = tmp_path / str(i)
        config.save_pretrained(d)
        shape = compute.model_shape(str(d))
        hf = AutoModelForCausalLM.from_config(config)
        exact = sum(p.numel() for p in hf.parameters())
        assert (shape.n_layers, shape.d_model, shape.n_heads, shape.d_head) == (2, 32, 4, 8)
        assert shape.n_params == pytest.approx(exact, rel=0.03)  # config only: biases / norms approximated
        hf.save_pretrained(d)
        assert compute.model_shape(str(d)).n_params == exact      # safetensors headers: exact
    assert shape.gated_mlp and shape.rotary and shape.n_kv_heads == 2 and not shape.tied_embeddings


def test_generic_shape_and_parse_count():
    assert compute.parse_count("7e9") == compute.parse_count("7B") == 7_000_000_000
    assert compute.parse_count("124m") == 124_000_000
    shape = compute.generic_shape(7_000_000_000)
    assert (shape.n_layers, shape.d_model, shape.d_mlp) == (32, 4096, 11008)  # the Llama-2-7B shape
    assert count_params(shape, transformer_lens=False) == pytest.approx(7e9, rel=0.05)


H100 = Gpu("NVIDIA H100 80GB HBM3", 80 * 10**9, 79 * 10**9, (9, 0), bf16=True)
V100 = Gpu("Tesla V100-SXM2-32GB", 32 * 10**9, 31 * 10**9, (7, 0), bf16=False)


def _cpu(gb: float, gpus=(), mps=False) -> Hardware:
    return Hardware(cpu_cores=8, ram_total_bytes=int(gb * GB), ram_available_bytes=int(gb * GB * 0.9),
                    gpus=list(gpus), mps=mps)


def test_recommend_7b_without_gpu_on_16gb_does_not_fit():
    for shape in [compute.generic_shape(7_000_000_000), compute.COMMON_MODELS["llama-3-8b"]]:
        r = recommend(shape, _cpu(16))
        assert (r.library, r.device, r.dtype, r.fits, r.cache_fits) == ("nnsight", "ndif-remote", "bfloat16",
                                                                       False, False)
        assert r.memory_gb["weights"] == pytest.approx(shape.n_params * 2 / GB, abs=1e-3)
        assert any("remote=True" in n for n in r.notes)


def test_recommend_8b_on_h100_is_nnsight_bf16_and_fits():
    r = recommend(compute.COMMON_MODELS["llama-3-8b"], _cpu(128, [H100]), seq_len=128, batch=8)
    assert (r.library, r.device, r.dtype, r.fits, r.cache_fits) == ("nnsight", "cuda", "bfloat16", True, True)
    assert 16 < r.memory_gb["total"] < 0.85 * 79


def test_recommend_gpt2_small_on_24gb_cpu_is_transformer_lens_fp32():
    r = recommend(compute.COMMON_MODELS["gpt2-small"], _cpu(24))
    assert (r.library, r.device, r.dtype, r.fits, r.cache_fits) == ("transformer-lens", "cpu", "float32", True, True)
    assert r.memory_gb["weights"] == pytest.approx(163_087_441 * 4 / GB, abs=1e-3)  # transformer-lens unties W_U


def test_recommend_dtype_device_and_fallbacks():
    assert recommend(compute.COMMON_MODELS["pythia-6.9b"], _cpu(64, [V100])).dtype == "float16"  # no bf16 on sm 7.0
    assert recommend(compute.COMMON_MODELS["gpt2-small"], _cpu(64, [H100])).dtype == "float32"   # small: fp32
    assert recommend(compute.COMMON_MODELS["gpt2-xl"], _cpu(64, mps=True)).device == "mps"
    big = recommend(compute.COMMON_MODELS["gpt2-xl"], _cpu(64, [H100]), seq_len=1024, batch=64)
    assert (big.device, big.fits, big.cache_fits) == ("cuda", True, False)  # stays on the GPU, caches less
    assert any("names_filter" in n for n in big.notes)
    llama_70b = compute.COMMON_MODELS["llama-3-70b"]  # 141 GB in bfloat16
    assert recommend(llama_70b, _cpu(128, [H100] * 2)).device == "ndif-remote"
    assert recommend(llama_70b, _cpu(256, [H100])).device == "cpu"  # slow, but it fits in RAM
    multi = recommend(llama_70b, _cpu(256, [H100] * 4))  # several GPUs before the CPU
    assert (multi.library, multi.device, multi.dtype, multi.fits) == ("nnsight", "multi-gpu", "bfloat16", True)


def test_detect_hardware_on_this_machine():
    hw = compute.detect_hardware()
    meminfo = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
    assert hw.cpu_cores == len(os.sched_getaffinity(0))
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes <= meminfo["MemTotal"]
    assert len(hw.gpus) == (torch.cuda.device_count() if compute._may_have_accelerator() else 0)


def test_cli_detect_bundled_model_json(capsys):
    assert main(["detect", "--model", "mechscope-toy", "--seq-len", "64", "--batch", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["summary"]["recommendation"]
    assert out["run_dir"] is None and out["summary"]["hardware"]["cpu_cores"] >= 1
    assert (r["library"], r["dtype"], r["cache_fits"]) == ("transformer-lens", "float32", True)
    est = estimate_memory(compute.model_shape("mechscope-toy"), 64, 4, 4)
    assert r["memory_gb"]["total"] == round(est.total / GB, 3)


def test_cli_detect_table_and_text(capsys):
    assert main(["detect", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["summary"]["models"]
    assert [r["model"] for r in rows] == ["mechscope-toy", *compute.COMMON_MODELS]
    assert main(["detect", "--model", "gpt2"]) == 0
    text = capsys.readouterr().out
    assert "gpt2-small" in text and "run_with_cache" in text and "hardware:" in text


@pytest.mark.parametrize("argv", [["--params", "lots"], ["--params", "10"], ["--model", "/no/such/dir"],
                                  ["--seq-len", "0"], ["--model", "gpt2-small", "--params", "7e9"],
                                  ["--model", "gpt2-smal"]])
def test_cli_detect_bad_input(argv, capsys):
    try:
        code = main(["detect", *argv])
    except SystemExit as e:  # argparse errors exit from the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_script_prints_one_json_object_fast():
    started = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "detect_compute.py"), "--json"],
                         capture_output=True, text=True, check=True)
    assert time.time() - started < 5
    assert json.loads(out.stdout)["summary"]["models"][0]["model"] == "mechscope-toy"


# The measured peak: a fresh interpreter per size builds a random-weight model, resets the kernel's
# peak-RSS counter (/proc/self/clear_refs 5) and runs run_with_cache under no_grad.
MEASURE = r"""
import gc, json, sys, torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
torch.set_num_threads(2); torch.set_grad_enabled(False)
def kb(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
cfg, seq, batch = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
before = kb("VmRSS")
model = HookedTransformer(HookedTransformerConfig(**cfg, init_weights=False, device="cpu")).eval()
for p in model.parameters():
    p.normal_(0, 0.02)
model(torch.zeros(1, 2, dtype=torch.long)); gc.collect()  # kernels and thread pools warmed up
open("/proc/self/clear_refs", "w").write("5")
logits, cache = model.run_with_cache(torch.randint(1, cfg["d_vocab"], (batch, seq)))
print(kb("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_estimate_within_20_percent_of_measured_peak_rss():
    """~90 s on 2 shared cores. Run: pytest tests/test_compute.py -m slow -s"""
    sizes = [(4, 512, 8, 2048, 256, 4), (8, 768, 12, 3072, 256, 4), (12, 1024, 16, 4096, 256, 2)]
    for n_layers, d_model, n_heads, d_mlp, seq, batch in sizes:
        cfg = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=64, d_mlp=d_mlp, d_vocab=50257,
                   n_ctx=1024, act_fn="gelu_new", normalization_type="LNPre")
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", MEASURE, json.dumps(cfg), str(seq), str(batch)],
                             capture_output=True, text=True, check=True)
        measured = int(out.stdout.split()[-1])
        shape = ModelShape("m", n_layers, d_model, n_heads, 64, d_mlp, 50257, 1024, 0)
        est = estimate_memory(shape, seq, batch, 4)
        print(f"{count_params(shape) / 1e6:.0f}M params, {batch}x{seq}: estimate {est.total / 1e6:.0f} MB, "
              f"measured {measured / 1e6:.0f} MB, ratio {est.total / measured:.3f}")
        assert 0.8 <= est.total / measured <= 1.2
