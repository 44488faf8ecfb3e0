"""Out of memory on the machines users have (issue 19 §1), checked on the CPU: attribution patching and EAP / EAP-IG
in chunks by a memory budget (the same numbers chunked and not), no float32 copy of the whole unembedding, the
packed patching sweep holding one block's fused q / k / v copy at a time, and accelerate's disk offload from the
command line (--offload-folder)."""
import gc
import json

import pytest
import torch

from hostile import assert_refused, reuse_engine, run_cli
from mechscope import metrics
from mechscope.cli import main
from mechscope.techniques import attribution_patching as atp
from mechscope.techniques import patching


# ------------------------------------------------------------------------------------- attribution patching
@pytest.fixture(scope="module")
def ioi_batch(toy_engine):
    from mechscope.tasks import load_task

    batch = patching.pair_batch(toy_engine, load_task(toy_engine, "ioi", n=7, seed=0))
    assert len(set(batch.lengths.tolist())) > 1  # right-padded rows
    return batch


def _metric(batch):
    def metric(logits, rows):
        return metrics.logit_diff(logits, batch.answer[rows], batch.wrong[rows], pos=(batch.lengths - 1)[rows])
    return metric


def test_attribution_patching_gives_the_same_numbers_chunked_and_not(toy_engine, ioi_batch, monkeypatch):
    """Memory: AtP ran one forward + backward over the whole prompt set (n = 32 by default: ~10 GB on top of a
    7B model's weights). Now the prompts run in chunks by a memory budget; every estimate (AtP* included), and
    the clean / corrupted metrics, are those of one batch, and a small budget runs one prompt per backward."""
    b = ioi_batch
    assert atp.prompts_per_chunk(toy_engine.cfg, b.clean.shape[1]) >= len(b.clean)  # one chunk on the toy
    whole = atp.attribution_patch(toy_engine, b.clean, b.corrupted, _metric(b), sites=atp.SITES, atp_star=True,
                                  lengths=b.lengths)
    chunked = atp.attribution_patch(toy_engine, b.clean, b.corrupted, _metric(b), sites=atp.SITES, atp_star=True,
                                    lengths=b.lengths, chunk_prompts=3)
    assert set(chunked.per_prompt) == set(whole.per_prompt) and whole.per_prompt["head_out"].abs().max() > 0.05
    for name, value in whole.per_prompt.items():
        torch.testing.assert_close(chunked.per_prompt[name], value, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
    torch.testing.assert_close(chunked.clean, whole.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.corrupted, whole.corrupted, atol=1e-5, rtol=0)

    from mechscope.engines import hooked_sweep

    rows, real = [], toy_engine.run_with_grads
    monkeypatch.setattr(hooked_sweep, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(toy_engine, "run_with_grads", lambda tokens, *a, **k: rows.append(len(tokens)) or
                        real(tokens, *a, **k))
    budgeted = atp.attribution_patch(toy_engine, b.clean, b.corrupted, _metric(b), sites=["resid"], lengths=b.lengths)
    assert rows == [1] * len(b.clean)
    torch.testing.assert_close(budgeted.per_prompt["resid_pre"], whole.per_prompt["resid_pre"], atol=1e-5, rtol=1e-5,
                               equal_nan=True)


def test_a_one_argument_metric_still_works_unchunked(toy_engine, ioi_batch):
    """metric(logits), the signature before chunking, keeps working: it sees the whole prompt set in one
    forward + backward and gives the numbers of the two-argument form."""
    b = ioi_batch
    two = _metric(b)
    whole = atp.attribution_patch(toy_engine, b.clean, b.corrupted, two, sites=["resid", "heads"], lengths=b.lengths)
    everyone = torch.arange(len(b.clean))
    one = atp.attribution_patch(toy_engine, b.clean, b.corrupted, lambda logits: two(logits, everyone),
                                sites=["resid", "heads"], lengths=b.lengths, chunk_prompts=3)
    for name, value in whole.per_prompt.items():
        torch.testing.assert_close(one.per_prompt[name], value, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)


def test_attribution_patching_chunks_a_7b_prompt_set():
    """The budget chunks where it matters: a 7B Llama shape's 32 prompts of 20 tokens in float32 do not fit one
    backward (prompts of the toy do)."""
    from types import SimpleNamespace

    llama = SimpleNamespace(n_layers=32, d_model=4096, d_mlp=11008, n_heads=32, dtype=torch.bfloat16)
    assert 1 <= atp.prompts_per_chunk(llama, 20) < 32


def _same(a, b, path=""):
    """Nested JSON values equal, numbers to 1e-4."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    else:
        assert a == b, path


def test_attribution_patch_command_prints_the_same_in_one_prompt_chunks(toy_engine, tmp_path, capsys, monkeypatch):
    reuse_engine(monkeypatch, toy_engine)
    argv = ["attribution-patch", "--task", "ioi", "--n", "6", "--sites", "resid,heads,neurons", "--json"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out)

    from mechscope.engines import hooked_sweep

    rows, real = [], toy_engine.run_with_grads
    monkeypatch.setattr(hooked_sweep, "MEMORY_BUDGET", 1)   # one prompt per backward (and per exact-sweep row)
    monkeypatch.setattr(toy_engine, "run_with_grads", lambda tokens, *a, **k: rows.append(len(tokens)) or
                        real(tokens, *a, **k))
    assert main(argv + ["--out", str(tmp_path / "chunked")]) == 0
    chunked = json.loads(capsys.readouterr().out)
    assert rows == [1] * 6
    assert chunked["headline"] == whole["headline"]
    _same(chunked["summary"], whole["summary"])


# ------------------------------------------------------------------------------------- EAP / EAP-IG
def test_edge_scores_give_the_same_numbers_chunked_and_not(toy_engine, monkeypatch):
    """EAP-IG ran steps x prompts rows in one forward + backward; now in chunks of steps by a memory budget
    (the clean run, alpha = 1, first): the same EAP and EAP-IG scores and metrics."""
    from mechscope.engines import hooked_sweep
    from mechscope.techniques import edges
    from mechscope.techniques.path_patching import induction_task

    clean, corrupted, metric = induction_task(toy_engine, 8, 6, seed=0)
    whole = edges.edge_scores(toy_engine, clean, corrupted, metric, steps=5)
    chunked = edges.edge_scores(toy_engine, clean, corrupted, metric, steps=5, chunk_steps=2)
    assert whole.eap_ig.abs().max() > 0.05
    for name in ("eap", "eap_ig", "clean", "corrupted"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-5, rtol=1e-5, msg=name)
    rows, real = [], toy_engine.run_with_grads
    monkeypatch.setattr(hooked_sweep, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(toy_engine, "run_with_grads", lambda tokens, *a, **k: rows.append(len(tokens)) or
                        real(tokens, *a, **k))
    budgeted = edges.edge_scores(toy_engine, clean, corrupted, metric, steps=5)
    assert rows == [8] * 5
    torch.testing.assert_close(budgeted.eap_ig, whole.eap_ig, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- W_U in float32
class FullCopySpy(torch.Tensor):
    """W_U as a tensor that records every float32 result of W_U's whole shape computed from it."""
    shape_of_w_u = None
    copies: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.ndim >= 2 \
                and tuple(out.shape[-2:]) in (cls.shape_of_w_u, cls.shape_of_w_u[::-1]):
            cls.copies.append(getattr(func, "__name__", str(func)))
        return out


@pytest.fixture(scope="module")
def toy_bf16():
    from mechscope.models import load_model

    return load_model("mechscope-toy", backend="tl", device="cpu", dtype="bfloat16")


def test_no_float32_copy_of_the_whole_unembedding(toy_bf16, monkeypatch):
    """W_U.float() copied the whole unembedding (3.7 GB on Gemma-2-9B in bfloat16) in SAE logit effects, the SAE
    fit check, circuits' OV circuit and DLA's mean direction. Now W_U is cast one vocabulary chunk at a time: on a
    bfloat16 model no float32 result of W_U's shape is made, and every number is the one-chunk (whole-copy) one."""
    from transformer_lens import HookedTransformer

    from mechscope.engines import base
    from mechscope.techniques import circuits, sae, sae_features
    from mechscope.techniques.dla import dla

    engine = toy_bf16
    sae_model = sae.load_sae("mechscope-toy")
    tokens = engine.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    answer = engine.to_tokens(" Mary", prepend_bos=False)[0, 0]

    def everything():
        return {"effects": sae_features.logit_effects(engine, sae_model, [0, 5, 9], scale=2.0),
                "processing": sae.weight_processing(engine),
                "ov": circuits.ov_circuit(engine, 2, 1).AB,
                "dla": dla(engine, tokens, answer).heads}

    whole = everything()   # the toy's vocabulary (306) is one chunk of VOCAB_CHUNK: the whole copy, as before
    FullCopySpy.shape_of_w_u, FullCopySpy.copies = tuple(engine.W_U.shape), []
    monkeypatch.setattr(HookedTransformer, "W_U", property(lambda m: m.unembed.W_U.detach().as_subclass(FullCopySpy)))
    monkeypatch.setattr(base, "VOCAB_CHUNK", 64, raising=False)
    chunked = everything()
    assert FullCopySpy.copies == []
    assert chunked["processing"] == whole["processing"]
    for key in ("effects", "ov", "dla"):
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-5, rtol=1e-5, msg=key)
    W_U = engine.model.unembed.W_U.detach()
    torch.testing.assert_close(base.unembed_float(torch.ones(2, 3, W_U.shape[0]), W_U), torch.ones(2, 3, W_U.shape[0])
                               @ W_U.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.vocab_mean(W_U), W_U.float().mean(1), atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------- fused q / k / v copies
def test_the_packed_sweep_holds_one_blocks_fused_qkv_copy_at_a_time(toy_engine, monkeypatch):
    """The packed patching path (the tl engine's default sweep) built every block's fused q / k / v weight copy
    before running any (3.2 GB on a 7B Llama in bfloat16); now each block's copy is made when that block runs.
    Counted from torch's live tensors of the fused shape [(n_heads + 2 n_kv) d_head, d_model] whenever a block's
    attention starts: none alive."""
    from mechscope.engines import hooked_sweep
    from mechscope.tasks import load_task

    cfg = toy_engine.cfg
    fused = (3 * cfg.n_heads * cfg.d_head, cfg.d_model)
    seen, real = [], hooked_sweep._attention_in

    def counting(*args, **kwargs):
        seen.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == fused))
        return real(*args, **kwargs)
    batch = patching.pair_batch(toy_engine, load_task(toy_engine, "ioi", n=4, seed=0))
    metric = patching.logit_diff_metric(batch.answer, batch.wrong)
    def sweep():
        return patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "resid_pre", metric, lengths=batch.lengths)
    expected = sweep()
    monkeypatch.setattr(hooked_sweep, "_attention_in", counting)
    result = sweep()
    assert "packed" in result.meta["implementation"] and len(seen) >= cfg.n_layers
    assert max(seen) == 0
    torch.testing.assert_close(result.per_prompt, expected.per_prompt, equal_nan=True)


# ------------------------------------------------------------------------------------- --offload-folder
def test_offload_folder_is_refused_in_one_line_without_its_conditions(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_refused(["predict", "--backend", "nnsight", "--offload-folder", str(tmp_path / "off")], "--device-map",
                   tmp_path)
    assert_refused(["predict", "--backend", "tl", "--offload-folder", str(tmp_path / "off")], "nnsight", tmp_path)
    assert_refused(["predict", "--backend", "nnsight", "--device-map", "auto", "--offload-folder", str(a_file)],
                   "not a directory", tmp_path)
    assert_refused(["predict", "--backend", "nnsight", "--device-map", "auto", "--offload-folder",
                    str(a_file / "under")], "--offload-folder", tmp_path)
    assert not (tmp_path / "off").exists()


@pytest.fixture(scope="module")
def toy_bin_checkpoint(tmp_path_factory):
    """mechscope-toy's Hugging Face export with its weights as pytorch_model.bin (not safetensors): weights that
    a device_map puts on disk must then be written out to an offload folder."""
    import shutil

    from safetensors.torch import load_file

    from mechscope.toy.export import HF_DIR

    directory = tmp_path_factory.mktemp("toy_bin")
    for f in HF_DIR.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, directory / f.name)
    torch.save(load_file(str(HF_DIR / "model.safetensors")), directory / "pytorch_model.bin")
    return directory


def test_offload_folder_takes_weights_offloaded_to_disk(toy_bin_checkpoint, tmp_path, capsys):
    """--device-map auto with 2 MB of CPU memory puts blocks 1, 2 and lm_head on disk: from a .bin checkpoint
    accelerate must write them out, and there was no way to say where from the command line (a ValueError
    traceback). Now --offload-folder DIR takes them and the run gives the same predictions as a load without
    offload; without it, one line says to pass it."""
    model = ["--model", str(toy_bin_checkpoint), "--backend", "nnsight", "--prompt", "When Mary and John went to "
             "the store, John gave a drink to", "--json"]
    assert main(["predict", *model, "--device-map", "cpu", "--out", str(tmp_path / "a")]) == 0
    plain = json.loads(capsys.readouterr().out)["summary"]
    folder = tmp_path / "offload" / "here"
    offload = ["--device-map", "auto", "--max-memory", "cpu=2MB"]
    assert main(["predict", *model, *offload, "--offload-folder", str(folder), "--out", str(tmp_path / "b")]) == 0
    offloaded = json.loads(capsys.readouterr().out)["summary"]
    assert len(list(folder.glob("*.safetensors"))) > 1   # the weights placed on disk, written there
    _same(offloaded, plain)
    # refused after the load began (transformers' loading bar comes first): the error in one line, nothing written
    for argv, message in (([*offload], "pass --offload-folder DIR"),      # was transformers' ValueError
                          (["--device-map", "auto", "--max-memory", "cpu=300KB", "--offload-folder", str(folder)],
                           "embeddings on disk")):                       # was a RuntimeError from nnsight's pipeline
        code, out, err = run_cli(["predict", *model, *argv, "--out", str(tmp_path / "refused")])
        assert code == 2 and out == "" and "Traceback" not in err and not (tmp_path / "refused").exists()
        assert message in err.strip().splitlines()[-1] and "Loading weights" not in err.strip().splitlines()[-1]
