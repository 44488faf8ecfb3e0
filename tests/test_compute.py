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

from mechscope import compute, models
from mechscope.cli import build_parser, main
from mechscope.compute import GB, Gpu, Hardware, ModelShape, count_params, estimate_memory, recommend
from mechscope.errors import BadInput

needs_hooked = pytest.mark.skipif(not models._hooked_transformer_available(),
                                  reason="transformer-lens 4 has no HookedTransformer")

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


@needs_hooked
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


@needs_hooked
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
        assert r.command.endswith("--backend nnsight --remote") and any("NDIF" in n for n in r.notes)


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
    two = recommend(llama_70b, _cpu(128, [H100] * 2))  # 134 GB usable: 8-bit weights (~71 GB) split over both
    assert (two.device, two.quantization) == ("multi-gpu", "8bit")
    one = recommend(llama_70b, _cpu(256, [H100]))  # 67 GB usable: 4-bit on the GPU before bf16 on the CPU
    assert (one.device, one.quantization) == ("cuda", "4bit")
    assert {a["device"] for a in one.alternatives} >= {"gpu+cpu", "cpu"}  # the exact (slow) ways, listed
    multi = recommend(llama_70b, _cpu(256, [H100] * 4))  # several GPUs before the CPU
    assert (multi.library, multi.device, multi.dtype, multi.fits) == ("nnsight", "multi-gpu", "bfloat16", True)


def test_a_large_model_whose_cache_fits_one_gpu_lists_transformer_lens_with_its_memory():
    """13B in bf16 on an 80 GB GPU: nnsight is the pick, transformer-lens (full run_with_cache) the first
    alternative, with the memory it needs (detect once never offered it above 2B parameters)."""
    shape = compute.COMMON_MODELS["llama-2-13b"]
    r = recommend(shape, _cpu(128, [H100]))
    assert (r.backend, r.device, r.dtype, r.quantization) == ("nnsight", "cuda", "bfloat16", None)
    tl = r.alternatives[0]
    backend = models.transformer_lens_backend()   # tl, or the bridge under transformer-lens 4 (make test-tl4)
    assert (tl["backend"], tl["device"], tl["dtype"], tl["full_cache"], tl["fits"]) == (backend, "cuda", "bfloat16",
                                                                                      True, True)
    need = estimate_memory(shape, 128, 8, 2).total
    assert tl["engine_gb"] == round(need / GB, 3) and 26 < tl["engine_gb"] < 0.85 * 79
    assert f"--backend {backend} --device cuda --dtype bfloat16" in tl["command"]
    # a 24 GB GPU holds neither its weights nor its cache: no transformer-lens alternative
    assert all(a["backend"] == "nnsight" for a in recommend(shape, _cpu(128, [RTX_4090])).alternatives)


@pytest.mark.parametrize("installed, expected", [(None, "tl"), ("3.9.0", "tl"), ("4.3.0", "bridge")])
def test_detect_gives_one_transformer_lens_decision_before_and_after_install(monkeypatch, installed, expected):
    """Before transformer-lens is installed detect said --backend bridge, after (3.x, what mechscope installs) tl;
    only transformer-lens 4 (no HookedTransformer) makes it the bridge; --backend auto follows the same rule."""
    from importlib import metadata

    def version(name):
        if name == "transformer-lens" and installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed if name == "transformer-lens" else metadata.version(name)

    monkeypatch.setattr(metadata, "version", version)
    assert models.transformer_lens_backend() == expected
    assert recommend(compute.COMMON_MODELS["gpt2-small"], _cpu(24)).backend == expected
    assert models.auto_backend("gpt2-small") == expected


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


# ---------------------------------------------------------------- detect as the front door: described hardware,
# precision, quantisation, offload, NDIF, command lines

RTX_4090 = Gpu("NVIDIA GeForce RTX 4090", 24 * 10**9, 23 * 10**9, (8, 9), bf16=True)


def _cli_args(command_line: str):
    """The parsed arguments of a printed `mechscope ...` line (with the real parser: it must run)."""
    import shlex

    words = shlex.split(command_line)
    assert words[0] == "mechscope"
    return build_parser(words[1]).parse_args(words[1:])


@pytest.mark.parametrize("ram_gb", [32, 128])
def test_llama_2_13b_on_one_24gb_gpu_is_quantised_nnsight_never_transformer_lens(ram_gb):
    """The user's case: recommend() from Python with a 24 GB GPU said "NDIF" with 32 GB RAM and "CPU, float32,
    52 GB" with 128 GB. bf16 is weighed and refused (26 GB of weights); 8-bit weights on the GPU fit."""
    shape, hw = compute.COMMON_MODELS["llama-2-13b"], _cpu(ram_gb, [RTX_4090])
    options = compute.plans(shape, hw)
    bf16 = next(p for p in options if (p.device, p.dtype, p.quantization) == ("cuda", "bfloat16", None))
    assert not bf16.fits and bf16.memory.weights == pytest.approx(26.03e9, rel=1e-3)
    assert all(p.backend == "nnsight" or not p.fits for p in options)  # transformer-lens never fits here
    r = recommend(shape, hw)
    assert (r.library, r.backend, r.device, r.dtype, r.quantization, r.fits) == \
        ("nnsight", "nnsight", "cuda", "bfloat16", "8bit", True)
    assert 13 < r.memory_gb["weights"] < 14 < r.memory_gb["engine"] < r.memory_gb["usable"]
    assert r.command == ("mechscope patch --model meta-llama/Llama-2-13b-hf --backend nnsight --device cuda "
                         "--dtype bfloat16 --quantization 8bit")
    kinds = {(a["device"], a["quantization"]) for a in r.alternatives}
    assert ("cuda", "4bit") in kinds and ("gpu+cpu", None) in kinds
    assert any("full precision" in n for n in r.notes)
    if ram_gb == 32:  # bf16 in 32 GB of RAM does not fit: the remaining alternative is NDIF
        assert ("ndif-remote", None) in kinds and ("cpu", None) not in kinds


def test_described_gpus_and_ram_replace_this_machines():
    shape = compute.COMMON_MODELS["llama-2-13b"]
    one = compute.described_hardware("24GB", "32GB")
    assert [g.total_bytes for g in one.gpus] == [24 * 10**9] and one.ram_total_bytes == 32 * 10**9
    assert (recommend(shape, one).device, recommend(shape, one).quantization) == ("cuda", "8bit")
    two = recommend(shape, compute.described_hardware("2x24GB"))  # exact: split over both GPUs in bf16
    assert (two.device, two.dtype, two.quantization) == ("multi-gpu", "bfloat16", None)
    assert "--device-map auto" in two.command
    v100 = compute.described_hardware("32GB:fp16", "64GB")
    assert recommend(compute.COMMON_MODELS["pythia-6.9b"], v100).dtype == "float16"
    # Gemma 2 / 3 overflow in float16 upstream: on a GPU without bfloat16, float32 (or quantised), never float16
    for name in ("gemma-2-2b", "gemma-2-9b"):
        advice = recommend(compute.COMMON_MODELS[name], v100)
        assert advice.dtype != "float16" and all(a["dtype"] != "float16" for a in advice.alternatives), name
    none = compute.described_hardware("0", "16GB")
    assert not none.gpus and recommend(shape, none).device == "ndif-remote"


def test_parse_sizes_and_gpus():
    assert compute.parse_size("24GB") == compute.parse_size("24") == compute.parse_size("24g") == 24 * 10**9
    assert compute.parse_size("80GiB") == 80 * 2**30 and compute.parse_size("512MB") == 512 * 10**6
    gpus = compute.parse_gpus("2x80GB,24GB:fp16")
    assert [(g.total_bytes, g.bf16) for g in gpus] == [(80 * 10**9, True)] * 2 + [(24 * 10**9, False)]
    for bad in ["lots", "0.01GB", "nanGB", "infGB", "-8GB"]:
        with pytest.raises(BadInput):
            compute.parse_size(bad)
    for bad in ["2x", "99x24GB", "24GB:fp8", ",", "x24GB"]:
        with pytest.raises(BadInput):
            compute.parse_gpus(bad)


def test_quantised_weight_bytes_by_hand():
    """bitsandbytes quantises the blocks' linear weights (8-bit: 1 byte; nf4: 0.5 + a float32 absmax per 64);
    embeddings, lm_head, norms and biases stay in the compute dtype."""
    linear = 2 * (8 * 4 * (2 * 2 + 2 * 2) + 2 * 8 * 16)  # TINY: W_Q W_K W_V W_O [8, 2 x 4] + W_in W_out [8, 16]
    assert compute.linear_params(TINY) == linear == 1024
    shape = compute.ModelShape("t", 2, 8, 2, 4, 16, 10, 6, n_params=count_params(TINY, transformer_lens=False))
    rest = shape.n_params - linear
    assert compute.weight_bytes(shape, "float32") == shape.n_params * 4
    assert compute.weight_bytes(shape, "bfloat16", "8bit") == linear + 2 * rest
    assert compute.weight_bytes(shape, "bfloat16", "4bit") == int(linear * (0.5 + 4 / 64) + 2 * rest)
    llama = compute.COMMON_MODELS["llama-2-13b"]  # 40 x (5120 x 128 x 160 + 3 x 5120 x 13824) linear weights
    assert compute.linear_params(llama) == 40 * (5120 * 128 * 160 + 3 * 5120 * 13824)


@pytest.mark.parametrize("hw", [_cpu(32, [RTX_4090]), _cpu(256, [H100]), _cpu(128, [H100] * 2), _cpu(16),
                                _cpu(64, mps=True)], ids=["4090", "h100", "2xh100", "cpu", "mps"])
def test_every_printed_command_line_parses_and_loads_as_planned(hw):
    """Each plan's command line runs through the real parser, and its loading options are the plan's."""
    for name in ["gpt2-small", "llama-2-13b", "llama-3-70b"]:
        r = recommend(compute.COMMON_MODELS[name], hw, command="steer")
        for plan in [r.to_dict()] + r.alternatives:
            args = _cli_args(plan["command"])
            assert args.command == "steer" and args.model == compute.COMMON_MODELS[name].hub_id
            assert (args.backend, args.quantization, args.remote) == \
                (plan["backend"], plan["quantization"], plan["device"] == "ndif-remote")
            assert args.device_map == ("auto" if plan["device"] in ("multi-gpu", "gpu+cpu") else None)
            if plan["device"] not in ("ndif-remote", "multi-gpu", "gpu+cpu"):
                assert (args.device, args.dtype) == (plan["device"], plan["dtype"])


def test_cli_detect_described_gpu_json(capsys):
    argv = ["detect", "--model", "meta-llama/Llama-2-13b-hf", "--gpu", "24GB", "--ram", "128GB", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    r = summary["recommendation"]
    assert summary["hardware"]["described"] == ["gpus", "ram"] and summary["hardware"]["ram_total_gb"] == 128
    assert [g["total_gb"] for g in summary["hardware"]["gpus"]] == [24]
    assert (r["model"], r["device"], r["quantization"]) == ("llama-2-13b", "cuda", "8bit")
    assert "--quantization 8bit" in r["command"] and r["alternatives"]
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "run: mechscope patch --model meta-llama/Llama-2-13b-hf --backend nnsight" in text and "also: " in text


@pytest.mark.parametrize("argv", [["--gpu", "lots"], ["--gpus", "2x"], ["--ram", "nan"], ["--command", "new"]])
def test_cli_detect_bad_hardware_is_one_line(argv, capsys):
    try:
        code = main(["detect", "--model", "llama-2-13b", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_cli_detect_writes_a_run_directory_only_with_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "--model", "gpt2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] is None and not any(tmp_path.iterdir())
    assert main(["detect", "--model", "gpt2", "--json", "--out", str(tmp_path / "kept")]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    assert run_dir.parent == tmp_path / "kept" and run_dir.name.startswith("detect-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["summary"]["recommendation"]["model"] == "gpt2-small"
    assert json.loads((run_dir / "meta.json").read_text())["command"] == "detect"


def test_detect_offers_exactly_the_commands_that_load_a_model():
    """`detect --command C` prints a command line with --model / --backend: only for commands that take them
    (it printed `mechscope report --model ...`, which report refuses)."""
    import importlib

    from mechscope.cli import COMMANDS
    from mechscope.commands.detect import NOT_LOADING

    for command, (module, _) in COMMANDS.items():
        uses_model = getattr(importlib.import_module(f"mechscope.commands.{module}"), "USES_MODEL", True)
        assert uses_model == (command not in NOT_LOADING), command
