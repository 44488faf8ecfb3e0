"""Slow on a GPU (issue 19 §3), checked on the CPU: what crosses to the host (a spy on .cpu() / .to("cpu") stands in
for a GPU-to-host copy, one on .tolist() / float() for a wait on the device), which layers a weight read touches,
whether the unembedding runs, whether autograd records, which KV-cache agreement the bridge accepts in half
precision; each against the values of the slow path."""
import pytest
import torch


@pytest.fixture
def host_copies(monkeypatch):
    """numel of every tensor that .cpu() or .to(<cpu>) is called on while the test runs (on a GPU: a copy to the
    host, and a wait for the device)."""
    sizes = []
    cpu, to = torch.Tensor.cpu, torch.Tensor.to

    def spy_cpu(self, *args, **kwargs):
        sizes.append(self.numel())
        return cpu(self, *args, **kwargs)

    def spy_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        if device is not None and device.type == "cpu":
            sizes.append(self.numel())
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    return sizes


def _ids(engine, words):
    return torch.tensor([engine.to_tokens(w, prepend_bos=False)[0, 0] for w in words])


# ------------------------------------------------------------------------------------------- 1. DLA
def test_dla_copies_no_layer_weight_to_the_host(toy_engine, host_copies):
    """Each layer's head and neuron projections run where W_O / W_out live; only [batch, ...] results come to the
    CPU. Before: every layer's W_O and W_out were copied to the host in float32 for every chunk of prompts."""
    from mechscope.techniques.dla import dla

    tokens = toy_engine.to_tokens(["When Mary and John went", "When Tom and Anna went"])
    answer, wrong = _ids(toy_engine, [" Mary", " Anna"]), _ids(toy_engine, [" John", " Tom"])
    result = dla(toy_engine, tokens, answer, wrong)
    smallest_weight = min(toy_engine.W_O(0).numel(), toy_engine.W_out(0).numel())
    assert host_copies and max(host_copies) < smallest_weight, max(host_copies)
    assert torch.allclose(result.total(), result.metric, atol=1e-4)      # the parts still sum to the logit diff


# --------------------------------------------------------------------------------- 2. one layer's weights
def test_tl_weights_of_one_layer_read_that_layer_alone(toy_engine):
    """W_O(l), b_O(l), W_out(l) on transformer-lens index block l (O(1) in the layers). Before: model.W_O[l], which
    stacks every layer's W_O on each call (O(L) per call, O(L^2) over a DLA)."""
    model = toy_engine.model
    expected = [(model.W_O[layer], model.b_O[layer], model.W_out[layer]) for layer in range(model.cfg.n_layers)]
    seen = []

    class Blocks(torch.nn.ModuleList):
        def __getitem__(self, i):
            seen.append(i)
            return super().__getitem__(i)

        def __iter__(self):
            pytest.fail("a weight of one layer iterated over every block")

    blocks, model.blocks = model.blocks, Blocks(list(model.blocks))   # (monkeypatch would delete a submodule)
    try:
        for layer, (W_O, b_O, W_out) in enumerate(expected):
            seen.clear()
            got = toy_engine.W_O(layer), toy_engine.b_O(layer), toy_engine.W_out(layer)
            assert seen == [layer] * 3
            assert torch.equal(got[0], W_O) and torch.equal(got[1], b_O) and torch.equal(got[2], W_out)
    finally:
        model.blocks = blocks
