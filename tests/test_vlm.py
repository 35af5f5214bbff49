"""FoveatedVLM on tiny random backbones: the glimpse, the three modes, padding, gradients, save/load."""
import re
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import steered
from model import MODES, DINOv2, FoveatedVLM, SmolLM2, load_model


@pytest.fixture(scope="module")
def vlm(tiny_llama, tiny_dino):
    return steered(load_model("scratch", tiny_llama[0], tiny_dino[0])[0].eval())


def video(B=2, T=3, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g), torch.randint(3, 96, (B, 7), generator=g)


def test_kv_cache_is_dinos_own(vlm, tiny_dino):
    frames, _ = video()
    ref, seen = tiny_dino[1], {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))
             for name, m in ref.named_modules() if name.endswith(("k_proj", "v_proj"))]  # transformers 5 names
    with torch.no_grad():
        kv = vlm.encode(frames)
        ref(pixel_values=frames.flatten(0, 1))
        x, full_kv = vlm.dino.embed(frames.flatten(0, 1)), []
        for block in vlm.dino.blocks:  # every block run whole
            x, layer_kv, _ = block(x)
            full_kv.append(layer_kv)
        assert all(torch.equal(a, b) for x, y in zip(kv, full_kv) for a, b in zip(x, y))  # last: K/V only
    for h in hooks:
        h.remove()
    for layer, (k, v) in enumerate(kv):
        for ours, name in ((k, "key"), (v, "value")):
            theirs = seen[f"encoder.layer.{layer}.attention.{name[0]}_proj"]  # [N,L,D]
            assert (ours.transpose(1, 2).flatten(2) - theirs).abs().max() <= 1e-5


def test_fine_pass_starts_as_the_coarse_pass(tiny_llama, tiny_dino):
    fresh = load_model("scratch", tiny_llama[0], tiny_dino[0])[0].eval()
    frames, ids = video()
    with torch.no_grad():
        coarse, fine = (fresh(frames, ids, mode=m)[0] for m in ("coarse_only", "coarse_fine"))
    assert (coarse - fine).abs().max() <= 1e-5  # every query is q_static until training moves llm_to_query


def test_queries_change_glimpses(vlm):
    frames, _ = video(B=1, T=1)
    with torch.no_grad():
        kv = vlm.encode(frames)
        g1, _ = vlm.glimpse(vlm.q_static[None], kv)
        g2, _ = vlm.glimpse(vlm.q_init[None], kv)
    assert torch.cosine_similarity(g1[0], g2[0]).item() < 0.99


def naive_autoregressive(vlm, frames, ids):
    """Recompute the whole prefix at every frame: no cache, no shortcuts."""
    kv = vlm.encode(frames)
    B, T = frames.shape[:2]
    query, tokens = vlm.q_init.expand(B, -1), []
    for t in range(T):
        frame_kv = [(k.view(B, T, *k.shape[1:])[:, t], v.view(B, T, *v.shape[1:])[:, t]) for k, v in kv]
        g, _ = vlm.glimpse(query[:, None], frame_kv)  # [B,1,D]
        tokens.append(vlm.dino_to_llm(g) * vlm.visual_scale)
        query = vlm.llm_to_query(vlm.llm(embeds=torch.cat(tokens, 1), hidden_only=True)[:, -1])
    seq = torch.cat(tokens + [vlm.llm.embed_tokens(ids)], 1)
    return vlm.llm(embeds=seq)[:, T:]


def test_autoregressive_equals_naive(vlm):
    frames, ids = video()
    with torch.no_grad():
        logits, _ = vlm(frames, ids, mode="autoregressive")
        assert (logits - naive_autoregressive(vlm, frames, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_nothing(vlm, mode):
    frames, ids = video(B=1, T=2, seed=1)
    long_frames, long_ids = video(B=1, T=4, seed=2)
    long_ids = torch.cat((long_ids, long_ids[:, :3]), 1)  # longer text too
    pad_frames = torch.cat((frames, torch.randn(1, 2, 3, 56, 56) * 100), 1)  # junk in the padded slots
    pad_ids = torch.cat((ids, torch.full((1, 3), 2)), 1)
    batch_frames = torch.cat((pad_frames, long_frames, torch.zeros_like(pad_frames)))
    frame_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # + a text-only row
    with torch.no_grad():
        alone, _ = vlm(frames, ids, mode=mode)
        batch, _ = vlm(batch_frames, torch.cat((pad_ids, long_ids, pad_ids)), frame_mask=frame_mask, mode=mode)
        text_alone, _ = vlm(frames[:, :0], ids, mode=mode)
    assert (batch[0, :7] - alone[0]).abs().max() <= 1e-5
    assert (batch[2, :7] - text_alone[0]).abs().max() <= 1e-5


def test_loss_and_gradients_reach_everything(vlm):
    frames, ids = video()
    mask = torch.zeros_like(ids)
    mask[:, 3:] = 1
    vlm.train()
    logits, loss = vlm(frames, ids, loss_mask=mask)
    vlm.eval()
    with torch.no_grad():
        full, _ = vlm(frames, ids)  # every position's logits, as before lm_head ran on the targets only
    assert (logits - full[:, 2:-1].flatten(0, 1)).abs().max() <= 1e-5  # [n,V]: the loss positions, in order
    ce = torch.nn.functional.cross_entropy(full[:, 2:-1].flatten(0, 1), ids[:, 3:].flatten())
    assert abs(loss.item() - ce.item()) < 1e-5  # token-weighted mean over targets; position i predicts i+1
    vlm.zero_grad()
    loss.backward()
    for name in ("q_static", "q_init", "query_input_proj.weight", "output_proj.weight", "llm_to_query.weight",
                 "dino_to_llm.weight", "dino.blocks.0.mlp.0.weight", "dino.patch_embed.weight",
                 "llm.layers.0.mlp.up_proj.weight", "llm.embed_tokens.weight"):
        grad = vlm.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    vlm.zero_grad()


def test_autoregressive_trains_with_gradient_checkpointing(vlm):
    frames, ids = video()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want, _ = vlm(frames, ids, mode="autoregressive")
    vlm.train()
    vlm.llm.gradient_checkpointing = True  # never without the cache: the frames must stay in context
    try:
        logits, loss = vlm(frames, ids, loss_mask=mask, mode="autoregressive")
        loss.backward()
    finally:
        vlm.llm.gradient_checkpointing = False
        vlm.eval()
    assert (logits - want[:, :-1].flatten(0, 1)).abs().max() <= 1e-5  # the loss positions: all but the last
    for name in ("q_init", "llm_to_query.weight", "dino.blocks.0.q.weight", "llm.layers.0.mlp.up_proj.weight"):
        assert vlm.get_parameter(name).grad.abs().sum() > 0, name
    vlm.zero_grad()


def test_save_load_and_released_layout(vlm, tiny_llama, tiny_dino, tmp_path):
    frames, ids = video()
    vlm.save(tmp_path / "ours", tokenizer=None)
    again = load_model(str(tmp_path / "ours"))[0].eval()
    # the released fVLM-135M layout: HF keys under encoder.dino. / llm., a compile infix, a tied lm_head
    released = {}
    for k, v in vlm.state_dict().items():
        if k.startswith("dino."):
            continue
        k = k.replace("llm.", "llm.model.", 1) if k.startswith("llm.") and "lm_head" not in k else k
        k = "encoder." + k if k.startswith(("query_input_proj", "output_proj")) else k
        released[k.replace("llm.model.layers", "llm.model._orig_mod.layers")] = v.clone()  # lm_head present
    for k, v in load_file(tiny_dino[0] / "model.safetensors").items():  # HF names, mask_token included
        released["encoder.dino." + k] = v + 0.01  # differs from the HF dir, so loading must take it from here
    save_file(released, tmp_path / "fvlm.safetensors")
    from_released = load_model(str(tmp_path / "fvlm.safetensors"), tiny_llama[0], tiny_dino[0], seed=123)[0].eval()
    assert torch.equal(from_released.dino.blocks[1].ls2, tiny_dino[1].encoder.layer[1].layer_scale2.lambda1 + 0.01)
    renamed = {re.sub(r"attention\.attention\.(query|key|value)\.", lambda m: f"attention.{m[1][0]}_proj.", k)
               .replace("attention.output.dense.", "attention.o_proj."): v for k, v in released.items()}
    save_file(renamed, tmp_path / "fvlm5.safetensors")  # the names transformers >= 5 gives Dinov2's attention
    from_renamed = load_model(str(tmp_path / "fvlm5.safetensors"), tiny_llama[0], tiny_dino[0])[0]
    assert all(torch.equal(a, b) for a, b in zip(from_renamed.state_dict().values(), from_released.state_dict().values()))
    from_released.dino.load_state_dict(vlm.dino.state_dict())
    with torch.no_grad():
        for mode in MODES:
            ref, _ = vlm(frames, ids, mode=mode)
            assert torch.equal(again(frames, ids, mode=mode)[0], ref)
            assert torch.equal(from_released(frames, ids, mode=mode)[0], ref)


def test_real_smollm2_modes(smollm2_dir):
    """Real SmolLM2-135M + a random DINOv2-small at 224px, 2 videos x 8 frames, every mode on CPU."""
    from model import DinoConfig
    torch.manual_seed(0)
    vlm = FoveatedVLM(SmolLM2.from_pretrained(smollm2_dir), DINOv2(DinoConfig())).eval()
    print(f"\nparams: {sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M")
    frames, ids = torch.randn(2, 8, 3, 224, 224), torch.randint(3, 49152, (2, 32))
    with torch.no_grad():
        t0 = time.perf_counter()
        kv = vlm.encode(frames)
        print(f"encode: {time.perf_counter() - t0:.2f}s")
        for mode in MODES:
            t0 = time.perf_counter()
            logits, _ = vlm(frames, ids, mode=mode, kv=kv)
            print(f"{mode}: {time.perf_counter() - t0:.2f}s")
            assert logits.shape == (2, 32, 49152) and torch.isfinite(logits).all()
