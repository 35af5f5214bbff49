"""
The speed lab's long video: the 135M shape answers a synthetic video of `minutes` (made once under
data/) streamed at `fps` in autoregressive mode: wall time, glimpses/s, peak memory and video
decoding's share, per dtype.

    python -m perf.longvideo --minutes=60 --fps=1 --llm_dir=checkpoints/SmolLM2-135M-Instruct

Prints one JSON report.
"""
import json
import os
import time

import av
import numpy as np
import torch

from data import video_chunks, video_frames, video_length
from model import generate
from perf.platform import native_bf16, tune
from perf.speed import model_135m, peak_memory
from tasks.shapes import write_h264

# config keys (configurator.py)
llm_dir = ''  # SmolLM2 weights ('': random weights of the 135M shape), with a random DINOv2-small
minutes = 10  # the synthetic video's length
fps = 1.0  # frames read per second of video
max_frames = 0  # a cap on them (0: none)
image_size = 224
device = 'cuda' if torch.cuda.is_available() else 'cpu'
longvideo_dtypes = ''  # '' = bfloat16,float32 (float32 alone on a CPU without native bf16)
if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configurator.py")).read())


def synthetic_video(path, minutes, rate=25, width=320, height=240):
    """A `minutes` long video: a scrolling texture, a new tint every minute, a moving square."""
    luma = np.random.default_rng(0).integers(40, 200, (height, 2 * width), dtype=np.uint8)

    def frames():
        for i in range(minutes * 60 * rate):
            y = np.roll(luma, -i, 1)[:, :width].copy()  # scrolls one column a frame
            x = (i * 4) % (width - 48)
            y[96:144, x:x + 48] = 255
            tint = (i // (60 * rate)) * 37 % 256  # a new "scene" every minute
            # the U and V planes, each [H/2, W/2], stacked
            uv = np.full((height // 2, width), tint, np.uint8)
            yield av.VideoFrame.from_ndarray(np.concatenate((y, uv)), format="yuv420p")
    return write_h264(path, frames(), minutes * 60 * rate, rate)


def longvideo():
    """--task=longvideo: the 135M shape answers a synthetic `minutes`-long video (made once under
    data/) streamed at `fps` in autoregressive mode: per dtype wall time, glimpses/s, peak memory
    and video decoding's share of it. The prompt is random ids (speed does not read it)."""
    torch.manual_seed(0)
    path = synthetic_video(os.path.join("data", f"longvideo-{minutes}min.mp4"), minutes)
    size = image_size or 224
    pick_fps = fps or 1.0
    model = model_135m(llm_dir).to(device).eval()
    cap = max_frames or 10 ** 9
    n, seconds = video_length(path, cap, pick_fps)
    prompt = torch.randint(3, model.llm.cfg.vocab_size, (1, 32), device=device)
    report = {"video": path, "minutes": minutes, "fps": pick_fps, "frames": n, "image_size": size,
              "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    decoded = sum(1 for _ in video_frames(path, size, cap, pick_fps))
    report["decode_alone_s"] = time.perf_counter() - t0
    dtypes = longvideo_dtypes or ("bfloat16,float32" if native_bf16(device) else "float32")
    for name in dtypes.split(","):
        tune(model.to(getattr(torch, name)))
        chunks = video_chunks(path, size, cap, pick_fps, device=device, progress=True)
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            cache, last = model.stream(chunks, n, prompt, 16)
            answer = list(generate(model.llm, cache, last, 16, stop_id=-1))
            wall = time.perf_counter() - t0
        report[name] = dict(mem, wall_s=wall, glimpses_per_s=n / wall, realtime_x=seconds / wall,
                            decode_share=report["decode_alone_s"] / wall, new_tokens=len(answer))
        del cache
    assert decoded == n, f"{path}: decoded {decoded} frames, expected {n}"
    return report


if __name__ == "__main__":
    print(json.dumps(longvideo(), indent=2))
