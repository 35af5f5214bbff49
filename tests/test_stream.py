"""Streaming autoregressive inference (model.FoveatedVLM.stream) and the streaming video reader."""
import av
import numpy as np
import pytest
import torch

import data
import tasks.shapes
from conftest import steered
from model import DINOv2, FoveatedVLM, SmolLM2, generate, left_pad
from perf.readahead import read_ahead
from test_data import frame_index, gray_video
from test_sample import ckpt, run, write_video  # noqa: F401  (ckpt: the tiny checkpoint fixture)


@pytest.mark.parametrize("layout", ["frames_first", "question_first"])
def test_streamed_logits_equal_the_batch_autoregressive_forward(tiny_llama, tiny_dino, layout):
    torch.manual_seed(0)
    vlm = steered(FoveatedVLM(SmolLM2.from_pretrained(tiny_llama[0]), DINOv2.from_pretrained(tiny_dino[0]),
                              layout=layout)).eval()
    frames = torch.randn(7, 3, 56, 56)  # 7 frames in chunks of 3: the walk crosses two chunk boundaries
    text = torch.randint(3, 96, (1, 5))
    question = torch.randint(3, 96, (1, 4)) if layout == "question_first" else None
    with torch.no_grad():
        want, _ = vlm(frames[None], text, mode="autoregressive", question_ids=question)  # [1,5,V]
        cache, last = vlm.stream(iter(frames.split(3)), 7, text, extra=4,
                                 question=(question, None) if question is not None else None)
        got = list(generate(vlm.llm, cache, last, 4, stop_id=-1))
        # the batch path's prefill + decode from the same prompt gives the same continuation
        mask = torch.ones(1, 7, dtype=torch.bool)
        ref_cache, ref_last, _ = vlm.prefill(vlm.encode(frames[None]), mask, text, "autoregressive", 4,
                                             question=(question, None) if question is not None else None)
        ref = list(generate(vlm.llm, ref_cache, ref_last, 4, stop_id=-1))
    torch.testing.assert_close(last, want[:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-5)
    assert [int(t) for t in got] == [int(t) for t in ref]
    # three questions about one video: one encode per chunk; frames first one walk, question first three
    prompts, valid = left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13]], "cpu")  # [3,4], left-padded
    qs = None if question is None else (question.expand(3, -1), None)
    with torch.no_grad():
        _, many = vlm.stream(iter(frames.split(3)), 7, prompts, question=qs, prompt_valid=valid)
        _, ref_many, _ = vlm.prefill(vlm.encode(frames[None].expand(3, -1, -1, -1, -1)), mask.expand(3, -1),
                                     prompts, "autoregressive", 0, valid, qs)
    torch.testing.assert_close(many, ref_many, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="more frames came than the 6 announced"):
        vlm.stream(iter(frames.split(3)), 6, text)


def test_streaming_reader_picks_the_frames_of_load_video(tmp_path):
    mp4 = tmp_path / "v.mp4"
    gray_video(mp4, 40)  # 4 s at 10 fps, frame i has grey level 6 i
    for kw in ({"max_frames": 8}, {"max_frames": 64, "fps": 2}, {"max_frames": 4, "start": 1.0, "end": 3.0},
               {"max_frames": 64}):
        want = data.load_video(str(mp4), image_size=16, **kw)
        streamed = torch.cat(list(data.video_chunks(str(mp4), 16, chunk=3, progress=True, **kw)))
        assert frame_index(streamed) == frame_index(want)
        n, _ = data.video_length(str(mp4), kw["max_frames"], kw.get("fps"), kw.get("start"), kw.get("end"))
        assert n == len(want) or n == 64 > len(want) == 40  # at most: 64 times over 40 frames pick each once
    assert data.video_length(str(mp4), 10 ** 9, fps=1.0) == (4, 4.0)
    # the reader thread's error reaches the caller; leaving early stops the thread
    with pytest.raises(data.SkipSample, match="cannot decode"):
        list(read_ahead(data.video_frames(str(tmp_path / "missing.mp4"), 16, 4)))
    first = next(read_ahead(data.video_frames(str(mp4), 16, 64), ahead=1))
    assert first.shape == (16, 16, 3)


def test_context_limit_refusal_says_how_many_frames_fit(ckpt, tmp_path):  # noqa: F811
    out, _ = ckpt
    msg = data.context_error(3600, 3600.0, 100, 2048, "hour.mp4")
    assert "3600 frames" in msg and "1948 frames fit" in msg and "--fps=0.541" in msg
    assert data.context_error(100, 100.0, 100, 2048, "x") is None
    video = long_video(tmp_path / "long.mp4", seconds=60, rate=5)  # 300 frames at 5 fps > 256 positions
    rc, text, err = run(out / "ckpt", f"--video={video}", "--fps=5", "--max_frames=0", "--max_new_tokens=8")
    assert rc == 1 and text == "" and "300 frames (60 s of video)" in err and "max_seq_len 256" in err
    fit = int(err.split(" frames fit")[0].split()[-1])
    assert 200 < fit < 256 and f"--max_frames={fit}" in err
    rc, _, err = run(out / "ckpt", f"--video={video}", "--fps=5", "--max_frames=0", "--mode=coarse_fine")
    assert rc == 1 and "--mode=autoregressive" in err


def test_sample_cli_streams_a_video_at_fps_and_draws_a_contact_sheet(ckpt, tmp_path):  # noqa: F811
    from PIL import Image
    out, _ = ckpt
    video = long_video(tmp_path / "long.mp4", seconds=40, rate=5)
    args = [f"--video={video}", "--fps=2", "--max_frames=0", "--max_new_tokens=6", "--stream_chunk=4"]
    rc, text, err = run(out / "ckpt", *args, f"--attention_out={tmp_path / 'sheet.png'}")
    assert rc == 0, err
    assert "80 frames of 56px" in err and text.strip()
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.width == 12 * 56 * 3  # a contact sheet of 12 frames, not 80 columns
    # the chunk size is an implementation detail: the same answer in chunks of 16
    rc2, text2, _ = run(out / "ckpt", *args, "--stream_chunk=16")
    assert rc2 == 0 and text2 == text


def long_video(path, seconds, rate):
    """A 64px H.264 video of `seconds` at `rate` fps, a square moving over a changing background."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(seconds * rate):
            a = np.full((64, 64, 3), (i * 3) % 200 + 20, np.uint8)
            x = (i * 2) % 48
            a[20:36, x:x + 16] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("layout", ["frames_first", "question_first"])
def test_streamed_mcq_equals_batch_autoregressive_scores(tmp_path, layout):
    import bench
    from test_bench import ANIMALS, tiny_vlm
    tok = tasks.shapes.train_tokenizer([f"which animal is it? {' '.join(ANIMALS)} what colour?"] * 20, vocab_size=300)
    model = tiny_vlm(tok)
    model.layout = layout
    videos = [long_video(tmp_path / f"{k}.mp4", seconds=6, rate=5) for k in "ab"]
    records = [{"question": q, "options": ANIMALS[:3 + j % 2], "answer": j % 3, "video": str(videos[j // 3]),
                "id": j} for j, q in enumerate(["which animal is it?", "what colour?", "which animal?", "it?"])]
    records.append({"question": "x", "options": ANIMALS[:2], "answer": 0, "video": str(tmp_path / "gone.mp4")})
    with torch.no_grad():
        want = bench.evaluate_mcq(model, tok, records, ["autoregressive"], max_frames=64, image_size=56, fps=2.0,
                                  progress=False)
        got = bench.stream_mcq(model, tok, records, fps=2.0, max_frames=64, image_size=56, progress=False)
    for w, g in zip(want["items"][:4], got["items"][:4]):
        np.testing.assert_allclose(g["scores"]["autoregressive"], w["scores"]["autoregressive"], atol=1e-4)
    assert got["skipped_count"] == want["skipped_count"] == 1 and "gone.mp4" in got["skipped"][0]["reason"]


def test_streamed_mcq_one_decode_and_one_stream_per_video(tmp_path, monkeypatch):
    # the questions about one video share its decode and its encode: one video_frames and one model.stream
    # per video, however many questions it has
    import bench
    from test_bench import ANIMALS, tiny_vlm
    tok = tasks.shapes.train_tokenizer([f"which animal is it? {' '.join(ANIMALS)}"] * 20, vocab_size=300)
    model = tiny_vlm(tok)
    videos = [long_video(tmp_path / f"{k}.mp4", seconds=4, rate=5) for k in "ab"]
    records = [{"question": "which animal is it?", "options": ANIMALS[:3], "answer": j % 3,
                "video": str(videos[j % 2]), "id": j} for j in range(5)]
    calls = {"decode": [], "stream": 0}
    video_frames, stream = data.video_frames, model.stream

    def counted_frames(path, *args, **kw):
        calls["decode"].append(path)
        return video_frames(path, *args, **kw)

    def counted_stream(*args, **kw):
        calls["stream"] += 1
        return stream(*args, **kw)
    monkeypatch.setattr(data, "video_frames", counted_frames)
    monkeypatch.setattr(model, "stream", counted_stream)
    got = bench.stream_mcq(model, tok, records, fps=2.0, max_frames=64, image_size=56, progress=False)
    assert sorted(calls["decode"]) == sorted(map(str, videos)) and calls["stream"] == 2
    assert all("autoregressive" in item["scores"] for item in got["items"])
