"""bench.py: prefix-cached option scores == full recomputation, the right option wins, every task reader parses its
official layout (real mp4/gif written with PyAV), letter extraction, FLOPs, the speed report."""
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

import bench
from bench import MODES, evaluate_mcq, extract_choice, option_answers, score_options
from tasks.common import load_frames
from data import encode_prompt, format_mcq, write_tar
from tasks.shapes import train_tokenizer
from conftest import steered
from model import DinoConfig, DINOv2, FoveatedVLM, LLMConfig, SmolLM2
from perf.flops import gpu_peak, train_flops
import tasks.shapes
import tasks.mvbench
import tasks.videomme
import tasks.scienceqa
import tasks.pope
import tasks.shards
import perf.speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = ["dog", "cat", "bird", "fish", "horse"]
SIZE = 28  # 2x2 patches of 14: tiny but real DINOv2 shapes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: OpenMP threads waiting on each other cost 30x; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"which animal is it? {' '.join(ANIMALS)} yes no Context: is there a dog in the image?"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    tok.path = str(path)
    return tok


def tiny_vlm(tok, seed=0):
    torch.manual_seed(seed)
    llm = SmolLM2(LLMConfig(vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, hidden_dim=128, max_seq_len=512))
    return steered(FoveatedVLM(llm, DINOv2(DinoConfig(image_size=56, patch_size=14, dim=48, n_layers=2, n_heads=3))).eval())


@pytest.fixture(scope="module")
def vlm(tok):
    return tiny_vlm(tok)


@torch.no_grad()
def score_options_naive(model, frames, prompt_ids, answers, mode, score="mean"):
    """The oracle: per option a full forward, re-encoding the video every time (what the original did)."""
    out = []
    for a in answers:
        ids = torch.tensor([prompt_ids + a], device=frames.device)
        mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(a)], device=frames.device)
        _, loss = model(frames[None], ids, loss_mask=mask, mode=mode)
        out.append(loss * (1 if score == "mean" else len(a)))
    return torch.stack(out).float()


def run_bench(tmp_path, *args):
    """bench.py as users run it; returns what it wrote to --out"""
    proc = subprocess.run([sys.executable, "bench.py", *args, f"--out={tmp_path / 'r.json'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(tmp_path / "r.json"))


def check_cached_equals_full(model, tok, frames, options, tol=1e-4):
    user = format_mcq("which animal is it?", options)
    prompt = encode_prompt(tok, user)
    answers = option_answers(tok, options)
    assert len({len(a) for a in answers}) > 1, "options of different lengths exercise the right padding"
    mask = torch.ones(1, frames.shape[0], dtype=torch.bool)
    kv = model.encode(frames[None], mask)
    for mode in MODES:
        for score in ("mean", "sum"):
            fast = score_options(model, tok, kv, mask, [user], [answers], mode, score)[0]
            full = score_options_naive(model, frames, prompt, answers, mode, score)
            assert fast.shape == (len(options),)
            assert (fast - full).abs().max().item() <= tol, (mode, score, fast, full)


@torch.no_grad()
def original_scores(model, tok, frames, question, options, mode):
    """The original benchmark's option score, written the way it computed it: the whole chat as one text,
    "...X. option<|im_end|>\\n", a loss mask from the end of the generation prompt, CE with ignore_index = the
    pad id (<|im_end|>), summed over the mask and divided by the mask's sum."""
    from data import SYSTEM_PROMPT
    head = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{format_mcq(question, options)}<|im_end|>\n"
    prompt = tok.encode(head + "<|im_start|>assistant\n", add_special_tokens=False).ids
    out = []
    for i, o in enumerate(options):
        ids = tok.encode(head + f"<|im_start|>assistant\n{'ABCD'[i]}. {o}<|im_end|>\n", add_special_tokens=False).ids
        logits, _ = model(frames[None], torch.tensor([ids]), mode=mode)
        mask = torch.zeros(len(ids))
        mask[len(prompt):] = 1
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), ignore_index=2, reduction="none")
        out.append(float((ce * mask[1:]).sum() / mask[1:].sum()))
    return out


def test_original_score_equals_the_original_formula(vlm, tok):
    frames = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    options = ["dog", "fish horse cat bird", "cat"]
    user = format_mcq("which animal is it?", options)
    mask = torch.ones(1, 3, dtype=torch.bool)
    kv = vlm.encode(frames[None], mask)
    for mode in MODES:
        ours = score_options(vlm, tok, kv, mask, [user], [option_answers(tok, options, "original")], mode,
                             "original")[0]
        want = original_scores(vlm, tok, frames, "which animal is it?", options, mode)
        assert ours.tolist() == pytest.approx(want, abs=1e-4), mode
        mean = score_options(vlm, tok, kv, mask, [user], [option_answers(tok, options)], mode, "mean")[0]
        assert (ours - mean).abs().max() > 1e-3  # a different score, not a renamed one


def test_cached_scores_equal_full_recomputation(vlm, tok):
    g = torch.Generator().manual_seed(1)
    check_cached_equals_full(vlm, tok, torch.randn(3, 3, SIZE, SIZE, generator=g), ["dog", "fish horse cat bird", "cat"])
    check_cached_equals_full(vlm, tok, torch.randn(5, 3, SIZE, SIZE, generator=g), ["yes", "no no no"])


def test_cached_scores_real_smollm2(smollm2_dir):
    from data import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    model = steered(FoveatedVLM(SmolLM2.from_pretrained(smollm2_dir), DINOv2(DinoConfig(n_layers=4))).eval())
    frames = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    check_cached_equals_full(model, tok, frames, ["a dog", "a cat sitting on a mat"])


def records_with_known_answer(n=4):
    recs = []
    for i in range(n):
        opts = [a for a in ANIMALS[1:]][:3]
        opts.insert(i % 4, "dog")
        recs.append({"id": f"q{i}", "question": "which animal is it?", "options": opts, "answer": i % 4,
                     "category": "even" if i % 2 == 0 else "odd",
                     "frames": torch.randn(2 + i, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))})
    recs.append({"id": "broken", "question": "which animal is it?", "options": ["dog", "cat"], "answer": 0,
                 "category": "odd", "video": "/nonexistent/video.mp4"})
    return recs


def test_right_option_wins_and_missing_media_counts(tok):
    # a bias-only lm_head that loves " dog": the dog option must win in every mode, at every position
    model = tiny_vlm(tok, seed=3)
    head = torch.nn.Linear(model.llm.cfg.dim, tok.get_vocab_size(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.encode(" dog").ids] = 8.0
    model.llm.lm_head = head
    model.train()
    res = evaluate_mcq(model, tok, records_with_known_answer(), progress=False)
    assert model.training, "evaluate_mcq restores the training flag"
    assert res["count"] == 5 and res["skipped_count"] == 1
    assert res["skipped"][0]["id"] == "broken" and "missing" in res["skipped"][0]["reason"]
    for mode in MODES:
        r = res["modes"][mode]
        assert (r["correct"], r["total"]) == (4, 5), (mode, r)  # the broken one is counted, wrong
        assert r["per_category"]["even"]["accuracy"] == 1.0
        assert r["per_category"]["odd"] == {"accuracy": 2 / 3, "correct": 2, "total": 3}
    assert res["items"][2]["pred"] == {m: 2 for m in MODES} and res["accuracy"] == {m: 0.8 for m in MODES}
    gen = evaluate_mcq(model, tok, records_with_known_answer(), progress=False, scoring="generate", max_new_tokens=3)
    assert "generate" in gen["scoring"] and "likelihood" in res["scoring"]
    assert all(gen["modes"][m]["correct"] == 4 for m in MODES), gen["items"][0]
    # deterministic: train.py's final eval and `bench.py --task shapes` must agree
    again = evaluate_mcq(model, tok, records_with_known_answer(), progress=False)
    assert again["items"] == res["items"]


def test_batched_questions_equal_one_at_a_time(vlm, tok):
    # videos of 2..5 frames, prompts and options of different lengths, a broken record in the middle
    recs = records_with_known_answer()
    recs[1]["options"] = ["a horse that runs", "cat", "dog", "fish"]
    alone = evaluate_mcq(vlm, tok, recs, progress=False, batch_size=1)
    batched = evaluate_mcq(vlm, tok, recs, progress=False, batch_size=3)
    gen_alone = evaluate_mcq(vlm, tok, recs, progress=False, batch_size=1, scoring="generate", max_new_tokens=4)
    gen_batched = evaluate_mcq(vlm, tok, recs, progress=False, batch_size=4, scoring="generate", max_new_tokens=4)
    for a, b in zip(alone["items"], batched["items"]):
        assert a["pred"] == b["pred"]
        for m in MODES:
            assert a.get("scores", {}).get(m) == pytest.approx(b.get("scores", {}).get(m), abs=1e-4)
    assert [i.get("text") for i in gen_alone["items"]] == [i.get("text") for i in gen_batched["items"]]


def test_extract_choice():
    opts = ["dog", "cat", "bird", "dark red"]
    assert extract_choice("B", opts) == 1
    assert extract_choice("(C)", opts) == 2
    assert extract_choice("The answer is D.", opts) == 3
    assert extract_choice("Answer: (b)", opts) == 1
    assert extract_choice("C. bird", opts) == 2
    assert extract_choice("a cat is sitting there", opts) == 1  # lowercase article, then the option's text
    assert extract_choice("A dog runs.", opts) == 0  # capital article: the text decides, not the 'A'
    assert extract_choice("A cat runs.", opts) == 1  # lmms-eval would say A here
    assert extract_choice("Bird", opts) == 2  # the answer given as the option's text
    assert extract_choice("it is dark red", ["red", "green", "blue", "dark red"]) == 3  # longest mention wins
    assert extract_choice("I think the right one is C", opts) == 2
    assert extract_choice("no idea", opts) is None
    assert extract_choice("E", opts) is None  # not an offered letter


# -----------------------------------------------------------------------------
# task readers on tiny datasets in each official layout


def write_video(path, n=12, size=32, fps=6):
    codec, fmt = ("gif", "rgb8") if str(path).endswith(".gif") else ("mpeg4", "yuv420p")
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width = s.height = size
        s.pix_fmt = fmt
        for i in range(n):
            a = np.full((size, size, 3), (i * 10) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_image(path, size=32, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size + 8, size), colour).save(path)


def frames_of(rec, n=4):
    return load_frames(rec, max_frames=n, image_size=SIZE)


def test_read_mvbench(tmp_path):
    d = tmp_path / "MVBench"
    (d / "json").mkdir(parents=True)
    star = d / "video" / "star" / "Charades_v1_480"
    star.mkdir(parents=True)
    write_video(star / "AB12C.mp4", n=24)
    mit = d / "video" / "Moments_in_Time_Raw" / "videos"
    mit.mkdir(parents=True)
    write_video(mit / "clip.gif", n=8)
    elsewhere = d / "unpacked_somewhere_else"
    elsewhere.mkdir()
    write_video(elsewhere / "lost.mp4")  # not in its mapped folder: found by name
    tvqa = d / "video" / "tvqa" / "frames_fps3_hq" / "castle_s01_clip_01"
    for i in range(1, 31):
        write_image(str(tvqa / f"frame_{i}.jpg"), colour=(i * 8, 0, 0))  # natural order: frame_2 before frame_10
    json.dump([{"video": "AB12C.mp4", "question": "What did the person do first?", "candidates": ["sat", "ran", "ate"],
                "answer": "ran", "start": 0.5, "end": 3.0}], open(d / "json" / "action_sequence.json", "w"))
    json.dump([{"video": "clip.gif", "question": "What happens?", "candidates": ["falling", "jumping"], "answer": "falling"},
               {"video": "lost.mp4", "question": "What happens?", "candidates": ["x", "y"], "answer": "y"},
               {"video": "gone.mp4", "question": "What happens?", "candidates": ["x", "y"], "answer": "x"}],
              open(d / "json" / "fine_grained_action.json", "w"))
    json.dump([{"video": "castle_s01_clip_01", "question": "Why?", "candidates": ["a", "b", "c", "d"], "answer": "d",
                "start": 2.0, "end": 8.0}], open(d / "json" / "episodic_reasoning.json", "w"))
    # Character Order's options are letters, and MVBench's answer is the option's text, not a letter
    json.dump([{"video": "AB12C.mp4", "question": "In what order?", "candidates": ["c", "a", "b"], "answer": "a"}],
              open(d / "json" / "character_order.json", "w"))
    recs = tasks.mvbench.read(str(d))
    by_id = {r["id"]: r for r in recs}
    assert len(recs) == 6 and by_id["character_order/0"]["answer"] == 1
    seq = by_id["action_sequence/0"]
    assert seq["answer"] == 1 and seq["options"] == ["sat", "ran", "ate"] and (seq["start"], seq["end"]) == (0.5, 3.0)
    assert seq["video"] == str(star / "AB12C.mp4") and frames_of(seq).shape == (4, 3, SIZE, SIZE)
    assert frames_of(by_id["fine_grained_action/0"]).shape == (4, 3, SIZE, SIZE)
    assert by_id["fine_grained_action/1"]["video"] == str(elsewhere / "lost.mp4") and by_id["fine_grained_action/1"]["answer"] == 1
    assert "missing" in by_id["fine_grained_action/2"]["error"]
    ep = frames_of(by_id["episodic_reasoning/0"])  # files 6..24 of 30 at 3 fps: red is 8 x the frame number
    red = (ep[:, 0] * 0.229 + 0.485).mean((1, 2)) * 255 / 8
    assert ep.shape == (4, 3, SIZE, SIZE) and red.round().tolist() == [9, 13, 18, 22]


def test_read_videomme(tmp_path):
    d = tmp_path / "Video-MME"
    (d / "data").mkdir(parents=True)
    write_video(d / "data" / "fFjv93ACGo8.mp4")
    row = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
           "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
           "question": "How many people?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"}
    (d / "videomme").mkdir()
    with open(d / "videomme" / "test.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n" + json.dumps(dict(row, videoID="missing1", question_id="002-1", answer="A")) + "\n")
    json.dump({"version": 1}, open(d / "videomme" / "meta.json", "w"))  # unrelated: ignored
    recs = tasks.videomme.read(str(d))
    assert [r["answer"] for r in recs] == [2, 0] and recs[0]["options"] == ["1.", "2.", "3.", "4."]
    assert recs[0]["category"] == "short" and recs[0]["task_type"] == "Counting Problem"
    assert frames_of(recs[0], 16).shape == (12, 3, SIZE, SIZE)  # 12-frame clip: every frame once
    assert "missing" in recs[1]["error"]
    assert [r["id"] for r in tasks.videomme.read(str(d), "short")] == ["001-1", "002-1"]
    assert tasks.videomme.read(str(d), "long") == []


def test_read_scienceqa(tmp_path):
    d = tmp_path / "ScienceQA" / "data" / "scienceqa"
    d.mkdir(parents=True)
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["shark", "dog"], "answer": 1, "hint": "Look at the animals.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "6": {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "7": {"question": "Train split", "choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "train"}}
    json.dump(problems, open(d / "problems.json", "w"))
    write_image(str(d / "images" / "test" / "5" / "image.png"))
    write_image(str(d / "images" / "train" / "7" / "image.png"))
    json.dump({"version": 1}, open(d / "info.json", "w"))
    json.dump({"train": ["7"], "test": ["5", "6"]}, open(d / "pid_splits.json", "w"))
    recs = tasks.scienceqa.read(str(tmp_path / "ScienceQA"))
    assert len(recs) == 1
    r = recs[0]
    assert r["question"] == "Context: Look at the animals.\nWhich is a mammal?" and r["answer"] == 1
    assert r["category"] == "natural science" and "error" not in r
    x = frames_of(r)
    assert x.shape == (8, 3, SIZE, SIZE) and torch.equal(x[0], x[7])  # an image is replicated to 8 frames


def test_read_pope(tmp_path):
    d = tmp_path / "POPE"
    (d / "output" / "coco").mkdir(parents=True)
    write_image(str(d / "val2014" / "COCO_val2014_000000310196.jpg"))
    rows = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"}]
    with open(d / "output" / "coco" / "coco_pope_adversarial.json", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")  # the official files are JSON lines
    with open(d / "output" / "coco" / "aokvqa_pope_adversarial.json", "w") as f:  # another variant, same suffix
        f.write(json.dumps(rows[0]) + "\n")
    json.dump({"version": 1}, open(d / "output" / "info.json", "w"))  # unrelated json files get ignored
    json.dump([1, 2], open(d / "list.json", "w"))
    recs = tasks.pope.read(str(d))
    assert [r["answer"] for r in recs] == [0, 0, 1] and recs[0]["options"] == ["yes", "no"]
    assert [r["category"] for r in recs] == ["aokvqa_adversarial", "coco_adversarial", "coco_adversarial"]
    assert frames_of(recs[1]).shape == (8, 3, SIZE, SIZE)


def test_read_shards_and_cli(tmp_path, tok, vlm):
    from tasks.shapes import jpg as _jpg
    img = Image.new("RGB", (SIZE, SIZE), (10, 200, 10))
    samples = [("s0", {**{f"{i:03d}.jpg": _jpg(img) for i in range(20)}, "json": {
                   "user": "which animal is it?\nA. dog\nB. cat\nC. fish", "assistant": "B. cat", "source": "zoo"}}),
               ("s1", {"json": {"user": "no options here", "assistant": "hello"}}),
               ("s2", {"mp4": b"not a video", "json": {"user": "which?\nA. yes\nB. no", "assistant": "A. yes"}})]
    write_tar(str(tmp_path / "val-0000.tar"), samples)
    recs = tasks.shards.read(str(tmp_path), tok, max_frames=16, image_size=SIZE)
    assert [(r["question"], r["options"], r["answer"]) for r in recs] == [
        ("which animal is it?", ["dog", "cat", "fish"], 1), ("which?", ["yes", "no"], 0)]
    assert frames_of(recs[0]).shape == (16, 3, SIZE, SIZE)  # what the reader was asked for
    # the CLI end to end on our checkpoint format: the corrupt mp4 is counted and listed
    ckpt = tmp_path / "ckpt"
    vlm.save(str(ckpt), tokenizer=tok.path)
    saved = run_bench(tmp_path, "--task=shards", f"--data_dir={tmp_path}", f"--init_from={ckpt}",
                      f"--image_size={SIZE}", "--modes=coarse_only,autoregressive")
    assert saved["max_frames"] == 64 and saved["score"] == "mean"  # shards: every frame, up to 64, as the original
    assert saved["count"] == 2 and saved["skipped_count"] == 1 and "decode" in saved["skipped"][0]["reason"]
    assert list(saved["modes"]) == ["coarse_only", "autoregressive"] and saved["task"] == "shards"
    assert saved["modes"]["coarse_only"]["total"] == 2


def test_shapes_cli_matches_evaluate_mcq(tmp_path):
    from data import load_tokenizer
    from tasks.shapes import QUESTIONS, make_shapes
    d = tmp_path / "shapes"
    make_shapes(str(d), n_train=4, n_val=6, n_dpo=1, n_text=1, image_size=32, frames=3)
    tok = load_tokenizer(str(d))
    model = tiny_vlm(tok, seed=1)
    model.save(str(tmp_path / "ckpt"), tokenizer=str(d / "tokenizer.json"))
    out = run_bench(tmp_path, "--task=shapes", f"--data_dir={d}", f"--init_from={tmp_path / 'ckpt'}")
    assert out["image_size"] == 32 and out["count"] == 6  # the size shapes.json says, as train.py reads it
    assert set(out["modes"]["coarse_fine"]["per_category"]) == set(QUESTIONS)
    direct = evaluate_mcq(model, tok, tasks.shapes.read(str(d), 32), progress=False)  # what train.py calls
    assert direct["accuracy"] == out["accuracy"]


# -----------------------------------------------------------------------------
# speed


@pytest.mark.parametrize("mode,rows,question", [(m, 1, 0) for m in MODES] + [("coarse_fine", 2, 0)]
                         + [(m, 2, 7) for m in MODES])
def test_train_flops_matches_counted(vlm, mode, rows, question):
    from torch.utils.flop_counter import FlopCounterMode
    B, T, S = 2, 3, 10
    frames, ids = torch.randn(B, T, 3, SIZE, SIZE), torch.randint(3, 300, (B * rows, S))
    q = dict(question_ids=torch.randint(3, 300, (B * rows, question))) if question else {}
    with FlopCounterMode(display=False) as fc:
        vlm(frames, ids, mode=mode, owner=torch.arange(B).repeat_interleave(rows), **q)
    counted, ours = fc.get_total_flops(), train_flops(vlm, B, T, S, SIZE, mode, rows, False, question) / 3
    assert abs(ours - counted) / counted < 0.1, (ours, counted)


def test_speed_report(tok, tmp_path, monkeypatch):
    tiny_vlm(tok).save(tmp_path / "ckpt" / "step-0000001", tok.path)  # a run dir of step-* dirs, as train.py writes
    for key, value in dict(init_from=str(tmp_path), speed_frames="2,3", speed_text=8, speed_steps=1,
                            speed_dtypes="float32,bfloat16").items():
        monkeypatch.setattr(perf.speed, key, value)
    rep = perf.speed.speed()
    for T in (2, 3):
        row = rep[f"T{T}"]
        for dt in ("float32", "bfloat16"):
            r = row[dt]
            # mfu: the CPU peak is measured in the run, on a machine other jobs share: it can read low, and a
            # ratio above 1 is then reported as None
            assert r["samples_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] <= 1) and r["peak_mem_mb"] > 10
        assert abs(row["bfloat16"]["loss"] / row["float32"]["loss"] - 1) < 0.02  # same weights, same batch
        assert row["loader_samples_per_s"] > 0
    assert rep["decode_tokens_per_s"] > 0 and rep["decode_tokens_per_s_bf16"] > 0 and rep["mcq_questions_per_s"] > 0
    assert rep["dpo_over_stage2"] > 0 and rep["dpo_precomputed_over_stage2"] > 0


@pytest.mark.parametrize("mode,dpo_step,coarse_weight", [("coarse_fine", False, 0), ("autoregressive", False, 0),
                                                        ("coarse_fine", True, 0), ("coarse_fine", False, 1),
                                                        ("autoregressive", False, 1)])
def test_train_step_flops_match_counted(tok, mode, dpo_step, coarse_weight):
    """A whole step, forward + backward, against the counter: lm_head on the loss positions only, DPO's two
    answers + the frozen reference's forward, and the coarse pass answering too."""
    import dpo
    from torch.utils.flop_counter import FlopCounterMode
    vlm, (B, T, S) = tiny_vlm(tok).train(), (2, 3, 10)
    rows = 2 if dpo_step else 1
    frames, ids = torch.randn(B, T, 3, SIZE, SIZE), torch.randint(3, 300, (B * rows, S))
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1  # the answer: 4 tokens, predicted from 4 positions of 10
    batch = {"frames": frames, "frame_mask": torch.ones(B, T, dtype=torch.bool), "input_ids": ids,
             "loss_mask": mask, "owner": torch.arange(B).repeat_interleave(rows), "keys": ["a", "b"]}
    with FlopCounterMode(display=False) as fc:
        if dpo_step:
            dpo.batch_loss(vlm, dpo.make_reference(vlm), batch)[0].backward()
        else:
            vlm(frames, ids, mask, mode=mode, coarse_loss_weight=coarse_weight)[1].backward()
    ours = train_flops(vlm, B, T, S, SIZE, mode, rows, dpo_step, targets=4, coarse_answers=coarse_weight > 0)
    assert abs(ours - fc.get_total_flops()) / ours < 0.1, (ours, fc.get_total_flops())


def test_train_flops_of_extra_text_rows(tok):
    """Frames first, coarse_fine whose coarse pass answers: that pass reads each row's text, so each row walks
    its own glimpses; the cost of rows 2-3 of a sample against the counter."""
    from torch.utils.flop_counter import FlopCounterMode
    vlm, (B, T, S) = tiny_vlm(tok).train(), (2, 8, 6)

    def step(rows):  # (ours, counted)
        frames, ids = torch.randn(B, T, 3, SIZE, SIZE), torch.randint(3, 300, (B * rows, S))
        mask = torch.zeros_like(ids)
        mask[:, 3:] = 1
        with FlopCounterMode(display=False) as fc:
            vlm(frames, ids, mask, mode="coarse_fine", owner=torch.arange(B).repeat_interleave(rows),
                coarse_loss_weight=0.3)[1].backward()
        return train_flops(vlm, B, T, S, SIZE, "coarse_fine", rows, targets=3, coarse_answers=True), fc.get_total_flops()
    (ours_1, counted_1), (ours_3, counted_3) = step(1), step(3)
    assert abs((ours_3 - ours_1) / (counted_3 - counted_1) - 1) < 0.1, (ours_3 - ours_1, counted_3 - counted_1)


@pytest.mark.parametrize("name,bf16,tf32,fp32", [
    ("NVIDIA H100 80GB HBM3", 989, 495, 67), ("NVIDIA H100 PCIe", 756, 378, 51), ("NVIDIA H100 NVL", 835, 418, 60),
    ("NVIDIA H200", 989, 495, 67), ("NVIDIA H200 NVL", 835, 418, 60), ("NVIDIA B200", 2250, 1125, 75),
    ("NVIDIA A100-SXM4-80GB", 312, 156, 19.5), ("NVIDIA A100 80GB PCIe", 312, 156, 19.5), ("NVIDIA A10G", 70, 35, 31.2),
    ("NVIDIA L4", 121, 60, 30.3), ("NVIDIA L40S", 362, 183, 91.6), ("NVIDIA GeForce RTX 4090", 165.2, 82.6, 82.6),
    ("NVIDIA GH200 480GB", None, None, None), ("NVIDIA A10", None, None, None), ("Tesla T4", None, None, None),
    ("NVIDIA RTX A1000", None, None, None), ("NVIDIA GeForce GTX 1080", None, None, None)])
def test_gpu_peak_by_device_name(name, bf16, tf32, fp32):
    """Most specific name first; fp32 counts at the TF32 rate only when allowed; a GPU not in the table (GH200 is
    not an H200, A1000 not an A100, A10 not an A10G): None, so no MFU is reported rather than a wrong one."""
    tera = lambda x: None if x is None else x * 1e12  # noqa: E731
    assert gpu_peak(name, torch.bfloat16, tf32=False) == tera(bf16)
    assert gpu_peak(name, torch.float32, tf32=True) == tera(tf32)
    assert gpu_peak(name, torch.float32, tf32=False) == tera(fp32)


def test_read_scienceqa_hugging_face_release(tmp_path):
    """derek-thomas/ScienceQA: a parquet table per split, each image a struct holding its bytes, no split column."""
    import io as bytes_io
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    png = bytes_io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 200)).save(png, "PNG")
    d = tmp_path / "ScienceQA" / "data"
    d.mkdir(parents=True)
    for split in ("test", "validation"):
        rows = [{"image": {"bytes": png.getvalue(), "path": None}, "question": f"{split} q{j}?", "choices": ["a", "b"],
                 "answer": j % 2, "hint": "", "subject": "natural science"} for j in range(2)]
        rows.append(dict(rows[0], image=None))  # a text-only question: not an image question
        pq.write_table(pa.Table.from_pylist(rows), d / f"{split}-00000-of-00001.parquet")
    for name in ("val", "validation"):  # the official name and Hugging Face's
        recs = tasks.scienceqa.read(str(tmp_path / "ScienceQA"), name)
        assert [r["question"] for r in recs] == ["validation q0?", "validation q1?"]
    recs = tasks.scienceqa.read(str(tmp_path / "ScienceQA"), "test")
    assert [r["answer"] for r in recs] == [0, 1] and len({r["id"] for r in recs}) == 2
    assert frames_of(recs[0]).shape == (8, 3, SIZE, SIZE)  # from the bytes
    with pytest.raises(ValueError, match="'train'.*splits there: \\['test', 'validation'\\]"):
        tasks.scienceqa.read(str(tmp_path / "ScienceQA"), "train")


def test_shards_written_by_write_shards_are_scored(tmp_path, tok, vlm):
    """annotations -> tools/write_shards (which stores `user` as a list of turns) -> --task=shards: the same questions."""
    write_image(str(tmp_path / "a.png"))
    rows = [{"id": "q1", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nwhich animal is it?\nA. dog\nB. cat"}, {"from": "gpt", "value": "B. cat"},
                {"from": "human", "value": "and its colour?\nA. red\nB. blue\nC. green"}, {"from": "gpt", "value": "A"}]},
            {"id": "q2", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\ndescribe it"}, {"from": "gpt", "value": "a red square"}]}]
    json.dump(rows, open(tmp_path / "ann.json", "w"))
    proc = subprocess.run([sys.executable, "-m", "tools.write_shards", f"--annotations={tmp_path / 'ann.json'}",
                           f"--out_dir={tmp_path / 'shards'}", f"--image_size={SIZE}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = tasks.shards.read(str(tmp_path / "shards"), tok, image_size=SIZE)
    assert [(r["question"], r["options"], r["answer"]) for r in recs] == [
        ("which animal is it?", ["dog", "cat"], 1), ("and its colour?", ["red", "blue", "green"], 0)]
    ckpt = tmp_path / "ckpt"
    vlm.save(str(ckpt), tokenizer=tok.path)
    saved = run_bench(tmp_path, "--task=shards", f"--data_dir={tmp_path / 'shards'}", f"--init_from={ckpt}",
                      f"--image_size={SIZE}", "--modes=coarse_only")
    assert saved["count"] == 2 and saved["skipped_count"] == 0


def test_a_run_that_scores_nothing_fails(tmp_path, tok, vlm):
    """Zero questions, or none with usable media, is an error with the reason, never a table of zeros."""
    ckpt = tmp_path / "ckpt"
    vlm.save(str(ckpt), tokenizer=tok.path)
    (tmp_path / "empty").mkdir()
    data_mod = __import__("data")
    data_mod.write_tar(str(tmp_path / "empty" / "x.tar"), [("s0", {"json": {"user": "hi", "assistant": "hello"}})])
    bad = tmp_path / "bad"
    bad.mkdir()
    data_mod.write_tar(str(bad / "x.tar"), [("s0", {"mp4": b"junk", "json": {"user": "which?\nA. yes\nB. no", "assistant": "A"}})])
    for folder, said in (("empty", "found no questions"), ("bad", "none of the 1 questions could be scored")):
        proc = subprocess.run([sys.executable, "bench.py", "--task=shards", f"--data_dir={tmp_path / folder}",
                               f"--init_from={ckpt}", f"--image_size={SIZE}", "--modes=coarse_only"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and said in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "bench.py", "--task=scienceqa", f"--data_dir={tmp_path / 'empty'}",
                           f"--init_from={ckpt}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "bench.py:" in proc.stderr and "Traceback" not in proc.stderr
    # where the results go is checked before the work starts
    proc = subprocess.run([sys.executable, "bench.py", "--task=shards", f"--data_dir={bad}", f"--init_from={ckpt}",
                           f"--out={tmp_path / 'no-such-dir' / 'r.json'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "its folder is missing" in proc.stderr


def test_pope_as_released_and_its_table(tmp_path):
    """lmms-lab/POPE's parquet (image bytes, category), the official files with COCO images elsewhere (a symlinked
    folder), a label neither yes nor no counted as an error, and the POPE paper's metrics per category."""
    import io as bytes_io
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    png = bytes_io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 200)).save(png, "PNG")
    d = tmp_path / "lmms-pope" / "data"
    d.mkdir(parents=True)
    rows = [{"question_id": str(i), "question": "Is there a dog in the image?", "answer": a, "image_source": "x",
             "image": {"bytes": png.getvalue(), "path": None}, "category": c}
            for i, (a, c) in enumerate([("yes", "random"), ("no", "random"), ("no", "popular"), ("maybe", "popular")])]
    pq.write_table(pa.Table.from_pylist(rows), d / "test-00000-of-00001.parquet")
    recs = tasks.pope.read(str(tmp_path / "lmms-pope"))
    assert [r["category"] for r in recs] == ["random", "random", "popular", "popular"]
    assert [r["answer"] for r in recs[:3]] == [0, 1, 1] and "neither yes nor no" in recs[3]["error"]
    assert frames_of(recs[0]).shape == (8, 3, SIZE, SIZE)
    # the official files, the images in a COCO folder outside data_dir that a symlink points to
    official, coco = tmp_path / "POPE", tmp_path / "elsewhere" / "val2014"
    (official / "output").mkdir(parents=True)
    write_image(str(coco / "COCO_val2014_000000000001.jpg"))
    (tmp_path / "link").mkdir()
    os.symlink(coco, tmp_path / "link" / "coco")
    with open(official / "output" / "coco_pope_random.json", "w") as f:
        f.write(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?",
                            "label": "yes"}) + "\n")
    (rec,) = tasks.pope.read(str(official), image_root=str(tmp_path / "link"))
    assert rec["image"] == str(tmp_path / "link" / "coco" / "COCO_val2014_000000000001.jpg") and "error" not in rec
    # the metrics, "yes" the positive class: predictions yes, yes, no for answers yes, no, no
    items = [{"category": "c", "answer": a, "pred": {"ar": p}} for a, p in ((0, 0), (1, 0), (1, 1))]
    m = tasks.pope.metrics(items + [{"category": "c", "answer": 0, "pred": {}, "error": "x"}], ["ar"])["ar"]
    assert m["c"] == m["all"] and m["all"]["count"] == 3
    assert m["all"]["accuracy"] == pytest.approx(2 / 3) and m["all"]["precision"] == 0.5 and m["all"]["recall"] == 1.0
    assert m["all"]["f1"] == pytest.approx(2 / 3) and m["all"]["yes_ratio"] == pytest.approx(2 / 3)
    assert "POPE, ar" in tasks.pope.table({"ar": m})


def test_read_videomme_parquet_release(tmp_path):
    """lmms-lab/Video-MME: videomme/test-*.parquet (options a list of "A. ..." strings, answer a letter)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    d = tmp_path / "Video-MME"
    (d / "videomme").mkdir(parents=True)
    (d / "data").mkdir()
    write_video(d / "data" / "fFjv93ACGo8.mp4")
    row = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
           "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
           "task_type": "Counting Problem", "question": "How many people?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
           "answer": "C"}
    pq.write_table(pa.Table.from_pylist([row]), d / "videomme" / "test-00000-of-00001.parquet")
    (rec,) = tasks.videomme.read(str(d))
    assert rec["answer"] == 2 and rec["options"] == ["1.", "2.", "3.", "4."] and rec["id"] == "001-1"
    assert frames_of(rec, 16).shape == (12, 3, SIZE, SIZE)


def test_mfu_is_never_above_one():
    """A CPU peak measured while other jobs ran is too low: an MFU above 100% is reported as none, not as 103%."""
    from perf.flops import mfu
    assert mfu(50, 1.0, 100) == 0.5 and mfu(103, 1.0, 100) is None and mfu(50, 1.0, None) is None
