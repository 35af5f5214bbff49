"""torch.compile as train.py applies it (model.compile_model): no graph breaks on the hot path, no recompiles
once the padded and unpadded variants of a batch have been seen, whatever the frame counts and text lengths,
and the same loss and gradients as eager. Backend aot_eager: dynamo's graphs and the autograd graphs traced
as inductor would get them, without inductor's C++ build (minutes on 2 cores)."""
import pytest
import torch

from model import DINOv2, DinoConfig, FoveatedVLM, LLMConfig, SmolLM2, compile_model
from perf.platform import compile_counts
from conftest import steered

dynamo = pytest.importorskip("torch._dynamo")


def tiny(seed=0):
    torch.manual_seed(seed)
    llm = SmolLM2(LLMConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                            hidden_dim=128, max_seq_len=512))
    return steered(FoveatedVLM(llm, DINOv2(DinoConfig(image_size=28, patch_size=14, dim=48, n_layers=2,
                                                      n_heads=3)))).train()


def batch(T, S, padded, seed):
    g = torch.Generator().manual_seed(seed)
    frame_mask = torch.ones(2, T, dtype=torch.bool)
    frame_mask[1, T - 1:] = not padded  # the second sample one frame short
    return (torch.randn(2, T, 3, 28, 28, generator=g), torch.randint(3, 300, (2, S), generator=g),
            torch.ones(2, S, dtype=torch.long), frame_mask)


def test_compiled_step_no_breaks_no_recompiles():
    dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    eager, compiled = tiny(), compile_model(tiny(), dynamic=True, backend="aot_eager")
    shapes = [(2, 10, False), (3, 12, True), (5, 9, False), (4, 16, True)]
    graphs = []
    for i, (T, S, padded) in enumerate(shapes):
        args = batch(T, S, padded, i)
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            _, loss = m(*args)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        graphs.append(compile_counts()["graphs"])
    assert compile_counts()["graph_breaks"] == 0
    # after the first unpadded and the first padded batch: new frame counts and lengths compile nothing
    assert graphs[1] == graphs[-1], graphs


@torch.no_grad()
def test_compiled_cache_path_no_breaks():
    """Inference through the KV cache (prefill, decode in every mode): the cache write stays eager, so the
    graphs do not depend on the layer index or the cache length, and the tokens are eager's."""
    from torch._dynamo.utils import counters
    from model import MODES, generate
    dynamo.reset()
    counters.clear()
    eager, compiled = tiny().eval(), compile_model(tiny().eval(), dynamic=True, backend="aot_eager")
    frames, ids, _, frame_mask = batch(3, 5, False, 0)
    out = []
    for m in (eager, compiled):
        kv = m.encode(frames, frame_mask)
        for mode in MODES:
            cache, last, _ = m.prefill(kv, frame_mask, ids, mode, extra=12)
            out.append(torch.stack(list(generate(m.llm, cache, last, 12, stop_id=-1)), 1))
    for a, b in zip(out[:3], out[3:]):
        assert torch.equal(a, b)
    assert compile_counts()["graph_breaks"] == 0 and compile_counts()["graphs"] <= 12
