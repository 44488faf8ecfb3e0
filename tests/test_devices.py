"""Ready for the machines users have (issue 19), checked on the CPU: an activation on another device (torch's fake
tensors stand in for two GPUs), accelerate's disk offload, bfloat16 / float16 runs, chunked against unchunked."""
import copy
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import BACKENDS


def _on_first_gpu(engine):
    """A copy of engine that gathers reads on cuda:0 (as under a device_map; nothing runs on it)."""
    engine = copy.copy(engine)
    engine.cfg = dataclasses.replace(engine.cfg, device="cuda:0")
    engine._sites_cache = None
    return engine


def _edit_applied(engine, site, fn, act):
    """The engine's own application of edit fn at site to activation act (a layer's value on its device)."""
    if engine.name == "nnsight":
        from mechscope.engines.nnsight import _apply

        op = engine._plan(edits=[(site, fn)])[0].ops[0]
        return _apply(op, act, {"batch": len(act)}, {})
    (_, hook), = engine._hooks([(site, fn)])
    return hook(act, None)


@pytest.mark.parametrize("toy_on", BACKENDS, indirect=True)
def test_an_edit_runs_where_its_tensors_are_and_returns_to_the_layers_device(toy_on):
    """Under a device_map a later layer's activation is on cuda:1 while an edit's tensors (a patched clean
    activation, an SAE, a mask) were gathered on cuda:0: the engine moves the activation in and the result back.
    Before: 'Expected all tensors to be on the same device ... cuda:1 and cuda:0' from every edit past the first GPU."""
    engine = _on_first_gpu(toy_on)
    site = "blocks.1.hook_resid_post"
    with FakeTensorMode(allow_non_fake_inputs=True):
        clean = torch.ones(2, 3, engine.cfg.d_model, device="cuda:0")
        act = torch.zeros(2, 3, engine.cfg.d_model, device="cuda:1")
        new = _edit_applied(engine, site, lambda a: a + clean, act)
    assert new.device == torch.device("cuda:1") and new.shape == act.shape


def test_ablate_and_metrics_read_half_precision_logits_in_float32():
    """log p(answer) of bfloat16 logits taken in bfloat16 was off by ~1e-3 (the effects of `ablate` without
    --wrong); logit_diff and answer_logit now upcast before they subtract."""
    from mechscope import metrics
    from mechscope.commands.ablate import _answer_metric

    logits = (torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0)) * 8).bfloat16()
    rows = [torch.zeros(3, dtype=torch.long)] * 4
    exact = logits[:, -1].float().log_softmax(-1)[torch.arange(4), torch.tensor([1, 2, 3, 4])]
    metric, _ = _answer_metric(None, rows, [1, 2, 3, 4], None)
    assert torch.allclose(metric(logits), exact, atol=1e-6)
    diff = metrics.logit_diff(logits, torch.tensor([1, 2, 3, 4]), 5)
    assert diff.dtype == torch.float32
    assert torch.equal(diff, logits[torch.arange(4), -1, torch.tensor([1, 2, 3, 4])].float() - logits[:, -1, 5].float())
    assert metrics.answer_logit(logits, 1).dtype == torch.float32
