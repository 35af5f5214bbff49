"""
FLOPs and MFU: the analytic FLOPs of a training step in every mode (train_flops, checked against
torch's FLOP counter in tests/test_bench.py), the peak FLOP/s of the device, and their ratio.
"""
import re
import time

import torch

from perf.platform import native_bf16

# Dense TFLOPS without sparsity, from the vendors' datasheets (GeForce: bf16 with fp32 accumulate):
# (bf16 tensor core, tf32 tensor core, fp32). A GPU not here gets no MFU rather than a wrong one.
GPU_PEAK = {
    "H100": (989, 495, 67), "H100 PCIe": (756, 378, 51), "H100 NVL": (835, 418, 60),
    "H200": (989, 495, 67), "H200 NVL": (835, 418, 60), "B200": (2250, 1125, 75),
    "A100": (312, 156, 19.5), "A10G": (70, 35, 31.2), "L4": (121, 60, 30.3),
    "L40S": (362, 183, 91.6), "RTX 4090": (165.2, 82.6, 82.6)}
_cpu_peak = {}


def gpu_peak(name, dtype, tf32):
    """Dense peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name) for matmuls in
    `dtype` (fp32 at the TF32 rate if `tf32`); None for a GPU not in GPU_PEAK."""
    # a whole word of the name, longest key first: "H100 PCIe" before "H100"
    for key in sorted(GPU_PEAK, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, re.IGNORECASE):
            bf16, tf32_peak, fp32 = GPU_PEAK[key]
            half = dtype in (torch.bfloat16, torch.float16)
            return (bf16 if half else tf32_peak if tf32 else fp32) * 1e12
    return None


def peak_flops(device="cpu", dtype=torch.float32):
    """Peak FLOP/s for MFU: GPU_PEAK's for a GPU (None if unknown), a measured matmul peak on CPU"""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # fp32 matmuls run as TF32 if set_float32_matmul_precision or the flag allows it
        tf32 = (torch.get_float32_matmul_precision() != "highest"
                or torch.backends.cuda.matmul.allow_tf32)
        peak = gpu_peak(name, dtype, tf32)
        if peak is None:
            print(f"perf/flops.py: no peak FLOP/s for {name!r} (add it to GPU_PEAK): "
                  f"MFU not reported")
        return peak
    if dtype not in _cpu_peak:  # 2048^2: smaller matmuls fall short of the peak
        emulated = dtype != torch.float32 and not native_bf16(device)
        n = 512 if emulated else 2048  # emulated bf16 is too slow for 2048^2
        a = torch.randn(n, n, dtype=dtype)
        a @ a
        best = float("inf")
        for _ in range(5):  # best of 5: the machine may be shared
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        _cpu_peak[dtype] = 2 * n ** 3 / best
    return _cpu_peak[dtype]


def mfu(flops, seconds, peak):
    """Model FLOPs utilisation; None without a known peak, or above 1: a CPU peak measured while
    other jobs ran is too low, and the ratio then means nothing."""
    ratio = None if peak is None else flops / seconds / peak
    return ratio if ratio is not None and ratio <= 1 else None


def batch_flops(model, batch, mode, reference=False, coarse_answers=False):
    """train_flops of one collated batch (data.collate), its lm_head on the positions with loss."""
    frames, ids = batch["frames"], batch["input_ids"]
    question = batch.get("question_ids", ids[:, :0])  # [R,Pq]; frames first: an empty [R,0]
    targets_per_row = int(batch["loss_mask"][:, 1:].ne(0).sum()) / len(ids)
    return train_flops(model, *frames.shape[:2], ids.shape[1], frames.shape[-1], mode,
                       len(ids) / len(frames), reference, question.shape[1], targets_per_row,
                       coarse_answers)


def train_flops(model, B, T, S, image_size, mode="coarse_fine", rows_per_sample=1, reference=False,
                question_len=0, targets=None, coarse_answers=False):
    """Analytic FLOPs of one training step: forward + backward (2x the forward), plus a frozen
    reference's forward (DPO). The forward in `mode` of B samples of T frames with rows_per_sample
    text rows of S tokens each (DPO: 2): DINOv2, glimpses, LLM and lm_head on `targets` positions
    per row (None: all S). question_len > 0: question first.
    coarse_answers: coarse_loss_weight > 0."""
    d, lc = model.dino.cfg, model.llm.cfg
    D, P, L = d.dim, (image_size // d.patch_size) ** 2, lc.dim
    mlp = 2 * 2 * D * int(D * d.mlp_ratio)  # per token
    block = (P + 1) * (2 * 4 * D * D + mlp + 2 * 2 * (P + 1) * D)
    frame = P * 2 * 3 * d.patch_size ** 2 * D + (d.n_layers - 1) * block + (P + 1) * 2 * 2 * D * D
    # a glimpse: query_input_proj, each layer's q/proj, attention over 1+P keys and MLP, then
    # output_proj and dino_to_llm
    glimpse = 2 * 2 * D * D + d.n_layers * (2 * 2 * D * D + 2 * 2 * (P + 1) * D + mlp) + 2 * D * L
    q, kv = lc.n_heads * lc.head_dim, lc.n_kv_heads * lc.head_dim

    def llm(n):  # n tokens under causal attention: token i attends to i + 1 keys
        per_token = 2 * L * (2 * q + 2 * kv) + 2 * 3 * L * lc.hidden_dim  # projections + MLP
        return lc.n_layers * (n * per_token + 2 * 2 * q * n * (n + 1) / 2)
    R, Q = B * rows_per_sample, question_len
    coarse_answers = coarse_answers and mode != "coarse_only"
    # who chooses the queries: each text row if the choosing pass reads the row's question (or, in
    # coarse_fine, its answer), else each sample (FoveatedVLM.visual_tokens, walked_cache)
    walkers = R if Q or (coarse_answers and mode == "coarse_fine") else B
    # coarse_fine's first pass; autoregressive's extra pass over the static glimpses
    coarse = R * llm(Q + T + S) if coarse_answers else walkers * llm(Q + T)
    static_answers = R * llm(Q + T + S) if coarse_answers else 0
    text = {"coarse_only": R * llm(Q + T + S),
            "coarse_fine": coarse + R * llm(Q + T + S),
            "autoregressive": walkers * llm(Q + T) + R * (llm(Q + T + S) - llm(Q + T))
            + static_answers}[mode]
    # static glimpses (B*T) for coarse_only / coarse_fine, steered ones (walkers*T) for the others
    glimpses = {"coarse_only": B * T, "coarse_fine": B * T + walkers * T,
                "autoregressive": walkers * T + B * T * coarse_answers}[mode]
    steer = 0 if mode == "coarse_only" else walkers * T * 2 * L * D  # llm_to_query
    head = (1 + coarse_answers) * R * (S if targets is None else targets) * 2 * L * lc.vocab_size
    forward = B * T * frame + glimpses * glimpse + steer + text + head
    return (3 + reference) * forward
