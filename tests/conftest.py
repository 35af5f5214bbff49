"""Shared fixtures: tiny random HF backbones written by the transformers oracle, and the real SmolLM2 dir."""
import os

import pytest
import torch

import model
from model import left_pad

torch.set_num_threads(2)


def steered(vlm, seed=0):
    """A fresh FoveatedVLM's fine queries all equal q_static (its init); give llm_to_query and q_init random
    values, as after training, so the tests exercise queries that depend on the LLM state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (vlm.llm_to_query.weight, vlm.q_init):
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p is vlm.q_init else p.shape[1] ** -0.5))
    return vlm


def write_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    return model


def write_dino(path, **overrides):
    from transformers import Dinov2Config, Dinov2Model
    cfg = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, mlp_ratio=4,
               image_size=56, patch_size=14, layerscale_value=0.5)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**cfg)).eval()
    with torch.no_grad():  # random but not trivial LayerScale / norms, so a swapped key would show
        for name, p in model.named_parameters():
            if "lambda1" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, write_llama(path)


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino")
    return path, write_dino(path)


@pytest.fixture(scope="session")
def smollm2_dir():
    path = os.environ.get("NANOFVLM_SMOLLM2")
    if not path:
        pytest.skip("set NANOFVLM_SMOLLM2 to a dir made by shared/fixtures/smollm2_from_gguf.py")
    return path


@torch.no_grad()
def generate_texts(llm, prompts, max_new_tokens=128, temperature=0.0, top_k=None, stop_id=2, generator=None):
    """Text-only generation for a batch of prompts (lists of ids) of any lengths: left-padded, masked.
    Returns the new ids per prompt, without the stop token."""
    ids, valid = left_pad(prompts, llm.embed_tokens.weight.device)
    cache = llm.new_cache(len(prompts), ids.shape[1] + max_new_tokens)
    logits = llm.lm_head(llm(ids, valid=valid, cache=cache, hidden_only=True)[:, -1])
    steps = list(model.generate(llm, cache, logits, max_new_tokens, temperature, top_k, stop_id, generator))
    out = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    return [row[:row.index(stop_id)] if stop_id in row else row for row in out]
