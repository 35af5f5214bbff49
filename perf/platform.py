"""
The CPU and GPU switches that measured faster (the numbers are in docs/LOG.md), kept out of the
model: setup(device) sets the process-wide ones once at start-up, tune(model) sets the two hooks
model.SmolLM2 offers. Without them everything runs, slower.
"""
import ctypes
from contextlib import contextmanager

import torch


def setup(device):
    """Once at start-up. CUDA: fp32 matmuls and convolutions on TF32 tensor cores (Ampere and
    later; a 10-bit mantissa in matmul inputs). CPU: glibc keeps freed blocks in the heap instead
    of giving them back and page-faulting them in again on the next step (no effect off glibc)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MB


def tune(model):
    """The model's hooks, once its device and dtype are final. On a CPU: batch-1 generation steps
    run with oneDNN off (ATen's own bf16 GEMV is faster), and bf16 weights without AMX keep a
    float32 KV cache (bf16 attention over a long cache is many times slower there)."""
    llm = model.llm
    weight = llm.embed_tokens.weight
    if weight.device.type == "cpu":
        llm.batch1_step = onednn_off
        slow_bf16_cache = weight.dtype == torch.bfloat16 and not cpu_amx()
        llm.cache_dtype = torch.float32 if slow_bf16_cache else None
    return model


@contextmanager
def onednn_off():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def cpu_amx():
    """Whether this CPU has AMX bf16 tiles (Intel Xeon since Sapphire Rapids): fast bf16 kernels"""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", dict)()  # private: may go
    return bool(capability.get("amx_bf16"))


def native_bf16(device):
    """Whether bf16 matmuls run natively: on GPUs and on CPUs with AVX512-BF16 / AMX."""
    return torch.device(device).type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_slow_bf16(device, dtype, where):
    """Warn (once, at start-up) of half precision on a CPU without native bf16 matmuls: emulated,
    many times slower than fp32."""
    half = dtype in ("bfloat16", "float16", torch.bfloat16, torch.float16)
    if half and not native_bf16(device):
        cpu = torch.backends.cpu.get_cpu_capability()
        print(f"{where}: warning: this CPU ({cpu}) has no native bf16 "
              f"matmul, so {dtype} runs many times slower than float32 here: pass --dtype=float32")


def compile_counts():
    """Graphs torch.compile has captured in this process (one per compile or recompile) and graph
    breaks (a hot-path break means eager code between graphs)."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}
