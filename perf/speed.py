"""
The speed lab's step timer (what nanoGPT's bench.py is for): seconds per stage-2 train step per
frame count and dtype (samples/s, tokens/s, MFU, peak memory, graphs compiled), the loader, DPO's
step against stage 2's, decode tokens/s and MCQ questions/s.

    python -m perf.speed --llm_dir=checkpoints/SmolLM2-135M-Instruct   # the 135M shape
    python -m perf.speed --device=cuda --compile=True --speed_frames=8,16,64 --llm_dir=DIR

Without llm_dir it times init_from (the embedded default's checkpoint). Prints one JSON report.
"""
import json
import os
import tempfile
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from PIL import Image

from bench import MODES, LoadedQuestion, new_item, prefill_users, score_batch
from data import DEFAULT_USER, ShardDataset, load_tokenizer, make_loader, write_tar
from model import (DinoConfig, DINOv2, FoveatedVLM, LLMConfig, SmolLM2, compile_model, generate,
                   load_model)
from perf.flops import mfu, peak_flops, train_flops
from perf.platform import compile_counts, native_bf16, setup, tune
from tasks.shapes import jpg

# config keys (configurator.py): the model is SmolLM2 from llm_dir (random weights of the 135M
# shape without it) with a random DINOv2-small, or init_from's checkpoint when llm_dir is ''
init_from = 'out/shapes'
llm_dir = ''
device = 'cuda' if torch.cuda.is_available() else 'cpu'
image_size = 0  # 0 = 224 with llm_dir, else the checkpoint's
speed_dtypes = ''  # '' = float32,bfloat16 on CPU (float32 without native bf16); bfloat16 on CUDA
speed_batch = 0  # 0 = 2 on CPU; on CUDA the per-GPU batch_size of `speed_recipe`
speed_recipe = 'config/stage2_135m.py'
speed_frames = '8'  # frame counts to time the step at, comma-separated
speed_text = 64  # text tokens per sample
speed_steps = 3  # timed steps per dtype, after 2 warm-up steps
speed_loader = True  # also time data.py's loader on synthetic shards at the step's shape
compile = False  # the step through model.compile_model, as train.py --compile=True
compile_dynamic = True
compile_backend = 'inductor'
if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configurator.py")).read())


def _peak_rss():
    """The process's peak RSS in bytes, 0 without /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


@contextmanager
def peak_memory(device):
    """Yields a dict that gets the block's peak memory and growth in MB (on CPU the peak RSS: where
    it cannot be reset, only the growth is the block's own)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
    mem = {}
    base = torch.cuda.memory_allocated() if cuda else _peak_rss()
    yield mem
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    mem.update(peak_mem_mb=peak / 2 ** 20, mem_growth_mb=(peak - base) / 2 ** 20)


def timed(fn, device):
    """Seconds of one call of fn (after the device has finished)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median(xs):
    return sorted(xs)[len(xs) // 2]


def median_times(fns, device, rounds):
    """{name: median seconds} of the named fns, interleaved so that load from other jobs on a shared
    machine hits each alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: median(t) for name, t in times.items()}


def train_speed(model, batch, device, dtypes, steps, mode="coarse_fine"):
    """Per dtype: seconds per stage-2 train step (forward, backward, fused AdamW), the loss before
    any update (same weights and batch), peak memory of the warm-up steps."""
    groups = ("connector", "steer", "dino", "dino_qk", "llm")
    opt = model.configure_optimizers(0.01, dict.fromkeys(groups, 1e-5))
    model.train()

    def step(name, update=True):
        bf16 = name == "bfloat16"
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(batch["frames"], batch["input_ids"], batch["loss_mask"], mode=mode)
        if update:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()
    with torch.no_grad():
        report = {name: {"loss": step(name, update=False)} for name in dtypes}
    # warm-up: the first two steps build the optimizer state and the allocator's pools
    for name in dtypes:
        with peak_memory(device) as mem:
            step(name)
            step(name)
        report[name].update(mem)
    seconds = median_times({name: partial(step, name) for name in dtypes}, device, steps)
    for name in dtypes:
        report[name]["step_s"] = seconds[name]
    return report


def dpo_speed(model, batch, device, rounds=3):
    """DPO step / stage-2 step (forward + backward) on the same batch, with the live reference and
    with a precomputed one; the rejected answers are the batch's texts shifted."""
    import dpo
    frames, ids, loss_mask = batch["frames"], batch["input_ids"], batch["loss_mask"]
    B = len(frames)

    def two(chosen, rejected):  # rows chosen_0, rejected_0, chosen_1, ...
        return torch.stack((chosen, rejected), 1).flatten(0, 1)
    pair = {"frames": frames,
            "frame_mask": torch.ones(frames.shape[:2], dtype=torch.bool, device=device),
            "keys": [str(i) for i in range(B)],
            "owner": torch.arange(B, device=device).repeat_interleave(2),
            "input_ids": two(ids, ids.roll(1, 1)),
            "loss_mask": two(loss_mask, loss_mask)}
    ref = dpo.make_reference(model)
    table = dict(zip(pair["keys"], dpo.reference_logps(ref, pair, "coarse_fine")))
    losses = {"stage2": lambda: model(frames, ids, loss_mask)[1],
              "dpo": lambda: dpo.batch_loss(model, ref, pair)[0],
              "dpo_precomputed": lambda: dpo.batch_loss(model, table, pair)[0]}

    def step(name):
        losses[name]().backward()
        model.zero_grad(set_to_none=True)
    for name in losses:  # warm-up
        step(name)
    seconds = median_times({name: partial(step, name) for name in losses}, device, rounds)
    return {"dpo_over_stage2": seconds["dpo"] / seconds["stage2"],
            "dpo_precomputed_over_stage2": seconds["dpo_precomputed"] / seconds["stage2"]}


def recipe_keys(path):
    """The keys a config file sets, run in the repo dir (a recipe execs its parent by path)."""
    keys, here = {}, os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        exec(open(path).read(), {}, keys)
    finally:
        os.chdir(here)
    return keys


def loader_speed(tok, B, T, size, workers, pin, batches=4):
    """Samples/s of data.py's loader as train.py makes it, on synthetic shards of B samples of T
    jpg frames, after the first batch (worker start-up)."""
    rng = np.random.default_rng(0)

    def block_image():  # random 8x8 blocks: smoother than noise, so it compresses like a photo
        blocks = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3))
        return np.kron(blocks, np.ones((8, 8, 1)))[:size, :size].astype(np.uint8)
    frames = [jpg(Image.fromarray(block_image())) for _ in range(T)]
    text = {"user": "What happens in the video?", "assistant": "A ball moves from left to right."}
    sample = {"json": text, **{f"{t:03d}.jpg": f for t, f in enumerate(frames)}}
    with tempfile.TemporaryDirectory() as d:
        for j in range(max(batches + 1, workers)):
            write_tar(os.path.join(d, f"s{j}.tar"), ((f"k{j}x{i}", sample) for i in range(B)))
        ds = ShardDataset([os.path.join(d, "*.tar")], tok, stage=2, image_size=size, max_frames=T,
                          loop=True, shuffle_buffer=B)
        it = iter(make_loader(ds, B, workers, pin_memory=pin))
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        it.close()  # the workers stop before their shards go
    return B * batches / seconds


def decode_speed(model, tok, frames, device, n=32):
    """Tokens/s of n greedy tokens after the prompt of a video's frames [1,T,3,S,S]."""
    mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=device)
    with torch.no_grad():
        kv = model.encode(frames, mask)

    def run(n=n):
        cache, last, _ = prefill_users(model, tok, kv, mask, [DEFAULT_USER], "autoregressive", n)
        for _ in generate(model.llm, cache, last, n, stop_id=-1):  # never stops: a fixed length
            pass
    run(4)  # warm-up
    return n / median([timed(run, device) for _ in range(3)])


def mcq_speed(model, tok, T, size, device, questions=4):
    """Questions/s of 4 options in every mode, `questions` per call, scored as evaluate_mcq does."""
    generator = torch.Generator().manual_seed(0)
    videos = torch.randn(questions, T, 3, size, size, generator=generator).to(device)
    options = ["a red ball", "a dog on a sofa", "two people talking in a kitchen", "nothing"]
    rec = {"question": "What does the video show, and what happens at the end of it?",
           "options": options, "answer": 0}
    batch = [LoadedQuestion(rec, new_item(rec, i), video) for i, video in enumerate(videos)]
    run = partial(score_batch, model, tok, batch, MODES, device, "mean", "likelihood", 16)
    run()  # warm-up
    return questions / median([timed(run, device) for _ in range(3)])


def model_135m(llm_dir):
    """SmolLM2-135M from llm_dir (else random weights of its shape) + a random DINOv2-small."""
    llm = SmolLM2.from_pretrained(llm_dir) if llm_dir else SmolLM2(LLMConfig())
    return FoveatedVLM(llm, DINOv2(DinoConfig()))


def speed_model():
    """(model, tokenizer, frame size): with llm_dir the 135M shape, else init_from."""
    if llm_dir:
        model, tok = model_135m(llm_dir), load_tokenizer(llm_dir)
    else:
        model, tok_path = load_model(init_from)
        tok = load_tokenizer(tok_path)
    size = image_size or (224 if llm_dir else model.dino.cfg.image_size)
    return model.to(device), tok, size


def speed():
    """--task=speed: per frame count and dtype the train step (samples/s, tokens/s, MFU, memory,
    graphs compiled) and the loader; decode, MCQ and DPO speed."""
    torch.manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    setup(device)  # as train.py does
    model, tok, size = speed_model()
    recipe = recipe_keys(speed_recipe) if cuda and not speed_batch else {}
    B = speed_batch or recipe.get("batch_size", 2)
    S, V = speed_text, model.llm.cfg.vocab_size
    # bf16 without native support is emulated: far too slow to time by default
    both = "float32,bfloat16" if native_bf16(device) else "float32"
    dtypes = (speed_dtypes or ("bfloat16" if cuda else both)).split(",")
    sweep = [int(t) for t in str(speed_frames).split(",")]
    report = {"device": torch.cuda.get_device_name(device) if cuda else str(device),
              "shape": "135M" if llm_dir else init_from, "B": B, "frames": sweep, "S": S,
              "image_size": size, "params": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(),
              "compile": compile and {"dynamic": compile_dynamic, "backend": compile_backend}}
    if compile:
        compile_model(model, compile_dynamic, compile_backend)
    for T in sweep:
        batch = {"frames": torch.randn(B, T, 3, size, size, device=device),
                 "input_ids": torch.randint(3, V, (B, S), device=device),
                 "loss_mask": torch.ones(B, S, dtype=torch.long, device=device)}
        flops = train_flops(model, B, T, S, size, targets=S - 1)  # position i predicts token i+1
        row = report[f"T{T}"] = {"train_flops_per_step": flops}
        before = compile_counts()
        for name, r in train_speed(model, batch, device, dtypes, speed_steps).items():
            peak = peak_flops(device, getattr(torch, name))
            row[name] = dict(r, samples_per_s=B / r["step_s"],
                             tokens_per_s=B * (T + S) / r["step_s"],
                             mfu=mfu(flops, r["step_s"], peak), peak_flops=peak)
        if compile:  # graphs this frame count added: 0 after the first = no recompiles as T varies
            after = compile_counts()
            row.update(graphs_added=after["graphs"] - before["graphs"],
                       graph_breaks=after["graph_breaks"])
        if speed_loader:
            workers = recipe.get("num_workers", 1)
            row["loader_samples_per_s"] = loader_speed(tok, B, T, size, workers, cuda)
        if T == sweep[0]:
            report.update(dpo_speed(model.train(), batch, device))
            first = batch["frames"][:1]
    tune(model.eval())  # fp32 weights
    report["decode_tokens_per_s"] = decode_speed(model, tok, first, device)
    with peak_memory(device) as mem:
        report["mcq_questions_per_s"] = mcq_speed(model, tok, 16, size, device)
    report.update(mcq_peak_mem_mb=mem["peak_mem_mb"], mcq_frames=16)
    if "bfloat16" in dtypes:  # last: bf16 weights, as sample.py --dtype=bfloat16 loads them
        tune(model.to(torch.bfloat16))
        report["decode_tokens_per_s_bf16"] = decode_speed(model, tok, first.bfloat16(), device)
    return report


if __name__ == "__main__":
    print(json.dumps(speed(), indent=2))
