"""data.py: chat template, masks, shard layouts, video sampling, splitting, mixing, resume, bad input."""
import io
import json
import os
import shutil
import sys
from collections import Counter
from itertools import islice

import av
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tasks.shapes  # noqa: E402

CONV = [{"role": "user", "content": "What is in the video?"},
        {"role": "assistant", "content": "A red circle moves to the left."},
        {"role": "user", "content": "And then?\nAnswer briefly."},
        {"role": "assistant", "content": "It stops, 3 times."}]


@pytest.fixture(scope="module")
def tok():
    """tiny byte-level BPE trained here, so most tests need no downloaded files"""
    texts = [m["content"] for m in CONV] + [data.SYSTEM_PROMPT, "user\n", "assistant\n", "describe it. a red frame."] * 3
    return tasks.shapes.train_tokenizer(texts, vocab_size=300)


def jpg(colour, size=16):
    b = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(b, "JPEG", quality=95)
    return b.getvalue()


def gray_video(path, n, codec="libx264", size=32, step=6):
    """frame i is flat grey i*step, so decoded brightness gives the frame index back"""
    with av.open(str(path), "w", options={"movflags": "faststart"} if codec == "libx264" else {}) as c:
        s = c.add_stream(codec, rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p" if codec != "gif" else "rgb8"
        if codec == "libx264":
            s.options = {"crf": "0"}
        for i in range(n):
            a = np.full((size, size, 3), i * step, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_index(frames, step=6):
    """normalised [T,3,S,S] -> the grey level index of each frame"""
    px = frames * data.STD[0] + data.MEAN[0]
    return [round(float(f.mean()) * 255 / step) for f in px]


def caption_shard(path, keys, colour=(200, 0, 0), frames=1):
    write = [(k, {**{f"{t:03d}.jpg": jpg(colour) for t in range(frames)}, "json": {"user": "describe it.", "assistant": f"a red frame {k}"}}) for k in keys]
    data.write_tar(path, write)


def text_shard(path, keys):
    data.write_tar(path, [(k, {"json": {"user": "describe it.", "assistant": "a red frame."}}) for k in keys])

# -----------------------------------------------------------------------------


def test_chat_template_matches_smollm2(smollm2_dir):
    from transformers import AutoTokenizer
    tok = data.load_tokenizer(smollm2_dir)
    ids, mask, trunc, _ = data.encode_chat(tok, CONV, stage=2)
    ref = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        [{"role": "system", "content": data.SYSTEM_PROMPT}] + CONV, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert ids == list(ref) and not trunc
    # the prompt for the final turn plus its answer is the conversation minus the trailing "\n"
    one = CONV[:2]
    full = data.encode_chat(tok, one, stage=2)[0]
    assert data.encode_prompt(tok, one[0]["content"]) + data.encode_answer(tok, one[1]["content"]) == full[:-1]
    assert tok.decode(full[-1:]) == "\n"


def test_masks_stage1_and_stage2(tok):
    ids, mask, trunc, question_tokens = data.encode_chat(tok, CONV, stage=1)
    assert mask == [1] * len(ids) and not trunc
    ids2, mask2, _, _ = data.encode_chat(tok, CONV, stage=2)
    assert ids[:question_tokens] == data.encode_question(tok, CONV[0]["content"])  # where question_first puts the frames
    assert ids2 == ids
    # targets are exactly each assistant content + its <|im_end|>
    want, cur = [], data.encode_prompt(tok, CONV[0]["content"])
    want += [0] * len(cur) + [1] * len(data.encode_answer(tok, CONV[1]["content"])) + [0]  # the "\n" after <|im_end|>
    turn = tok.encode(f"<|im_start|>user\n{CONV[2]['content']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    want += [0] * len(turn) + [1] * len(data.encode_answer(tok, CONV[3]["content"])) + [0]
    assert mask2 == want
    assert tok.decode([i for i, m in zip(ids2, mask2) if m], skip_special_tokens=False) == \
        "A red circle moves to the left.<|im_end|>It stops, 3 times.<|im_end|>"
    assert data.encode_prompt(tok, "x") + data.encode_answer(tok, "y") == data.encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], 2)[0][:-1]
    # truncation keeps ids and mask aligned and says so
    ids3, mask3, trunc3, _ = data.encode_chat(tok, CONV, stage=2, max_len=20)
    assert len(ids3) == len(mask3) == 20 and trunc3 and mask3 == mask2[:20]


def test_shard_layouts_roundtrip(tmp_path, tok):
    mp4 = tmp_path / "v.mp4"
    gray_video(mp4, 12)
    pre = data.encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], 2)
    data.write_tar(tmp_path / "a.tar", [
        ("frames", {"000.jpg": jpg((255, 0, 0)), "001.jpg": jpg((0, 255, 0)), "002.jpg": jpg((0, 0, 255)),
                    "json": {"user": "describe it.", "assistant": "a red frame.", "frame_count": 3}}),
        ("image", {"jpg": jpg((0, 0, 255)), "json": {"caption": "a blue frame."}}),
        ("video", {"mp4": mp4.read_bytes(), "txt": "a grey video.", "json": {"source": "t"}}),
        ("text", {"json": {"user": "describe it.", "assistant": "text only."}}),
        ("pretok", {"jpg": jpg((9, 9, 9)), "json": {"token_ids": pre[0], "loss_mask": pre[1]}}),
        ("turns", {"jpg": jpg((9, 9, 9)), "json": {"user": ["colour?", "where?"], "assistant": ["red.", "left."]}}),
        ("uneven", {"jpg": jpg((9, 9, 9)), "json": {"user": ["colour?"], "assistant": ["red.", "left."]}}),
    ])
    ds = data.ShardDataset(str(tmp_path / "a.tar"), tok, stage=2, image_size=16, max_frames=4, replicate_image_frames=8, loop=False)
    got = {s["key"]: s for s in ds}
    assert set(got) == {"frames", "image", "video", "text", "pretok", "turns"}  # "uneven" skipped
    assert ds.skipped["bad_field"] == 1
    f = got["frames"]["frames"]
    assert f.shape == (3, 3, 16, 16) and f.dtype == torch.float32
    rgb = (f * data.STD[0] + data.MEAN[0]).mean((2, 3))
    assert rgb.argmax(1).tolist() == [0, 1, 2]  # order kept, ImageNet-normalised
    assert got["image"]["frames"].shape == (8, 3, 16, 16)
    assert got["video"]["frames"].shape == (4, 3, 16, 16)
    assert got["text"]["frames"].shape == (0, 3, 16, 16)
    assert got["pretok"]["rows"] == [{"question": [], "ids": pre[0], "mask": pre[1]}]
    # stored ids do not say where the question ends: a question-first model skips them, counted
    qf = data.ShardDataset(str(tmp_path / "a.tar"), tok, stage=2, image_size=16, max_frames=4, loop=False,
                           layout="question_first")
    assert "pretok" not in {s["key"] for s in qf} and qf.skipped["frames_first_only"] == 1
    # legacy caption, .txt caption, and which words are targets
    dec = lambda s: tok.decode([i for i, m in zip(s["rows"][0]["ids"], s["rows"][0]["mask"]) if m])
    assert dec(got["image"]) == "a blue frame." and dec(got["video"]) == "a grey video." and dec(got["text"]) == "text only."
    turns = got["turns"]["rows"][0]
    targets = [i for i, m in zip(turns["ids"], turns["mask"]) if m]
    assert tok.decode(targets, skip_special_tokens=False) == "red.<|im_end|>left.<|im_end|>"  # lists: one conversation, every answer a target
    assert "<|im_end|>\n<|im_start|>user\nwhere?" in tok.decode(turns["ids"], skip_special_tokens=False)
    assert data.FALLBACK_PROMPT in tok.decode(got["image"]["rows"][0]["ids"])
    # plain files are sources too: a video with a sidecar json, an image with a sidecar txt
    (tmp_path / "plain.json").write_text(json.dumps({"user": "describe it.", "assistant": "plain video."}))
    (tmp_path / "plain.mp4").write_bytes(mp4.read_bytes())
    (tmp_path / "pic.png").write_bytes(jpg((0, 0, 0)))
    (tmp_path / "pic.txt").write_text("a black frame.")
    plain = {s["key"]: s for s in data.ShardDataset([str(tmp_path / "plain.mp4"), str(tmp_path / "pic.png")], tok, stage=2, image_size=16, max_frames=5, loop=False)}
    assert plain["plain"]["frames"].shape == (5, 3, 16, 16) and dec(plain["pic"]) == "a black frame."
    # DPO pairs (stage 3), then collate both kinds
    data.write_tar(tmp_path / "dpo.tar", [("p", {"jpg": jpg((1, 2, 3)), "json": {"user": "describe it.", "chosen_assistant": "a red frame.", "rejected_assistant": "a blue frame, 3 times."}})])
    d = next(iter(data.ShardDataset(str(tmp_path / "dpo.tar"), tok, stage=3, image_size=16, loop=False)))
    chosen, rejected = d["rows"]
    assert tok.decode([i for i, m in zip(rejected["ids"], rejected["mask"]) if m]) == "a blue frame, 3 times."
    b = data.collate([d, d])
    assert b["owner"].tolist() == [0, 0, 1, 1] and b["input_ids"].shape == b["loss_mask"].shape == (4, len(rejected["ids"]))
    assert (b["input_ids"][0, len(chosen["ids"]):] == data.PAD_ID).all() and b["loss_mask"][0, len(chosen["ids"]):].sum() == 0
    b = data.collate([got["frames"], got["text"], got["image"]])
    assert b["frames"].shape == (3, 8, 3, 16, 16) and b["frame_mask"].sum(1).tolist() == [3, 0, 8]
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].shape == b["input_ids"].shape
    n = len(got["frames"]["rows"][0]["ids"])
    assert b["input_ids"][0, :n].tolist() == got["frames"]["rows"][0]["ids"] and "question_ids" not in b
    assert (b["input_ids"][0, n:] == 2).all() and b["loss_mask"][0, n:].sum() == 0


def test_uniform_video_sampling(tmp_path):
    mp4 = tmp_path / "v.mp4"
    gray_video(mp4, 40)
    v = data.load_video(str(mp4), max_frames=8, image_size=16)
    assert v.shape == (8, 3, 16, 16)
    assert frame_index(v) == data.uniform_indices(40, 8) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_index(data.load_video(str(mp4), 16, 64, fps=2)) == [int((i + .5) * 40 / 8) for i in range(8)]  # 4 s at 2 fps
    assert frame_index(data.load_video(str(mp4), 16, 4, start=1.0, end=3.0)) == [12, 17, 22, 27]
    assert frame_index(data.load_video(str(mp4), 16, 64)) == list(range(40))  # short clip: every frame
    gif = tmp_path / "v.gif"  # a container with no frame count in its header
    Image.new("L", (16, 16)).save(gif, save_all=True, append_images=[Image.new("L", (16, 16), i * 6) for i in range(1, 20)], duration=100)
    assert frame_index(data.load_video(str(gif), 16, 5)) == data.uniform_indices(20, 5)
    web = tmp_path / "v.webm"
    gray_video(web, 20, codec="libvpx")
    assert len(data.load_video(str(web), 16, 5)) == 5
    img = tmp_path / "i.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(img)
    assert data.load_image(str(img), 16, 8).shape == (8, 3, 16, 16)


def test_split_2_ranks_x_3_workers_reads_each_sample_once(tmp_path, tok):
    keys = []
    for i in range(7):
        ks = [f"s{i}k{j}" for j in range(i + 2)]  # uneven shard sizes
        text_shard(tmp_path / f"t{i}.tar", ks)
        keys += ks
    seen = []
    for rank in range(2):
        ds = data.ShardDataset(str(tmp_path / "t*.tar"), tok, stage=2, image_size=16, seed=3, rank=rank, world_size=2, loop=False)
        for b in data.make_loader(ds, batch_size=2, num_workers=3):
            seen += b["keys"]
    assert sorted(seen) == sorted(keys)


def test_text_ratio(tmp_path, tok):
    caption_shard(tmp_path / "m0.tar", [f"m{i}" for i in range(300)])
    caption_shard(tmp_path / "m1.tar", [f"n{i}" for i in range(300)])
    text_shard(tmp_path / "text.tar", [f"t{i}" for i in range(50)])
    ds = data.ShardDataset(str(tmp_path / "m*.tar"), tok, stage=2, image_size=16, text_ratio=0.14,
                           text_globs=str(tmp_path / "text.tar"), shuffle_buffer=50)
    n = text = 0
    for b in data.make_loader(ds, batch_size=16, num_workers=0):
        text += int((b["frame_mask"].sum(1) == 0).sum())
        n += len(b["keys"])
        if n >= 2000:
            break
    assert abs(text / n - 0.14) < 0.03, text / n  # 4 sigma


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_where_it_stopped(tmp_path, tok, num_workers):
    for i in range(4):
        caption_shard(tmp_path / f"m{i}.tar", [f"m{i}x{j}" for j in range(9)])
    text_shard(tmp_path / "text.tar", [f"t{i}" for i in range(7)])
    make = lambda: data.ShardDataset(str(tmp_path / "m*.tar"), tok, stage=2, image_size=16, seed=1, text_ratio=0.2,
                                     text_globs=str(tmp_path / "text.tar"), shuffle_buffer=5)
    run = data.make_loader(make(), batch_size=3, num_workers=num_workers)
    it = iter(run)
    for _ in range(18):  # past the end of the first epoch (36 media samples + ~20% text)
        next(it)
    sd = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    want = [next(it)["keys"] for _ in range(6)]
    assert max(state["main"]["epoch"] for state in sd["readers"].values()) >= 1
    resumed = data.make_loader(make(), batch_size=3, num_workers=num_workers)
    resumed.load_state_dict(sd)
    it2 = iter(resumed)
    assert [next(it2)["keys"] for _ in range(6)] == want
    # a checkpoint saved before the state's keys were renamed resumes the same way
    old = {{"readers": "workers", "next_reader": "next_worker"}.get(k, k): v for k, v in sd.items()}
    resumed = data.make_loader(make(), batch_size=3, num_workers=num_workers)
    resumed.load_state_dict(old)
    it3 = iter(resumed)
    assert [next(it3)["keys"] for _ in range(6)] == want


def test_bad_inputs_skipped_counted_reported(tmp_path, tok, capfd):
    mp4 = tmp_path / "v.mp4"
    gray_video(mp4, 20)
    good = {"json": {"user": "describe it.", "assistant": "a red frame."}}
    data.write_tar(tmp_path / "bad.tar", [
        ("ok1", {"jpg": jpg((1, 1, 1)), **good}),
        ("corruptvideo", {"mp4": os.urandom(3000), **good}),
        ("emptyvideo", {"mp4": b"", **good}),
        ("cutvideo", {"mp4": mp4.read_bytes()[:1500], **good}),
        ("badimage", {"jpg": b"\xff\xd8 not a jpeg", **good}),
        ("nofield", {"jpg": jpg((1, 1, 1)), "json": {"user": "describe it."}}),
        ("badjson", {"jpg": jpg((1, 1, 1)), "json": "{not json"}),
        ("fewframes", {"000.jpg": jpg((1, 1, 1)), "json": {**good["json"], "frame_count": 4}}),
        ("shortvideo", {"mp4": mp4.read_bytes()[:len(mp4.read_bytes()) * 2 // 3], **good}),  # header intact, frames cut
        ("ok2", {"jpg": jpg((1, 1, 1)), **good}),
    ])
    caption_shard(tmp_path / "cut.tar", [f"c{i}" for i in range(20)])
    raw = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:len(raw) // 2 + 100])  # cut inside a member header
    (tmp_path / "cut2.tar").write_bytes(raw[:len(raw) // 2 + 800])  # cut inside a member's data
    shards = [str(tmp_path / f) for f in ("bad.tar", "cut.tar", "cut2.tar")]
    ds = data.ShardDataset(shards, tok, stage=2, image_size=16, max_frames=8, loop=False)
    loader = data.make_loader(ds, batch_size=4, num_workers=2)
    keys = [k for b in loader for k in b["keys"]]
    assert {"ok1", "ok2"} <= set(keys) and 0 < len([k for k in keys if k.startswith("c")]) < 40
    assert loader.skipped() == Counter({"bad_video": 2, "bad_image": 1, "missing_field": 1, "bad_json": 1, "short_video": 3, "bad_tar": 2})
    err = capfd.readouterr().err
    for name in ("corruptvideo.mp4", "emptyvideo.mp4", "cutvideo.mp4", "badimage.jpg", "nofield.json", "badjson.json",
                 "fewframes", "shortvideo.mp4: video stops at", "cut.tar", "cut2.tar"):
        assert name in err, name
    with pytest.raises(ValueError, match="v.mp4: cannot decode"):
        data.load_video(io.BytesIO(b"junk"), 16, 4, name=str(mp4))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.ShardDataset(str(tmp_path / "nothing-here-*.tar"), tok, stage=2)


def test_dynamic_batching_caps_frames(tmp_path, tok):
    caption_shard(tmp_path / "m.tar", [f"m{i}" for i in range(20)], frames=3)
    ds = data.ShardDataset(str(tmp_path / "m.tar"), tok, stage=2, image_size=16, loop=False)
    sizes = [len(b["keys"]) for b in data.make_loader(ds, batch_size=8, num_workers=0, max_batch_frames=10)]
    assert sizes == [3] * 6 + [2]


def test_shapes_task(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tasks.shapes.make_shapes(str(a), n_train=30, n_val=10, n_dpo=5, n_text=5, frames=4, shard_size=20, seed=0)
    tasks.shapes.ensure_shapes(str(b), n_train=30, n_val=10, n_dpo=5, n_text=5, frames=4, shard_size=20, seed=0)
    for f in ("train-0000.tar", "train-0001.tar", "val-0000.tar", "dpo-0000.tar", "text-0000.tar", "mcq_val.json", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f  # deterministic from the seed
    tok = data.load_tokenizer(str(a))
    assert [tok.token_to_id(s) for s in data.SPECIALS] == [0, 1, 2] and tok.get_vocab_size() <= 512
    from tasks.shapes import read as read_mcq_file
    mcq = read_mcq_file(str(a), image_size=32)
    assert len(mcq) == 10 and {m["category"] for m in mcq} == set(tasks.shapes.QUESTIONS)
    for m in mcq:
        assert len(set(m["options"])) == 4 and 0 <= m["answer"] < 4 and m["frames"].shape == (4, 3, 32, 32)
    s1 = next(iter(data.ShardDataset(str(a / "train-*.tar"), tok, 1, image_size=64, loop=False)))
    caption = tok.decode(s1["rows"][0]["ids"])
    assert caption.count("moves from the") == 1 and caption.count("stays in the") == 2 and all(s1["rows"][0]["mask"])
    for seed in range(20):  # three balls of three colours in three quadrants; one moves into the fourth
        imgs, facts = tasks.shapes.shapes_clip(np.random.default_rng(seed), frames=4)
        balls = facts["balls"]
        assert len(imgs) == 4 and len({b["colour"] for b in balls} | {facts["missing"]}) == 4
        assert len({b["start"] for b in balls}) == 3 and len({b["end"] for b in balls}) == 3
        assert sum(b["start"] != b["end"] for b in balls) == 1
        for ball in range(3):  # the question names the ball its answer is about
            q, opts, ans = tasks.shapes.shapes_question(np.random.default_rng(seed), facts, "spot", ball)
            assert balls[ball]["colour"] in q and opts[ans] == balls[ball]["spot"] and sorted(opts) == sorted(tasks.shapes.SPOTS)
        q, opts, ans = tasks.shapes.shapes_question(np.random.default_rng(seed), facts, "missing")
        assert opts[ans] == facts["missing"] and sorted(opts) == sorted(tasks.shapes.COLOURS)
    qf = data.ShardDataset(str(a / "train-*.tar"), tok, 2, image_size=64, loop=False, layout="question_first")
    rows = next(iter(qf))["rows"]  # question first: each of the clip's three questions is its own row
    assert len(rows) == 3 and all(tok.decode(r["question"]).count("?") == 1 for r in rows)
    s2 = next(iter(data.ShardDataset(str(a / "val-*.tar"), tok, 2, image_size=64, loop=False)))
    assert "\nA. " in tok.decode(s2["rows"][0]["ids"]) and s2["frames"].shape == (4, 3, 64, 64)
    s3 = next(iter(data.ShardDataset(str(a / "dpo-*.tar"), tok, 3, image_size=64, loop=False)))
    assert s3["rows"][0]["ids"] != s3["rows"][1]["ids"]


def write_frames(path, times, size=32, rotation=0, step=6, left_half=False):
    """an mp4 with a frame at each time (seconds; variable rates allowed): flat grey i*step, or (left_half)
    white on the left half only; `rotation` as a phone writes it (display matrix, counter-clockwise degrees)"""
    from fractions import Fraction
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = size * (2 if left_half else 1), size, "yuv420p", {"crf": "0"}
        s.time_base = Fraction(1, 100)
        if rotation:
            s.set_display_rotation(rotation)
        for i, t in enumerate(times):
            a = np.full((size, s.width, 3), i * step, np.uint8)
            if left_half:
                a[:] = 0
                a[:, :size] = 255
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = round(t * 100), Fraction(1, 100)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_frames_by_timestamp_fps_and_orientation(tmp_path):
    # frames every 0.1 s for 2 s, then every second: picked by presentation time, not index x average rate
    write_frames(tmp_path / "vfr.mp4", [i / 10 for i in range(20)] + [2.0 + i for i in range(9)])
    assert frame_index(data.load_video(str(tmp_path / "vfr.mp4"), 16, 4, start=5, end=9)) == [23, 24, 25, 26]
    assert frame_index(data.load_video(str(tmp_path / "vfr.mp4"), 16, 64, fps=1)) == \
        [5, 15, 20, 21, 22, 23, 24, 25, 26, 27]  # 1 fps: the frame on screen at 0.5 s, 1.5 s, ...
    # a phone video shot upright: stored sideways (white on the left) + rotation -90, the way phones record
    write_frames(tmp_path / "phone.mp4", [i / 10 for i in range(3)], rotation=-90, left_half=True)
    up = data.load_video(str(tmp_path / "phone.mp4"), 16, 2) * data.STD[0] + data.MEAN[0]
    assert up[:, :, :6].mean() > 0.9 and up[:, :, -6:].mean() < 0.1  # upright: white on top
    # a jpg with EXIF orientation 6 (turn 90 degrees clockwise to show): the same upright picture
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = data.load_image(str(tmp_path / "phone.jpg"), 16) * data.STD[0] + data.MEAN[0]
    assert up[:, :, :6].mean() > 0.9 and up[:, :, -6:].mean() < 0.1


def test_sparse_picks_seek_to_keyframes(tmp_path, monkeypatch):
    # 10 s at 10 fps, a keyframe every 5 frames; frame i is grey level i * 6
    path = tmp_path / "gop5.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 32
        s.pix_fmt, s.options = "yuv420p", {"crf": "0", "g": "5", "keyint_min": "5", "bf": "2"}
        for i in range(40):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 6, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    opened, real_open = [], av.open

    class CountingContainer:  # counts the frames the decoder hands out
        def __init__(self, *args, **kw):
            self.container, self.decoded = real_open(*args, **kw), 0
            opened.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kw):
            for frame in self.container.decode(*args, **kw):
                self.decoded += 1
                yield frame

    monkeypatch.setattr(data.av, "open", CountingContainer)
    # the frame on screen at 0.5, 1.5, 2.5, 3.5 s, as decoding every frame would pick them
    assert frame_index(data.load_video(str(path), 16, 4)) == [5, 15, 25, 35]
    assert opened[-1].decoded <= 16  # whole GOPs between the picks were skipped (40 frames in all)
    assert frame_index(data.load_video(str(path), 16, 64, fps=1, start=1.0, end=3.0)) == [15, 25]
    assert frame_index(data.load_video(str(path), 16, 64, fps=10)) == list(range(40))
    assert opened[-1].decoded == 40  # every frame picked: every frame decoded once


def test_frame_files_in_natural_order(tmp_path, tok):
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg"]  # lexical order would put 10 before 2
    colours = {"frame_1.jpg": (255, 0, 0), "frame_2.jpg": (0, 255, 0), "frame_10.jpg": (0, 0, 255)}
    data.write_tar(tmp_path / "n.tar", [("k", {**{n: jpg(colours[n]) for n in names},
                                               "json": {"user": "describe it.", "assistant": "a red frame."}})])
    s = next(iter(data.ShardDataset(str(tmp_path / "n.tar"), tok, stage=2, image_size=16, loop=False)))
    assert (s["frames"] * data.STD[0] + data.MEAN[0]).mean((2, 3)).argmax(1).tolist() == [0, 1, 2]


def test_real_caption_shards_get_prompts(tmp_path, tok):
    mp4 = tmp_path / "v.mp4"
    gray_video(mp4, 12)
    data.write_tar(tmp_path / "cap.tar", [
        ("a", {"000.jpg": jpg((1, 1, 1)), "json": {"user": "", "caption": "a red frame.", "source": "openvid"}}),
        ("b", {"mp4": mp4.read_bytes(), "json": {"user": "", "assistant": "a red frame.", "source": "WebVid"}}),
        ("c", {"jpg": jpg((1, 1, 1)), "json": {"assistant": "a red frame.", "source": "somewhere"}}),
        ("d", {"jpg": jpg((1, 1, 1)), "json": {"user": "", "assistant": "a red frame.", "source": "vript"}}),
        ("text", {"json": {"user": "", "assistant": "a red frame."}}),  # no media, no question: nothing to learn
    ])
    ask = lambda s: tok.decode(s["rows"][0]["ids"]).split("user\n")[1].split("assistant\n")[0].strip()
    for stage in (1, 2):
        ds = data.ShardDataset(str(tmp_path / "cap.tar"), tok, stage=stage, image_size=16, loop=False)
        got = {s["key"]: ask(s) for s in ds}
        assert got == {"a": data.SOURCE_PROMPTS["openvid"], "b": data.SOURCE_PROMPTS["webvid"],
                       "c": data.FALLBACK_PROMPT, "d": data.SOURCE_PROMPTS["vript"]}, stage
        assert ds.skipped["missing_field"] == 1
    ds = data.ShardDataset(str(tmp_path / "cap.tar"), tok, stage=2, image_size=16, loop=False,
                           prompts={"openvid": "describe it.", "": "a red frame?"})  # from the config
    assert {s["key"]: ask(s) for s in ds} | {"b": None, "d": None} == \
        {"a": "describe it.", "b": None, "c": "a red frame?", "d": None}
    data.write_tar(tmp_path / "dpo.tar", [("p", {"jpg": jpg((1, 1, 1)), "json": {
        "user": "", "chosen_assistant": "a red frame.", "rejected_assistant": "a blue frame.", "source": "x"}})])
    pair = next(iter(data.ShardDataset(str(tmp_path / "dpo.tar"), tok, stage=3, image_size=16, loop=False)))
    assert data.FALLBACK_PROMPT in tok.decode(pair["rows"][0]["ids"])


def test_wrongly_typed_json_is_skipped_in_a_worker(tmp_path, tok):
    good = {"user": "describe it.", "assistant": "a red frame."}
    data.write_tar(tmp_path / "types.tar", [
        ("ok", {"jpg": jpg((1, 1, 1)), "json": good}),
        ("userlist", {"jpg": jpg((1, 1, 1)), "json": {"user": ["a", "b"], "assistant": "a red frame."}}),
        ("number", {"jpg": jpg((1, 1, 1)), "json": {"user": "describe it.", "assistant": 3}}),
        ("nulls", {"jpg": jpg((1, 1, 1)), "json": {"token_ids": [1, None, 2], "loss_mask": [1, 1, 1]}}),
        ("vocab", {"jpg": jpg((1, 1, 1)), "json": {"token_ids": [1, 10 ** 6], "loss_mask": [1, 1]}}),
        ("list", {"jpg": jpg((1, 1, 1)), "json": "[1, 2, 3]"}),
        ("ok2", {"jpg": jpg((1, 1, 1)), "json": good}),
    ])
    ds = data.ShardDataset(str(tmp_path / "types.tar"), tok, stage=2, image_size=16, loop=False)
    loader = data.make_loader(ds, batch_size=2, num_workers=1)  # a TypeError in a worker would end the run
    assert sorted(k for b in loader for k in b["keys"]) == ["ok", "ok2"]
    assert loader.skipped() == Counter({"bad_field": 4, "bad_json": 1})


def test_a_looping_reader_with_nothing_usable_stops(tmp_path, tok):
    data.write_tar(tmp_path / "bad.tar", [(f"k{i}", {"jpg": b"not a jpeg", "json": {"user": "q", "assistant": "a"}})
                                          for i in range(3)])
    ds = data.ShardDataset(str(tmp_path / "bad.tar"), tok, stage=2, image_size=16, loop=True)
    with pytest.raises(ValueError, match="read every shard of the training data in full and none"):
        next(iter(data.make_loader(ds, batch_size=2)))
    # two readers, one shard each per epoch: a reader may draw the bad shard epochs in a row, and goes on
    data.write_tar(tmp_path / "good.tar", [(f"g{i}", {"jpg": jpg((1, 1, 1)), "json": {"user": "q", "assistant": "a"}})
                                           for i in range(3)])
    for seed in range(6):
        ds = data.ShardDataset([str(tmp_path / "good.tar"), str(tmp_path / "bad.tar")], tok, stage=2, image_size=16,
                               seed=seed)
        assert len(list(islice(ds.samples(0, 2), 60))) == 60
    shutil.copy(tmp_path / "bad.tar", tmp_path / "bad2.tar")
    ds = data.ShardDataset([str(tmp_path / "bad.tar"), str(tmp_path / "bad2.tar")], tok, stage=2, image_size=16)
    with pytest.raises(ValueError, match="none gave a usable sample"):
        next(ds.samples(0, 2))


def test_reader_split_is_checked_up_front(tmp_path, tok):
    text_shard(tmp_path / "a.tar", ["x"])
    text_shard(tmp_path / "b.tar", ["y"])
    ds = data.ShardDataset(str(tmp_path / "*.tar"), tok, stage=2, image_size=16)
    with pytest.raises(ValueError, match="2 shards for 4 readers.*--num_workers=2"):
        data.make_loader(ds, batch_size=1, num_workers=4)  # in this process, not in a worker
    loader = data.make_loader(ds, batch_size=1, num_workers=2)
    next(iter(loader))
    state = loader.state_dict()
    other = data.ShardDataset(str(tmp_path / "*.tar"), tok, stage=2, image_size=16, rank=0, world_size=2)
    with pytest.raises(ValueError, match="num_workers=2 x world_size=1.*1 x 2"):
        data.make_loader(other, batch_size=1, num_workers=1).load_state_dict(state)


HANG_SCRIPT = """
import sys
import data
data.load_video(sys.argv[1], 32, 8)  # the parent decodes first: PyAV's scaler is set up here
tok = data.load_tokenizer(sys.argv[2])
for _ in range(3):  # workers are forked anew each pass
    ds = data.ShardDataset(sys.argv[3], tok, stage=2, image_size=32, max_frames=8, loop=False)
    print(sum(len(b["keys"]) for b in data.make_loader(ds, 4, num_workers=2)), flush=True)
"""


def test_workers_start_after_the_parent_decoded_video(tmp_path, tok):
    """A DataLoader worker forked after the main process decoded a video still decodes videos (it
    used to hang for good in the scaler threads it inherited without their threads)."""
    import subprocess
    gray_video(tmp_path / "v.mp4", 40, size=96)
    raw = (tmp_path / "v.mp4").read_bytes()
    for j in range(2):
        data.write_tar(tmp_path / f"s{j}.tar", [(f"k{j}x{i}", {"mp4": raw, "json": {"user": "describe it.", "assistant": "a red frame."}}) for i in range(6)])
    tok.save(str(tmp_path / "tok.json"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT, str(tmp_path / "v.mp4"), str(tmp_path / "tok.json"),
                             str(tmp_path / "s*.tar")], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the hung workers too
        pytest.fail("a worker loader hung after the parent decoded a video")
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["12", "12", "12"]
