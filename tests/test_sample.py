"""sample.py, run as users run it (a subprocess) on a tiny random checkpoint and on files written here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import tasks.shapes
from conftest import steered
from model import DINOv2, DinoConfig, FoveatedVLM, LLMConfig, SmolLM2

ROOT = Path(__file__).resolve().parents[1]
CELL = 56 * 3  # sample.py upscales 56px frames by ceil(160 / 56) = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random model saved in our format, with a byte-level tokenizer that knows multi-byte text."""
    out = tmp_path_factory.mktemp("sample")
    texts = [data.SYSTEM_PROMPT, data.DEFAULT_USER, "Describe this image.", "café naïve déjà vu", "日本語のテキスト",
             "the red circle moves from the top left to the centre."] * 20
    tasks.shapes.train_tokenizer(texts, vocab_size=320).save(str(out / "tokenizer.json"))
    vocab = data.load_tokenizer(str(out / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    llm = SmolLM2(LLMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                            hidden_dim=64, max_seq_len=256))
    with torch.no_grad():  # the fresh head (std 0.02) gives near-flat logits, one repeated token: no test
        for p in llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        llm.embed_tokens.weight.normal_(0, 1.0)
    vlm = steered(FoveatedVLM(llm, DINOv2(DinoConfig(image_size=56, patch_size=14, dim=48, n_layers=2, n_heads=3))).eval())
    vlm.save(str(out / "ckpt"), tokenizer=str(out / "tokenizer.json"))
    # train.py's layout: run/ckpt/step-*; sample.py must take the latest (the older one here is unreadable)
    vlm.save(str(out / "run" / "ckpt" / "step-0000010"), tokenizer=str(out / "tokenizer.json"))
    vlm.layout = "question_first"  # the same weights, the question before the frames
    vlm.save(str(out / "qf"), tokenizer=str(out / "tokenizer.json"))
    vlm.layout = "frames_first"
    (out / "run" / "ckpt" / "step-0000005").mkdir()
    (out / "run" / "ckpt" / "step-0000005" / "model.safetensors").write_bytes(b"not weights")
    return out, vlm


def frame(i, size=64):
    """grey frame with a white square that moves right"""
    a = np.full((size, size, 3), 100, np.uint8)
    a[20:36, 4 + 8 * i:20 + 8 * i] = 255
    return a


def write_video(path, codec, pix_fmt, n=5):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=5)
        s.width, s.height, s.pix_fmt = 64, 64, pix_fmt
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def run(ckpt_dir, *args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "sample.py", f"--init_from={ckpt_dir}", *args], cwd=ROOT, env=env,
                       capture_output=True, timeout=300)
    out, err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")
    lines = out.split("\n")
    while lines and lines[0].startswith("override: "):  # configurator's echo precedes the answer
        lines.pop(0)
    return p.returncode, "\n".join(lines), err


def naive_greedy(vlm, frames, prompt_ids, n):
    """No KV cache for the text: re-run the full forward on prompt + generated tokens, take the argmax."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = vlm(frames[None], torch.tensor([ids]), mode="autoregressive")
            token = int(logits[0, -1].argmax())
            if token == data.PAD_ID:
                break
            out.append(token)
            ids.append(token)
    return out


def test_greedy_stream_equals_uncached_decode_and_png(ckpt, tmp_path):
    out, vlm = ckpt
    video = write_video(tmp_path / "clip.mp4", "libx264", "yuv420p")
    rc, text, err = run(out / "ckpt", f"--video={video}", "--mode=autoregressive", "--max_new_tokens=30",
                        f"--attention_out={tmp_path / 'g.png'}")
    assert rc == 0, err
    tok = data.load_tokenizer(str(out / "ckpt"))
    frames = data.load_video(str(video), 56, 8)
    want = naive_greedy(vlm, frames, data.encode_prompt(tok, data.DEFAULT_USER), 30)
    assert len(want) >= 10 and len(set(want)) >= 5  # a meaningful comparison, not a stop or one repeated token
    assert any("\ufffd" in tok.decode([t]) for t in want)  # some tokens are half a character: streaming must wait
    assert text == tok.decode(want) + "\n"
    png = Image.open(tmp_path / "g.png")
    # 5 columns (frames); rows: frame, coarse, autoregressive; then the text band
    assert png.format == "PNG" and png.width == 5 * CELL and 3 * CELL + 20 <= png.height <= 3 * CELL + 200
    a = np.asarray(png.convert("RGB")).astype(int)
    # each frame's autoregressive heatmap is its own glimpse: frames 0 and 4 differ (the query changes)
    assert np.abs(a[2 * CELL:3 * CELL, :CELL] - a[2 * CELL:3 * CELL, 4 * CELL:5 * CELL]).mean() > 1


def test_two_questions_two_glimpse_rows(ckpt, tmp_path):
    """question first: each prompt walks its own glimpses over the same (streamed) video, one row each"""
    out, _ = ckpt
    video = write_video(tmp_path / "clip.mp4", "libx264", "yuv420p")
    rc, text, err = run(out / "qf", f"--video={video}", "--prompt=Describe this image.",
                        f"--second_prompt={data.DEFAULT_USER}", "--max_new_tokens=6",
                        f"--attention_out={tmp_path / 'two.png'}")
    assert rc == 0, err
    assert "prompt: Describe this image." in err and f"prompt: {data.DEFAULT_USER}" in err
    assert text.count("\n") == 2  # two answers
    a = np.asarray(Image.open(tmp_path / "two.png").convert("RGB")).astype(int)
    assert a.shape[1] == 5 * CELL and a.shape[0] > 4 * CELL  # rows: frame, coarse, prompt 1, prompt 2
    first, second = a[2 * CELL:3 * CELL], a[3 * CELL:4 * CELL]
    assert np.abs(first - second).mean() > 1  # another question, other glimpses


@pytest.mark.parametrize("kind,out_ext", [("webm", "gif"), ("gif", "png"), ("png", "gif"), ("jpg", "png")])
def test_input_kinds_and_pictures(ckpt, tmp_path, kind, out_ext):
    out, _ = ckpt
    if kind == "webm":
        path = write_video(tmp_path / "clip.webm", "libvpx", "yuv420p")
    elif kind == "gif":
        path = write_video(tmp_path / "clip.gif", "gif", "rgb8")
    else:
        path = tmp_path / f"still.{kind}"
        Image.fromarray(frame(2, size=80)).save(path)
    T = 5 if kind in ("webm", "gif") else 8  # images are replicated to 8 frames
    pic = tmp_path / f"glimpses.{out_ext}"
    extra = ["--mode=coarse_only", "--temperature=0.8", "--top_k=5", "--num_samples=2"] if kind == "jpg" else ["--mode=coarse_fine"]
    rc, text, err = run(out / "ckpt", f"--{'image' if kind in ('png', 'jpg') else 'video'}={path}",
                        "--max_new_tokens=8", f"--attention_out={pic}", *extra)
    assert rc == 0, err
    assert f"{T} frames of 56px" in err
    img = Image.open(pic)
    rows = 2 if kind == "jpg" else 3  # coarse_only draws no second glimpse row
    if out_ext == "gif":
        assert img.format == "GIF" and img.n_frames == T and img.width == rows * CELL and img.height > CELL
    else:
        assert img.format == "PNG" and img.width == T * CELL and img.height > rows * CELL
    if kind == "jpg":
        assert err.count("--- sample") == 2 and text.count("\n") >= 2


def test_default_is_a_held_out_shapes_clip(ckpt, tmp_path):
    out, _ = ckpt
    tasks.shapes.make_shapes(str(tmp_path / "shapes"), n_train=1, n_val=2, n_dpo=0, n_text=0, frames=6)
    rc, text, err = run(out / "run" / "ckpt", f"--shapes_dir={tmp_path / 'shapes'}", "--clip=1", "--max_new_tokens=4")
    assert rc == 0, err
    val = next(r for i, r in enumerate(data.read_tar(str(tmp_path / "shapes" / "val-0000.tar"))) if i == 1)
    meta = json.loads(val["files"]["json"])  # the clip's own multiple-choice question and its answer
    assert f"weights: {out / 'run' / 'ckpt' / 'step-0000010'}" in err
    assert "6 frames of 64px" in err and f"prompt: {meta['user']}" in err and f"reference: {meta['assistant']}" in err


def test_bad_input_is_one_line_naming_it(ckpt, tmp_path):
    out, _ = ckpt
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 definitely not a video" * 50)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    cases = {  # what the user passed -> the path the one-line error must name
        "missing": (out / "ckpt", f"--video={tmp_path / 'nope.mp4'}", tmp_path / "nope.mp4"),
        "bad_video": (out / "ckpt", f"--video={tmp_path / 'junk.mp4'}", tmp_path / "junk.mp4"),
        "bad_image": (out / "ckpt", f"--image={tmp_path / 'broken.png'}", tmp_path / "broken.png"),
        "no_ckpt": (tmp_path / "no_ckpt", "--clip=0", tmp_path / "no_ckpt"),
    }
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    procs = {case: subprocess.Popen([sys.executable, "sample.py", f"--init_from={c}", arg], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for case, (c, arg, _) in cases.items()}  # side by side: each run is mostly `import torch`
    for case, p in procs.items():
        _, err = p.communicate(timeout=300)
        err = err.decode()
        assert p.returncode != 0, case
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(cases[case][2]) in err, (case, err)
