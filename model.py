"""
nanofVLM: a foveated video-language model in one file. Read top to bottom:
  1. loading helpers  safetensors in, strict key checks, errors that name the file
  2. SmolLM2          the Llama-architecture LLM with a preallocated KV cache
  3. DINOv2           the ViT that encodes a frame; its blocks also run the glimpse over cached K/V
  4. FoveatedVLM      one glimpse per frame -> one LLM token; the LLM chooses where the next looks
  5. load_model       the one loader every script calls
  6. generation       greedy / temperature / top-k sampling from a filled cache; torch.compile
What this file leaves to perf/: FLOP counts and MFU, CPU and GPU switches (perf/platform.py sets
the two hooks SmolLM2 offers), the speed and long-video measurements.
"""
import glob
import json
import math
import os
import re
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------
# 1. loading helpers


def read_config(path, model_type):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found. Point at a Hugging Face model directory "
                                f"that has config.json")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != model_type:
        raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}, expected "
                         f"{model_type!r}. Is this the right directory?")
    return cfg


def read_weights(path):  # one safetensors file -> {name: tensor}; errors name the file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected next to config.json)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors ({e}). Is the file truncated? "
                         f"Download it again.") from e


def read_hf_weights(model_dir):  # model.safetensors, or the shards its index.json lists
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for name in files for k, v in read_weights(os.path.join(model_dir, name)).items()}


def load_strict(module, state, source):  # load_state_dict, listing every key that does not fit
    ours = module.state_dict()
    problems = {
        "missing": sorted(set(ours) - set(state)),
        "unexpected": sorted(set(state) - set(ours)),
        "wrong shape": [f"{k}: file {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
                        for k in ours if k in state and state[k].shape != ours[k].shape],
    }
    if any(problems.values()):
        lines = [f"{source}: weights do not match the model"]
        for title, keys in problems.items():
            if keys:
                more = " ..." if len(keys) > 20 else ""
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + more)
        raise ValueError("\n".join(lines))
    module.load_state_dict(state)  # copies, so bf16 files land in whatever dtype the module has


# ----------------------------------------------------------------------------
# 2. SmolLM2 (Llama architecture). Module names follow HF minus the "model." prefix.


@dataclass
class LLMConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 like HF, then cast back before the weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x, cos, sin):  # RoPE on x [B,H,S,hd], cos/sin [B,1,S,hd], HF's rotate_half way
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys/values of every layer: n_layers x [B, n_kv_heads, max_len, head_dim], preallocated
    (grad on: write grows them). valid [B, max_len]: real tokens (all until a write says not)"""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # fast path: no padding anywhere -> plain causal attention

    def write(self, layer, k, v):  # append k, v [B,Hkv,S,hd] -> the layer's keys/values so far
        start, end = self.length, self.length + k.shape[2]
        if torch.is_grad_enabled():
            # Training through a walk: autograd saved the keys so far for the backward, so an
            # in-place write would corrupt them. The layer's tensor grows by a copy instead.
            k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
            self.k[layer] = torch.cat((self.k[layer][:, :, :start], k), 2)
            self.v[layer] = torch.cat((self.v[layer][:, :, :start], v), 2)
            return self.k[layer], self.v[layer]
        self.k[layer][:, :, start:end], self.v[layer][:, :, start:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def copy_rows(self, index):  # rows index [R], which may repeat: continuations of one prefix
        out = KVCache.__new__(KVCache)
        out.k, out.v = [k[index] for k in self.k], [v[index] for v in self.v]
        out.valid, out.length, out.padded = self.valid[index], self.length, self.padded
        return out


class LlamaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.self_attn.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x [B,S,L] -> x after this block; with a cache, the tokens attend over everything so far.
        compile_model compiles project and attend apart; the cache write between them stays eager"""
        q, k, v = self.project(x, cos, sin)
        causal = mask is None and x.shape[1] > 1 and (cache is None or cache.length == 0)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        return self.attend(x, q, k, v, mask, causal)

    def project(self, x, cos, sin):  # x [B,S,L] -> rotated q [B,H,S,hd], k and v [B,Hkv,S,hd]
        B, S, _ = x.shape
        attn, cfg = self.self_attn, self.cfg
        h = self.input_layernorm(x)
        q = attn.q_proj(h).view(B, S, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def attend(self, x, q, k, v, mask, causal):
        """Attention of q over k, v (mask [B,1,S,K] bool or None; causal: Python bool), then MLP"""
        attn, cfg = self.self_attn, self.cfg
        gqa = cfg.n_kv_heads != cfg.n_heads  # from the config: a Python bool, even when compiled
        if gqa and mask is not None and q.is_cuda:
            # CUDA's flash kernel takes GQA but no mask, the memory-efficient one a mask but not
            # GQA: with the K/V heads expanded, a padded batch runs the latter
            repeats = cfg.n_heads // cfg.n_kv_heads
            k, v, gqa = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1), False
        q = q.to(k.dtype)  # a cache may hold K/V in another dtype than the weights (new_cache)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        y = y.to(x.dtype)
        x = x + attn.o_proj(y.transpose(1, 2).flatten(2))
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class SmolLM2(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        # platform hooks (perf/platform.py's tune sets them): the KV cache's dtype (None: the
        # weights'), and a context each batch-1 generation step runs in
        self.cache_dtype, self.batch1_step = None, nullcontext
        # from scratch, Linears at std 1/sqrt(fan-in): at 0.02 a narrow model's attention starts
        # uniform, and the tiny default's glimpse steering then often never starts
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            elif isinstance(m, (nn.Linear, nn.Embedding)):  # the embedding, the head
                nn.init.normal_(m.weight, std=0.02)

    def rope(self, pos, dtype):
        """cos, sin [B,1,S,hd] of positions pos [B,S]. Angles in float32 whatever the weights'
        dtype: in bf16 a position near 1000 would be off by radians."""
        hd = self.cfg.head_dim
        channel = torch.arange(0, hd, 2, device=pos.device).float()
        inv_freq = 1.0 / self.cfg.rope_theta ** (channel / hd)  # [hd/2]
        angles = pos[..., None].float() * inv_freq  # [B,S,hd/2]
        angles = torch.cat((angles, angles), -1)[:, None]  # [B,1,S,hd]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def new_cache(self, batch, max_len):  # `batch` rows of up to max_len tokens
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len, self.cache_dtype or w.dtype, w.device)

    def positions_and_mask(self, B, S, device, valid, cache):
        """Positions [B,S] of the new tokens and the attention mask (None: plain causal). Padding is
        never attended and does not advance positions."""
        start = cache.length if cache is not None else 0
        if valid is not None and bool(valid.all()):
            valid = None  # nothing padded: the fast path
        if cache is not None and valid is not None:
            cache.valid[:, start:start + S], cache.padded = valid, True
        if valid is None and (cache is None or not cache.padded):
            pos = torch.arange(start, start + S, device=device).expand(B, S)
            mask = None  # causal (or a single new token): SDPA needs no mask
            if cache is not None and start > 0 and S > 1:
                mask = torch.ones(S, start + S, dtype=torch.bool, device=device).tril(start)
            return pos, mask
        seen = cache.valid[:, :start + S] if cache is not None else valid  # [B,K]: K keys
        pos = (seen.cumsum(1) - 1).clamp(min=0)[:, start:]  # [B,S]
        i = torch.arange(start, start + S, device=device)[:, None]
        j = torch.arange(start + S, device=device)[None]
        # causal, only real keys; every query sees itself so padded rows never softmax over nothing
        mask = ((j <= i) & seen[:, None, :]) | (j == i)
        return pos, mask[:, None]  # [B,1,S,K]

    def forward(self, idx=None, embeds=None, valid=None, cache=None, hidden_only=False):
        """idx [B,S] token ids or embeds [B,S,L]; valid [B,S] marks real tokens (a padded sample
        computes what it would alone); cache: a KVCache to append to. Returns logits [B,S,V], or
        the final-normed hidden states [B,S,L] with hidden_only=True."""
        x = self.embed_tokens(idx) if embeds is None else embeds
        B, S, _ = x.shape
        pos, mask = self.positions_and_mask(B, S, x.device, valid, cache)
        cos, sin = self.rope(pos, x.dtype)
        for i, block in enumerate(self.layers):
            # no checkpointing with a cache: the backward's re-run would write the cache again
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += S
        x = self.norm(x)
        return x if hidden_only else self.lm_head(x)

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32):
        path = os.path.join(model_dir, "config.json")
        hf = read_config(path, "llama")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if hf.get(key, ok) != ok:
                raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (SmolLM2: {ok!r})")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"{path}: rope scaling {rope} is not supported")
        heads = hf["num_attention_heads"]
        cfg = LLMConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=heads, n_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            hidden_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_seq_len=hf.get("max_position_embeddings", 8192),
            tie_embeddings=hf.get("tie_word_embeddings", True))
        model = cls(cfg).to(dtype)
        load_strict(model, llm_state(read_hf_weights(model_dir), cfg), model_dir)
        return model


def llm_state(hf_state, cfg):  # HF LlamaForCausalLM keys -> ours; tied files often omit lm_head
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


# ----------------------------------------------------------------------------
# 3. DINOv2


@dataclass
class DinoConfig:
    image_size: int = 518  # the trained position grid is image_size // patch_size square
    patch_size: int = 14
    dim: int = 384
    n_layers: int = 12
    n_heads: int = 6
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6


def attention(q, k, v):  # the fused kernel, except bf16 on CPU: two matmuls and a softmax win

    if q.is_cuda or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


class DinoBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)  # attention output
        self.ls1 = nn.Parameter(torch.ones(d))  # LayerScale
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.ls2 = nn.Parameter(torch.ones(d))

    def heads(self, x):  # [N,n,D] -> [N,H,n,hd], n tokens
        return x.view(*x.shape[:2], self.n_heads, x.shape[2] // self.n_heads).transpose(1, 2)

    def kv(self, h):  # h = norm1(x) [N,1+P,D] -> this block's keys and values [N,H,1+P,hd]
        return self.heads(self.k(h)), self.heads(self.v(h))

    def forward(self, x, kv=None):
        """Encoder: x [N,1+P,D] attend to each other -> (x, their (k, v) [N,H,1+P,hd], None).
        Glimpse: queries x [N,Q,D] attend to a frame's cached kv only -> (x, kv, weights
        [N,H,Q,1+P])."""
        h = self.norm1(x)
        q = self.heads(self.q(h))
        if kv is None:
            kv = self.kv(h)
            y, weights = attention(q, *kv), None
        else:
            weights = (q @ kv[0].transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            y = weights @ kv[1]
        x = x + self.ls1 * self.proj(y.transpose(1, 2).flatten(2))
        x = x + self.ls2 * self.mlp(self.norm2(x))
        return x, kv, weights


def sincos_2d(grid, dim):  # [grid*grid, dim], patches row-major: sin/cos of y, then of x
    freqs = 100.0 ** -(torch.arange(dim // 4) / (dim // 4))  # [dim/4]
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = [c.flatten()[:, None] * freqs for c in (ys, xs)]  # [grid*grid, dim/4] each
    pe = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)
    return F.pad(pe, (0, dim - pe.shape[1]))  # dim not divisible by 4: zero channels at the end


class DINOv2(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        # a 2D sine-cosine init (CLS slot zero) helps a ViT from scratch; pretrained ones replace it
        pos = torch.cat((torch.zeros(1, cfg.dim), sincos_2d(grid, cfg.dim)))  # [1+grid*grid, D]
        self.pos_embed = nn.Parameter(pos[None])
        self.blocks = nn.ModuleList(DinoBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def embed(self, pixels):  # [N,3,H,W] -> tokens [N,1+P,D]; positions resized as HF's are
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [N,P,D]
        gh, gw = pixels.shape[2] // self.cfg.patch_size, pixels.shape[3] // self.cfg.patch_size
        pos = self.pos_embed
        grid = int(math.sqrt(pos.shape[1] - 1))
        if (gh, gw) != (grid, grid):
            patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic",
                                      align_corners=False)  # [1,D,gh,gw]
            patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).flatten(1, 2)  # [1,gh*gw,D]
            pos = torch.cat((pos[:, :1], patch_pos), dim=1)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + pos

    def forward(self, pixels):  # [N,3,H,W] -> final-normed [N,1+P,D], HF's last_hidden_state
        x = self.embed(pixels)
        for block in self.blocks:
            x, _, _ = block(x)
        return self.norm(x)

    def patch_kv(self, pixels):
        """pixels [N,3,H,W] -> every layer's patch keys and values (k, v) [N,H,1+P,hd], what the
        glimpse reads (the last block computes its K/V only)"""
        x, kv = self.embed(pixels), []
        for block in self.blocks[:-1]:
            x, layer_kv, _ = block(x)
            kv.append(layer_kv)
        last = self.blocks[-1]
        kv.append(last.kv(last.norm1(x)))
        return kv

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32):
        path = os.path.join(model_dir, "config.json")
        hf = read_config(path, "dinov2")
        if hf.get("use_swiglu_ffn") or hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only the GELU-MLP DINOv2 (small/base/large) is supported")
        cfg = DinoConfig(image_size=hf["image_size"], patch_size=hf["patch_size"],
                         dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                         n_heads=hf["num_attention_heads"], mlp_ratio=hf.get("mlp_ratio", 4.0),
                         norm_eps=hf.get("layer_norm_eps", 1e-6))
        model = cls(cfg).to(dtype)
        state = {dino_key(k): v for k, v in read_hf_weights(model_dir).items()
                 if not k.endswith("mask_token")}
        load_strict(model, state, model_dir)
        return model


DINO_KEYS = [  # HF Dinov2Model name -> ours, applied in order
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"attention\.attention\.query\.", "q."), (r"attention\.attention\.key\.", "k."),
    (r"attention\.attention\.value\.", "v."), (r"attention\.output\.dense\.", "proj."),
    (r"attention\.([qkv])_proj\.", r"\1."),  # transformers >= 5 names
    (r"attention\.o_proj\.", "proj."),
    (r"layer_scale1\.lambda1$", "ls1"), (r"layer_scale2\.lambda1$", "ls2"),
    (r"mlp\.fc1\.", "mlp.0."), (r"mlp\.fc2\.", "mlp.2."),
    (r"^layernorm\.", "norm."),
]


def dino_key(hf_key):
    for pattern, ours in DINO_KEYS:
        hf_key = re.sub(pattern, ours, hf_key)
    return hf_key


# ----------------------------------------------------------------------------
# 4. The foveated VLM.
#
#   frame --DINOv2 once--> per-layer patch K/V (the cache)
#   query --query_input_proj--> a token through every DINOv2 layer, attending to the cache
#         --final norm, output_proj--> glimpse [D] --dino_to_llm * visual_scale--> ONE LLM token
#   LLM hidden state at frame t --llm_to_query--> the query for frame t+1 (where to look next)
#
# Shapes: B samples (clips) of T frame slots, N real frames (the entries of encode's K/V), R text
# rows (several may share a sample: `owner`), W walkers (who choose queries frame by frame), S text
# tokens, Pq question tokens (question first), P patches (1+P keys with CLS), H heads, D DINOv2
# width, L LLM width.

MODES = ("coarse_only", "coarse_fine", "autoregressive")
LAYOUTS = ("frames_first", "question_first")


def kv_index(frame_mask):  # [B,T] -> [B,T]: the entry of encode's K/V of frame (b, t), -1: none
    index = frame_mask.flatten().cumsum(0).view(frame_mask.shape) - 1
    return torch.where(frame_mask, index, -1)


def text_loss(lm_head, h, ids, loss_mask):
    """h [R,S,L] final-normed states of text rows ids [R,S] -> (logits [n,V] of the n positions
    whose next token has loss_mask != 0, in (row, position) order, only those through the head;
    their loss_mask-weighted mean CE)"""
    weight = loss_mask[:, 1:]  # [R,S-1]
    target = weight != 0
    logits = lm_head(h[:, :-1][target])  # [n,V]
    ce = F.cross_entropy(logits.float(), ids[:, 1:][target], reduction="none")
    weight = weight[target].float()
    return logits, (ce * weight).sum() / weight.sum().clamp(min=1)


class FoveatedVLM(nn.Module):
    def __init__(self, llm: SmolLM2, dino: DINOv2, visual_scale=0.14, encode_chunk=32, seed=0,
                 q_init_copies_static=True, llm_to_query_zero_init=True, layout="frames_first"):
        super().__init__()
        assert layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}"
        self.llm, self.dino = llm, dino
        self.visual_scale = visual_scale  # dino_to_llm * 0.14 matches SmolLM2's embedding std
        self.encode_chunk = encode_chunk  # frames per DINOv2 call: bounds memory on long videos
        # frames_first: [frames][chat] (the released fVLM-135M's, hence the default here);
        # question_first: [system + user][frames][answer] (train.py's embedded default)
        self.layout = layout
        D, L = dino.cfg.dim, llm.cfg.dim
        with torch.random.fork_rng(devices=[]):  # a fresh connector is the same for a given seed
            torch.manual_seed(seed)
            dtype = llm.embed_tokens.weight.dtype
            # no bias: it dominated the small query and made every glimpse's attention uniform
            self.query_input_proj = nn.Linear(D, D, bias=False, dtype=dtype)
            self.output_proj = nn.Linear(D, D, dtype=dtype)
            self.dino_to_llm = nn.Linear(D, L, dtype=dtype)
            self.llm_to_query = nn.Linear(L, D, dtype=dtype)
            # std 1, not 0.02: tiny queries gave uniform attention, i.e. identical glimpses
            self.q_static = nn.Parameter(torch.randn(1, D, dtype=dtype))
            self.q_init = nn.Parameter(torch.randn(1, D, dtype=dtype))
            # the fine pass may start as the coarse pass (every query = q_static): random
            # LLM-chosen queries at init kept a from-scratch model blind
            if q_init_copies_static:
                self.q_init.data.copy_(self.q_static.data)
            if llm_to_query_zero_init:
                nn.init.zeros_(self.llm_to_query.weight)
                self.llm_to_query.bias.data.copy_(self.q_static.data[0])

    # -- the glimpse -------------------------------------------------------------------------------

    def encode(self, frames, frame_mask=None):
        """frames [B,T,3,px,px] -> per-layer (k, v) [N,H,1+P,hd] of the N real frames in (b, t)
        order: one DINOv2 pass that every mode, question and call can reuse"""
        real = frames.flatten(0, 1) if frame_mask is None else frames[frame_mask]  # [N,3,H,W]
        chunks = [self.dino.patch_kv(real[i:i + self.encode_chunk])  # N=0 (text only): empty
                  for i in range(0, max(real.shape[0], 1), self.encode_chunk)]
        return [(torch.cat([c[layer][0] for c in chunks]), torch.cat([c[layer][1] for c in chunks]))
                for layer in range(len(self.dino.blocks))]

    def glimpse(self, queries, kv):
        """queries [N,Q,D] for the N frames of kv -> (glimpse tokens [N,Q,D], attention
        [N,Q,layers,H,1+P]). Each query is an extra token through every DINOv2 block, attending
        to that layer's cached K/V (CLS included) only, not to its frame's other queries."""
        x, maps = self.query_input_proj(queries), []  # [N,Q,D]
        for block, layer_kv in zip(self.dino.blocks, kv):
            x, _, weights = block(x, layer_kv)
            maps.append(weights)  # [N,H,Q,1+P]
        return self.output_proj(self.dino.norm(x)), torch.stack(maps, 1).permute(0, 3, 1, 2, 4)

    def look(self, queries, kv, kv_entries):
        """queries [R,T,D]: row r's query for frame t; kv_entries [R,T]: the kv entry holding that
        frame (-1: padding) -> LLM tokens [R,T,L] (meaningless at padding) and attention
        [R,T,layers,H,1+P]. Rows sharing a frame look at it in one glimpse: its K/V is read once."""
        real = kv_entries >= 0  # [R,T]
        frame = kv_entries[real]  # [M]: the frame each of the M real queries looks at
        # Pack the M queries into [N frames, Q slots]: a frame's queries take its slots 0,
        # 1, 2, ... Sorting groups each frame's queries; a query's slot is its distance from
        # its group's start. E.g. frame = [5, 2, 5] -> sorted [2, 5, 5], group starts [0, 1, 1],
        # slots [0, 0, 1] in sorted order -> [0, 0, 1] for the queries as given.
        order = frame.argsort(stable=True)
        sorted_frames = frame[order]
        group_start = torch.searchsorted(sorted_frames, sorted_frames)  # [M], in sorted order
        slot = torch.empty_like(frame)
        slot[order] = torch.arange(len(frame), device=frame.device) - group_start  # [M]
        n_slots = int(slot.max()) + 1 if len(slot) else 1
        packed = queries.new_zeros(kv[0][0].shape[0], n_slots, queries.shape[-1])  # [N,Q,D]
        packed[frame, slot] = queries[real]
        glimpses, attn = self.glimpse(packed, kv)  # [N,Q,D], [N,Q,layers,H,1+P]
        # Unpack back to the rows' [R,T] grid
        tokens = glimpses.new_zeros(*kv_entries.shape, glimpses.shape[-1])  # [R,T,D]
        maps = attn.new_zeros(*kv_entries.shape, *attn.shape[2:])  # [R,T,layers,H,1+P]
        tokens[real], maps[real] = glimpses[frame, slot], attn[frame, slot]
        return self.dino_to_llm(tokens) * self.visual_scale, maps

    # -- the three modes ---------------------------------------------------------------------------
    # owner [R]: the sample (row of frame_mask) of each text row; None: row r is sample r.
    # question: (ids [R,Pq] left-padded, valid [R,Pq] or None) in the question-first layout, else
    # None (frames first). Frame 0's query: the LLM's choice after the question, or q_init.
    # W walkers choose the queries: one per text row whenever the pass that chooses them reads the
    # row's own tokens (its question; or its text, in coarse_fine's coarse pass trained to answer);
    # else one per sample serves all its rows (frames first: text after the frames cannot change
    # the walk).

    def sequence(self, question, visual, visual_valid, text=None):
        """visual [R,T,L] (visual_valid [R,T]) and text embeddings [R,S,L] or None -> the LLM's
        input [R,Pq+T+S,L] of [question][visual][text] and its valid mask [R,Pq+T+S]. Text
        padding is at the end, where causal attention makes it harmless."""
        parts, masks = [visual], [visual_valid]
        if question is not None:
            ids, valid = question
            parts.insert(0, self.llm.embed_tokens(ids))
            masks.insert(0, valid if valid is not None else torch.ones_like(ids, dtype=torch.bool))
        if text is not None:
            parts.append(text)
            masks.append(torch.ones(text.shape[:2], dtype=torch.bool, device=text.device))
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def static_tokens(self, kv, frame_mask):
        """Every frame looked at with q_static (coarse_only, and coarse_fine's coarse pass): visual
        tokens [B,T,L], attention [B,T,layers,H,1+P]"""
        return self.look(self.q_static.expand(*frame_mask.shape, -1), kv, kv_index(frame_mask))

    def visual_tokens(self, kv, frame_mask, mode, owner=None, question=None, text=None):
        """coarse_only / coarse_fine: (visual tokens [R,T,L], their attention, the coarse pass's
        final states over `text` [R,S,L] or None). With text, coarse_fine's coarse pass reads
        [question][static glimpses][text], so it can be trained to answer from those too."""
        T = frame_mask.shape[1]
        # [B,...] per sample -> [R,...] per text row
        to_rows = (lambda x: x) if owner is None else (lambda x: x[owner])  # noqa: E731
        static, attn = self.static_tokens(kv, frame_mask)  # [B,T,L]
        if mode == "coarse_only" or T == 0:
            return to_rows(static), to_rows(attn), None
        # The coarse pass reads the static glimpses and chooses where to look in each frame: a
        # walker per sample, unless it reads a question or text
        per_row = question is not None or text is not None
        to_walkers = to_rows if per_row else (lambda x: x)  # noqa: E731
        embeds, valid = self.sequence(question, to_walkers(static), to_walkers(frame_mask), text)
        h = self.llm(embeds=embeds, valid=valid, hidden_only=True)  # [W,Pq+T(+S),L]
        Pq = 0 if question is None else question[0].shape[1]
        # frame t's query comes from the state after frame t-1 (frame 0's: after the question)
        if question is None:
            first = self.q_init.expand(len(h), 1, -1)  # [W,1,D]
            queries = torch.cat((first, self.llm_to_query(h[:, :T - 1])), 1)  # [W,T,D]
        else:
            queries = self.llm_to_query(h[:, Pq - 1:Pq + T - 1])  # [W,T,D]
        fine, attn = self.look(queries, kv, to_walkers(kv_index(frame_mask)))  # [W,T,L]
        if not per_row:
            fine, attn = to_rows(fine), to_rows(attn)
        return fine, attn, (h[:, Pq + T:] if text is not None else None)

    def start_walk(self, question, walkers, room):
        """A cache for W walkers holding the question, with `room` more; frame 0's query [W,D]"""
        if question is None:
            return self.llm.new_cache(walkers, room), self.q_init.expand(walkers, -1)
        cache = self.llm.new_cache(walkers, question[0].shape[1] + room)
        h = self.llm(question[0], valid=question[1], cache=cache, hidden_only=True)  # [W,Pq,L]
        return cache, self.llm_to_query(h[:, -1])

    def walk(self, kv, kv_entries, cache, query):
        """autoregressive: frame by frame through the LLM cache, each query chosen by the state
        after the frame before. kv_entries [W,T]: each walker's kv entries (-1: padding); query
        [W,D]: the first. -> attention [W,T,layers,H,1+P], the next query (a stream goes on)"""
        maps = []
        for t in range(kv_entries.shape[1]):
            frame = kv_entries[:, t]  # [W]: each walker's frame at step t
            # look() glimpses every kv entry it is given: pass only the U frames this step reads
            used = frame[frame >= 0].unique()  # [U], sorted
            # [W]: each walker's index into `used`, -1 for padding
            local = torch.where(frame >= 0, torch.searchsorted(used, frame.clamp(min=0)), -1)
            used_kv = [(k[used], v[used]) for k, v in kv]
            tokens, attn = self.look(query[:, None], used_kv, local[:, None])  # [W,1,L]
            h = self.llm(embeds=tokens, valid=frame[:, None] >= 0, cache=cache, hidden_only=True)
            query = self.llm_to_query(h[:, 0])
            maps.append(attn)
        return (torch.cat(maps, 1) if maps else None), query

    def walked_cache(self, kv, frame_mask, owner=None, question=None, extra=0):
        """autoregressive: (a cache per text row holding [question][T walked visual tokens], with
        room for `extra` more tokens; attention [R,T,layers,H,1+P])"""
        kv_entries = kv_index(frame_mask)  # [B,T]
        if question is not None and owner is not None:
            kv_entries = kv_entries[owner]  # [R,T]
        W, T = kv_entries.shape
        cache, query = self.start_walk(question, W, T + extra)
        attn, _ = self.walk(kv, kv_entries, cache, query)
        if question is None and owner is not None:  # each row continues its sample's walk
            return cache.copy_rows(owner), (attn[owner] if T else None)  # no frames: no maps
        return cache, attn

    @torch.no_grad()
    def stream(self, chunks, n_frames, prompt_ids, extra=0, prompt_valid=None, question=None,
               on_frames=None):
        """prefill(..., 'autoregressive') for a video too long to hold: `chunks` yields frames
        [n,3,H,W], each encoded, walked and freed before the next (at most n_frames in all), then
        prompt_ids [R,S] (left-padded: prompt_valid) -> (cache, last logits [R,V]).
        on_frames(frames, attention [W,n,layers,H,1+P]) sees each chunk."""
        R = prompt_ids.shape[0]
        walkers = 1 if question is None else R
        room = n_frames + prompt_ids.shape[1] + extra
        cache, query = self.start_walk(question, walkers, room)
        frames_end = cache.length + n_frames  # after the question, if any
        for pixels in chunks:  # [n,3,H,W]
            if cache.length + pixels.shape[0] > frames_end:
                raise ValueError(f"model.stream: more frames came than the {n_frames} announced")
            kv = self.encode(pixels[None].to(query.dtype))
            kv_entries = torch.arange(pixels.shape[0], device=query.device)
            kv_entries = kv_entries.expand(walkers, -1)  # [W,n]: every walker reads every frame
            with self.llm.batch1_step() if walkers == 1 else nullcontext():
                attn, query = self.walk(kv, kv_entries, cache, query)
            if on_frames is not None:
                on_frames(pixels, attn)
            del kv, attn  # this chunk's K/V go now, not when the next chunk's arrive
        if walkers < R:  # frames first: every prompt row continues the one walk
            cache = cache.copy_rows(torch.zeros(R, dtype=torch.long, device=query.device))
        h = self.llm(prompt_ids, valid=prompt_valid, cache=cache, hidden_only=True)
        return cache, self.llm.lm_head(h[:, -1])

    def forward(self, frames, input_ids, loss_mask=None, frame_mask=None, mode="coarse_fine",
                kv=None, owner=None, question_ids=None, question_valid=None,
                coarse_loss_weight=0.0):
        """frames [B,T,3,px,px] (frame_mask [B,T]: real frames, a prefix per row; None: all real),
        text rows input_ids [R,S] right-padded, question_ids [R,Pq] left-padded (question_valid)
        or None; kv=self.encode(...) reuses an encode. Returns text logits [R,S,V] and None, or
        with loss_mask text_loss's logits [n,V] and loss, plus coarse_loss_weight x the loss of the
        static glimpses (coarse_fine: its coarse pass; autoregressive: one more pass)."""
        assert mode in MODES, f"mode must be one of {MODES}, got {mode!r}"
        S = input_ids.shape[1]
        if frame_mask is None:
            frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=input_ids.device)
        if kv is None:
            kv = self.encode(frames, frame_mask)
        question = None if question_ids is None else (question_ids, question_valid)
        coarse_h = None  # the coarse pass's states over the text, when it answers too
        row_frame_mask = frame_mask if owner is None else frame_mask[owner]  # [R,T]
        if mode == "autoregressive":
            cache, _ = self.walked_cache(kv, frame_mask, owner, question, extra=S)
            h = self.llm(input_ids, cache=cache, hidden_only=True)
            if coarse_loss_weight and loss_mask is not None:  # the static glimpses answer too
                static, _ = self.static_tokens(kv, frame_mask)  # [B,T,L]
                if owner is not None:
                    static = static[owner]  # [R,T,L]
                embeds, valid = self.sequence(question, static, row_frame_mask,
                                              self.llm.embed_tokens(input_ids))
                coarse_h = self.llm(embeds=embeds, valid=valid, hidden_only=True)[:, -S:]
        else:
            text = self.llm.embed_tokens(input_ids)  # [R,S,L]
            coarse_answers = coarse_loss_weight and mode == "coarse_fine" and loss_mask is not None
            vis, _, coarse_h = self.visual_tokens(kv, frame_mask, mode, owner, question,
                                                  text if coarse_answers else None)  # [R,T,L]
            embeds, valid = self.sequence(question, vis, row_frame_mask, text)
            h = self.llm(embeds=embeds, valid=valid, hidden_only=True)[:, -S:]
        if loss_mask is None:
            return self.llm.lm_head(h), None
        logits, loss = text_loss(self.llm.lm_head, h, input_ids, loss_mask)
        if coarse_h is not None:
            coarse_loss = text_loss(self.llm.lm_head, coarse_h, input_ids, loss_mask)[1]
            loss = loss + coarse_loss_weight * coarse_loss
        return logits, loss

    @torch.no_grad()
    def prefill(self, kv, frame_mask, prompt_ids, mode, extra=0, prompt_valid=None, question=None):
        """A fresh LLM cache holding [question][visual][prompt_ids] (prompt_ids [B,S], left-padded
        when prompt_valid is given), with room for `extra` more tokens. Returns (cache, last
        logits [B,V], attention maps)."""
        B, T = frame_mask.shape
        if mode == "autoregressive":
            extra = prompt_ids.shape[1] + extra
            cache, attn = self.walked_cache(kv, frame_mask, None, question, extra)
        else:
            vis, attn, _ = self.visual_tokens(kv, frame_mask, mode, None, question)
            embeds, valid = self.sequence(question, vis, frame_mask)
            cache = self.llm.new_cache(B, embeds.shape[1] + prompt_ids.shape[1] + extra)
            self.llm(embeds=embeds, valid=valid, cache=cache, hidden_only=True)
        h = self.llm(prompt_ids, valid=prompt_valid, cache=cache, hidden_only=True)
        return cache, self.llm.lm_head(h[:, -1]), attn

    def configure_optimizers(self, weight_decay, lrs, betas=(0.9, 0.95), decay="matrices",
                             output_proj_group="connector"):
        """AdamW with a group per part, each with its LR from `lrs`: 'connector' (the rest), 'steer'
        (llm_to_query, q_init), 'dino', 'dino_qk' (DINOv2's q/k projections), 'llm'.
        decay='matrices': only Linear and Conv2d weights decay; 'all': every parameter.
        output_proj_group: output_proj's group. ('all', 'dino': as the original fVLM code.)"""
        matrices = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        matrices.discard(id(self.llm.embed_tokens.weight))  # the tied lm_head is the embedding
        groups = {}
        for name, p in self.named_parameters():  # tied weights are listed once
            part = name.split(".")[0] if name.startswith(("dino.", "llm.")) else "connector"
            if part == "dino" and name.split(".")[-2] in ("q", "k"):
                part = "dino_qk"  # where patches and glimpses look: may learn faster than the rest
            if name.startswith(("llm_to_query.", "q_init")):
                part = "steer"
            if name.startswith("output_proj."):
                part = output_proj_group
            decays = decay == "all" or id(p) in matrices
            if (part, decays) not in groups:
                groups[part, decays] = {"params": [], "name": part, "decays": decays,
                                        "base_lr": lrs[part], "lr": lrs[part],
                                        "weight_decay": weight_decay if decays else 0.0}
            groups[part, decays]["params"].append(p)
        # fused AdamW runs on CUDA and, in recent PyTorch, on CPU too
        return torch.optim.AdamW(list(groups.values()), betas=betas, fused=True)

    # -- our checkpoint format: model.safetensors + config.json (+ tokenizer.json) -----------

    def save(self, out_dir, tokenizer=None):  # tokenizer: a tokenizer.json to copy alongside
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (k == "llm.lm_head.weight" and self.llm.cfg.tie_embeddings)}
        save_file(state, os.path.join(out_dir, "model.safetensors"))
        cfg = {"model_type": "nanofvlm", "llm": asdict(self.llm.cfg), "dino": asdict(self.dino.cfg),
               "fovea": {"visual_scale": self.visual_scale, "encode_chunk": self.encode_chunk,
                         "layout": self.layout}}
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.json"))

    def load_weights(self, file):  # a safetensors file of ours or of the released fVLM-135M
        state = {vlm_key(k): v for k, v in read_weights(file).items()
                 if not k.endswith("mask_token")}  # in HF's Dinov2Model, unused
        llm = llm_state({k[4:]: v for k, v in state.items() if k.startswith("llm.")}, self.llm.cfg)
        state = {k: v for k, v in state.items() if not k.startswith("llm.")}
        state |= {"llm." + k: v for k, v in llm.items()}
        load_strict(self, state, file)


def vlm_key(key):
    """A key of our format or of the released fVLM-135M layout (`encoder.dino.` + HF Dinov2Model
    keys, `encoder.` + connector, `llm.model.` + HF Llama keys) -> ours, without compile's
    `._orig_mod`."""
    key = re.sub(r"(^|\.)_orig_mod\.", r"\1", key)
    if key.startswith("encoder.dino."):
        return "dino." + dino_key(key.removeprefix("encoder.dino."))
    if key.startswith("encoder."):
        return key.removeprefix("encoder.")
    if key.startswith("llm.model."):
        return "llm." + key.removeprefix("llm.model.")
    return key


# ----------------------------------------------------------------------------
# 5. the one loader


def find_checkpoint(path):
    """A checkpoint dir as given, or the newest step-* in it or in its ckpt/ (train.py's out_dir).
    Half-written saves (.tmp-*) are never picked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (init_from takes our checkpoint dir, "
                                f"a run's out_dir, a .safetensors file or 'scratch')")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    steps = glob.glob(os.path.join(path, "step-*"))
    steps = sorted(steps or glob.glob(os.path.join(path, "ckpt", "step-*")))
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoint here (no model.safetensors, no step-* "
                                f"dirs). Run `python train.py` first, or point at a checkpoint dir")
    return steps[-1]


def load_model(init_from, llm_dir="", dino_dir="", dtype=torch.float32, **fresh):
    """The model every script starts from. init_from: a checkpoint of ours (find_checkpoint; needs
    nothing else), a .safetensors file (the released fVLM-135M or ours) over llm_dir + dino_dir
    (Hugging Face SmolLM2 / DINOv2 dirs), or 'scratch': those with a fresh connector (`fresh` goes
    to FoveatedVLM). Returns (model, the tokenizer.json that belongs to it)."""
    if init_from and init_from != "scratch" and not os.path.isfile(init_from):
        ckpt = find_checkpoint(init_from)
        cfg = read_config(os.path.join(ckpt, "config.json"), "nanofvlm")
        llm, dino = SmolLM2(LLMConfig(**cfg["llm"])), DINOv2(DinoConfig(**cfg["dino"]))
        model = FoveatedVLM(llm, dino, **cfg["fovea"])
        model.to(dtype).load_weights(os.path.join(ckpt, "model.safetensors"))
        return model, os.path.join(ckpt, "tokenizer.json")
    if not (llm_dir and dino_dir):
        what = f"={init_from!r}" if init_from in ("scratch", "") else f"={init_from}, a file"
        raise ValueError(f"init_from{what}: set llm_dir and dino_dir too (a SmolLM2 and a DINOv2 "
                         f"Hugging Face dir)")
    llm = SmolLM2.from_pretrained(llm_dir, dtype)
    model = FoveatedVLM(llm, DINOv2.from_pretrained(dino_dir, dtype), **fresh)
    if init_from != "scratch":
        model.load_weights(init_from)
    return model, os.path.join(llm_dir, "tokenizer.json")


# ----------------------------------------------------------------------------
# 6. generation


def sample_next(logits, temperature=0.0, top_k=None, generator=None):  # [B,V] -> [B]; 0: greedy
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# token 2 is SmolLM2's <|im_end|>: the end of a turn, and our padding (data.PAD_ID)
@torch.no_grad()
def generate(llm, cache, logits, max_new_tokens, temperature=0.0, top_k=None, stop_id=2,
             generator=None):
    """Continue from a filled cache whose last position gave `logits` [B,V]: yields next tokens [B]
    step by step; a finished row keeps emitting stop_id. Needs room for max_new_tokens - 1 more."""
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator).masked_fill(done, stop_id)
        yield token
        done |= token == stop_id
        if done.all() or step == max_new_tokens - 1:
            return
        with llm.batch1_step() if token.shape[0] == 1 else nullcontext():
            logits = llm(token[:, None], cache=cache)[:, -1]


def left_pad(prompts, device, pad_id=2):
    """Prompts (lists of ids) -> ids [B,S] left-padded, so every prompt ends where generation
    starts, and the valid mask [B,S] (None when no row is padded)."""
    S = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (S - len(p)) + list(p) for p in prompts], device=device)
    valid = torch.tensor([[False] * (S - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, None if valid.all() else valid


def compile_model(model, dynamic=True, backend="inductor"):
    """torch.compile every DINOv2 block, every LLM block's project / attend (the KV cache write
    between them would recompile per layer and length) and FoveatedVLM.glimpse. dynamic=True:
    frame counts and lengths are symbolic from the start, so varying shapes reuse the graphs."""
    opts = dict(dynamic=dynamic, backend=backend)
    for block in model.dino.blocks:
        block.compile(**opts)
    for block in model.llm.layers:
        block.project = torch.compile(block.project, **opts)
        block.attend = torch.compile(block.attend, **opts)
    model.glimpse = torch.compile(model.glimpse, **opts)
    return model


