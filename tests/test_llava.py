"""LLaVA-style annotation files as training data, the shard writer, and the lmms-eval adapter."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tasks.shapes  # noqa: E402
from test_data import gray_video  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["what colour is it?", "red.", "and the shape?", "a square.", "describe it.", "a red square.",
         "a good answer.", "a bad answer."]


@pytest.fixture(scope="module")
def tok():
    return tasks.shapes.train_tokenizer(WORDS * 3 + [data.SYSTEM_PROMPT, "user\n", "assistant\n", "Describe this."],
                                vocab_size=300)


def frames_folder(path, n, colour):
    os.makedirs(path, exist_ok=True)
    for t in range(n):
        Image.new("RGB", (32, 32), tuple(min(255, c + 20 * t) for c in colour)).save(path / f"frame_{t + 1}.jpg")


def write_json(path, rows, jsonl=False):
    with open(path, "w") as fh:
        if jsonl:
            fh.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        else:
            json.dump(rows, fh)
    return str(path)


def quirky_rows(root):
    """rows as public sets publish them, quirks included; -> (rows, keys expected to survive)"""
    frames_folder(root / "videos" / "a" / "b" / "clip1", 5, (200, 0, 0))  # nested folders, frames as video
    Image.new("RGB", (40, 30), (0, 0, 200)).save(root / "pic.png")
    gray_video(root / "videos" / "v.mp4", 12)
    rows = [
        {"id": "multi", "video": "videos/a/b/clip1", "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is it?"}, {"from": "gpt", "value": "red."},
            {"from": "human", "value": "and the shape?"}, {"from": "gpt", "value": "a square."}]},
        {"id": "abs.path", "image": str(root / "pic.png"), "conversations": [  # absolute path, no newline
            {"from": "human", "value": "<image>what colour is it?"}, {"from": "gpt", "value": "red."}]},
        {"id": "gpt_first", "video": "videos/v.mp4", "conversations": [{"from": "gpt", "value": "a red square."}]},
        {"id": "system", "video": "videos/v.mp4", "conversations": [
            {"from": "system", "value": "You are a pirate."}, {"from": "human", "value": "describe it. <video>"},
            {"from": "gpt", "value": "a red square."}]},
        {"id": "text_only", "conversations": [{"from": "human", "value": "describe it."},
                                              {"from": "gpt", "value": "a red square."}]},
        {"id": "gone", "video": "videos/missing.mp4", "conversations": [
            {"from": "human", "value": "<video>\ndescribe it."}, {"from": "gpt", "value": "red."}]},
        {"id": "no_conv", "video": "videos/v.mp4"},
        {"id": "not_str", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "red."}]},
        "a row that is not an object",
    ]
    return rows, ["0000000_multi", "0000001_abs_path", "0000002_gpt_first", "0000003_system", "0000004_text_only"]


def read_all(ds):
    return {s["key"]: s for s in ds}


def text_of(tok, row):
    return tok.decode(row["ids"], skip_special_tokens=False)


def test_quirks_named_counted_skipped(tmp_path, tok, capfd):
    rows, keep = quirky_rows(tmp_path)
    path = write_json(tmp_path / "ann.json", rows)
    ds = data.ShardDataset(path, tok, stage=2, image_size=16, max_frames=4, loop=False, shuffle_buffer=1)
    got = read_all(ds)
    assert sorted(got) == keep
    assert ds.skipped == {"missing_media": 1, "missing_field": 1, "bad_field": 1, "bad_json": 1,
                          "system_turn (dropped)": 1}
    err = capfd.readouterr().err
    for name in ("0000005_gone", "missing.mp4", "0000006_no_conv", "0000007_not_str", "0000008"):
        assert name in err
    multi = text_of(tok, got["0000000_multi"]["rows"][0])
    assert "<video>" not in multi and "user\nwhat colour is it?<|im_end|>" in multi and "a square." in multi
    assert "user\nwhat colour is it?<|im_end|>" in text_of(tok, got["0000001_abs_path"]["rows"][0])
    assert "user\nDescribe this.<|im_end|>" in text_of(tok, got["0000002_gpt_first"]["rows"][0])  # source prompt
    system = text_of(tok, got["0000003_system"]["rows"][0])
    assert "pirate" not in system and "user\ndescribe it.<|im_end|>" in system
    assert [len(got[k]["frames"]) for k in keep] == [4, 1, 4, 4, 0]  # folder: 4 of 5 frames; image; video; text


def test_stage_masks_and_jsonl_and_dpo(tmp_path, tok):
    rows, _ = quirky_rows(tmp_path)
    path = write_json(tmp_path / "ann.jsonl", rows[:1] + ["{not json"], jsonl=True)
    for stage in (1, 2):
        ds = data.ShardDataset(path, tok, stage=stage, image_size=16, max_frames=4, loop=False)
        (sample,) = list(ds)
        row = sample["rows"][0]
        assert ds.skipped["bad_json"] == 1
        if stage == 1:
            assert all(row["mask"])
        else:  # exactly the two answers and their <|im_end|> are targets
            target = tok.decode([i for i, m in zip(row["ids"], row["mask"]) if m], skip_special_tokens=False)
            assert target == "red.<|im_end|>a square.<|im_end|>"
    dpo = write_json(tmp_path / "dpo.json", [
        {"id": "p", "video": "videos/v.mp4", "prompt": "<video>\ndescribe it.", "chosen": "a good answer.",
         "rejected": "a bad answer."},
        {"id": "q", "video": "videos/v.mp4", "chosen": "a good answer.", "rejected": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "a bad answer."}],
         "conversations": [{"from": "human", "value": "<video>describe it."}]},
        {"id": "r", "video": "videos/v.mp4", "prompt": "describe it.", "chosen": "a good answer."},
        # RLAIF-V rows converted to json carry their image as image_path: never a text-only pair
        {"id": "s", "image_path": "videos/v.mp4", "question": "describe it.", "chosen": "a good answer.",
         "rejected": "a bad answer.", "image_id": 7, "frame_count": 3}])
    ds = data.ShardDataset(dpo, tok, stage=3, image_size=16, max_frames=4, loop=False)
    got = read_all(ds)
    assert sorted(got) == ["0000000_p", "0000001_q"] and ds.skipped == {"missing_field": 1, "unread_media": 1}
    for s in got.values():
        chosen, rejected = (text_of(tok, r) for r in s["rows"])
        assert "user\ndescribe it.<|im_end|>" in chosen and "a good answer." in chosen
        assert "a bad answer." in rejected


def test_train_cli_on_annotation_files(tmp_path):
    """python train.py straight on LLaVA-style files: stage 2 on quirky rows, stage 3 on chosen / rejected."""
    from test_train import metrics, train
    shapes = tmp_path / "shapes"  # only for the tokenizer and the (unused) shards train.py points at
    tasks.shapes.make_shapes(shapes, n_train=8, n_val=4, n_dpo=4, n_text=4, image_size=32, frames=4, shard_size=8)
    rows, survivors = quirky_rows(tmp_path)
    ann = write_json(tmp_path / "ann.json", rows)
    run = train(shapes, tmp_path / "s2", f"--train_data={ann}", f"--media_root={tmp_path}", "--val_data=",
                "--text_data=", "--max_iters=2", "--batch_size=2", "--ckpt_interval=100")
    assert [r["iter"] for r in metrics(tmp_path / "s2")] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "s2"))
    assert "missing_media" in run.stdout + run.stderr  # the bad rows are counted where the user sees it
    pairs = write_json(tmp_path / "dpo.jsonl", [
        {"id": f"p{i}", "video": "videos/v.mp4", "prompt": "<video>\ndescribe it.",
         "chosen": "a good answer.", "rejected": "a bad answer."} for i in range(4)], jsonl=True)
    train(shapes, tmp_path / "s3", "--stage=3", f"--init_from={tmp_path / 's2'}", f"--train_data={pairs}",
          "--val_data=", "--text_data=", "--max_iters=2", "--batch_size=2", "--ckpt_interval=100")
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "s3"))


def caption_rows(root, n):
    rows = []
    for i in range(n):
        frames_folder(root / f"c{i}", 2 + i % 3, (40 * (i % 6), 100, 0))
        rows.append({"id": f"c{i}", "video": f"c{i}", "conversations": [
            {"from": "human", "value": "<video>\ndescribe it."}, {"from": "gpt", "value": WORDS[i % 8]}]})
    return rows


def test_split_by_row_over_ranks_and_workers_and_resume(tmp_path, tok):
    path = write_json(tmp_path / "ann.json", caption_rows(tmp_path, 10))  # one file, 10 rows, 4 readers
    seen = []
    for rank in range(2):
        ds = data.ShardDataset(path, tok, stage=2, image_size=16, seed=3, rank=rank, world_size=2, loop=False)
        for b in data.make_loader(ds, batch_size=2, num_workers=2):
            seen += b["keys"]
    assert sorted(seen) == sorted(f"{i:07d}_c{i}" for i in range(10))
    make = lambda: data.ShardDataset(path, tok, stage=2, image_size=16, seed=1, shuffle_buffer=4)  # noqa: E731
    run = data.make_loader(make(), batch_size=3, num_workers=2)
    it = iter(run)
    for _ in range(5):  # into the second epoch
        next(it)
    sd = json.loads(json.dumps(run.state_dict()))
    want = [next(it)["keys"] for _ in range(5)]
    resumed = data.make_loader(make(), batch_size=3, num_workers=2)
    resumed.load_state_dict(sd)
    it2 = iter(resumed)
    assert [next(it2)["keys"] for _ in range(5)] == want


def write_shards(*args, check=True):
    return subprocess.run([sys.executable, "-m", "tools.write_shards", *args], cwd=ROOT, capture_output=True,
                          text=True, check=check)


def test_shard_writer_equals_annotations_and_resumes(tmp_path, tok, monkeypatch):
    ann = write_json(tmp_path / "ann.json", caption_rows(tmp_path, 11))
    args = [f"--annotations={ann}", "--shard_size=3", "--image_size=32", "--quality=95"]
    write_shards(*args, f"--out_dir={tmp_path / 'ref'}", "--num_proc=2")
    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == [f"train-{i:06d}.tar" for i in range(4)]
    # train on both: the same samples in the same order (a bad row would not: it is dropped before the shuffle)
    rows_ds = data.ShardDataset(ann, tok, stage=2, image_size=32, seed=5, shuffle_buffer=4, annotation_block=3)
    shard_ds = data.ShardDataset(str(tmp_path / "ref" / "train-*.tar"), tok, stage=2, image_size=32, seed=5,
                                 shuffle_buffer=4)
    for a, b, _ in zip(data.make_loader(rows_ds, 2), data.make_loader(shard_ds, 2), range(12)):  # 2 epochs
        assert a["keys"] == b["keys"]
        for k in ("input_ids", "loss_mask", "frame_mask", "owner"):
            assert torch.equal(a[k], b[k]), k
        assert (a["frames"] - b["frames"]).abs().mean() < 0.05  # re-encoded jpgs
    # killed mid-way: rows fail from the third shard on; the first two shards are kept, the rest redone
    import tools.write_shards as ws
    monkeypatch.setattr(ws, "out_dir", str(tmp_path / "crash"))
    monkeypatch.setattr(ws, "annotations", ann)
    monkeypatch.setattr(ws, "shard_size", 3)
    monkeypatch.setattr(ws, "image_size", 32)
    monkeypatch.setattr(ws, "quality", 95)
    real = ws.shard_sample

    def dies(rec, root, counter):
        if int(rec["key"][:7]) >= 7:
            raise KeyboardInterrupt  # as a kill: nothing after this row is written
        return real(rec, root, counter)
    monkeypatch.setattr(ws, "shard_sample", dies)
    with pytest.raises(KeyboardInterrupt):
        ws.main()
    done = {n: os.stat(tmp_path / "crash" / n).st_mtime_ns for n in os.listdir(tmp_path / "crash")}
    assert sorted(done) == names[:2]
    (tmp_path / "crash" / "train-000003.tar.tmp").write_bytes(b"half a tar")  # a kill during a write
    write_shards(*args, f"--out_dir={tmp_path / 'crash'}")
    assert sorted(os.listdir(tmp_path / "crash")) == names
    assert all(os.stat(tmp_path / "crash" / n).st_mtime_ns == t for n, t in done.items())  # kept as they were
    for n in names:
        assert (tmp_path / "crash" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes()


def test_shard_writer_caption_videos(tmp_path, tok):
    os.makedirs(tmp_path / "vids" / "sub")
    gray_video(tmp_path / "vids" / "sub" / "a.mp4", 25)  # 2.5 s at 10 fps -> 2 frames at 1 fps
    (tmp_path / "vids" / "sub" / "a.txt").write_text("a red square.")
    (tmp_path / "vids" / "b.mp4").write_bytes(b"not a video")
    out = write_shards(f"--videos={tmp_path / 'vids'}", "--source=openvid", f"--out_dir={tmp_path / 'out'}",
                       "--image_size=32")
    assert "{'bad_video': 1}" in out.stdout and "0000000_b" in out.stderr  # named, counted, left out
    ds = data.ShardDataset(str(tmp_path / "out" / "train-*.tar"), tok, stage=2, image_size=32, loop=False)
    (sample,) = list(ds)
    assert len(sample["frames"]) == 2
    text = text_of(tok, sample["rows"][0])
    assert data.SOURCE_PROMPTS["openvid"] in text and "a red square." in text


# -----------------------------------------------------------------------------
# the lmms-eval adapter


class Request:  # lmms-eval's Instance, as far as a model sees it: .args
    def __init__(self, *args):
        self.args = args


def shapes_questions(root, n):
    """n shapes clips as frame folders + one lettered MCQ each (bench.py's record layout)"""
    records = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        imgs, facts = tasks.shapes.shapes_clip(rng, image_size=28, frames=4)
        os.makedirs(root / f"clip{i}")
        for t, im in enumerate(imgs):
            im.save(root / f"clip{i}" / f"{t}.png")
        q, options, answer = tasks.shapes.shapes_question(rng, facts, list(tasks.shapes.QUESTIONS)[i % len(tasks.shapes.QUESTIONS)])
        records.append({"id": i, "video": str(root / f"clip{i}"), "question": q, "options": options,
                        "answer": answer})
    return records


def lettered(vlm, tok):
    """Loud letter embeddings (the head is tied): a random model then answers with letters that depend on its
    input, so the accuracies compared below are not all 0."""
    with torch.no_grad():
        vlm.llm.embed_tokens.weight[[tok.token_to_id(c) for c in "ABCD"]] *= 4
    return vlm


def test_adapter_equals_bench_generate(tmp_path):
    from bench import GENERATE_SUFFIX, evaluate_mcq, extract_choice
    from test_bench import tiny_vlm
    from lmms_nanofvlm.models import AVAILABLE_MODELS
    from lmms_nanofvlm.models.nanofvlm import NanoFVLM
    assert AVAILABLE_MODELS == {"nanofvlm": "NanoFVLM"}  # what LMMS_EVAL_PLUGINS=lmms_nanofvlm registers
    records = shapes_questions(tmp_path, 6)
    tok = tasks.shapes.train_tokenizer([data.format_mcq(r["question"], r["options"]) for r in records] * 5
                               + ["A. B. C. D.", GENERATE_SUFFIX], vocab_size=300)
    vlm = lettered(tiny_vlm(tok, seed=1), tok)
    mode = "autoregressive"
    bench = evaluate_mcq(vlm, tok, records, modes=(mode,), scoring="generate", max_frames=4, image_size=28,
                         max_new_tokens=1, batch_size=1, progress=False)
    lm = NanoFVLM(model=vlm, tokenizer=tok, mode=mode, frames=4, image_size=28, max_new_tokens=1)
    lm.task_dict = {"shapes": {"test": records}}
    visual = lambda doc: [doc["video"]]  # noqa: E731
    asks = [Request(data.format_mcq(r["question"], r["options"]) + GENERATE_SUFFIX, {"until": []}, visual,
                    i, "shapes", "test") for i, r in enumerate(records)]
    texts = lm.generate_until(asks)
    assert texts == [item["text"][mode] for item in bench["items"]]
    correct = sum(extract_choice(t, r["options"]) == r["answer"] for t, r in zip(texts, records))
    assert correct / len(records) == bench["accuracy"][mode]
    print("adapter / bench accuracy", correct / len(records), bench["accuracy"][mode], texts)
    # loglikelihood: the greedy answer is greedy and likelier than another continuation
    (own, greedy), (other, not_greedy) = lm.loglikelihood([Request(asks[0].args[0], texts[0], *asks[0].args[2:]),
                                                           Request(asks[0].args[0], "zzzz", *asks[0].args[2:])])
    assert greedy and not not_greedy and 0 > own > other


TASK = """task: nanofvlm_shapes
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """from bench import GENERATE_SUFFIX, extract_choice
from data import format_mcq
def doc_to_visual(doc):
    return [doc["video"]]
def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return format_mcq(doc["question"], doc["options"]) + GENERATE_SUFFIX
def process_results(doc, results):
    return {"accuracy": float(extract_choice(results[0], doc["options"]) == doc["answer"])}
"""


def test_lmms_eval_runs_the_adapter(tmp_path):
    """python -m lmms_eval --model nanofvlm on a task over local shapes questions = bench.py's accuracy.
    Runs where lmms-eval imports (README: its venv); elsewhere the test above covers the adapter."""
    pytest.importorskip("lmms_eval")
    from bench import evaluate_mcq
    from test_bench import tiny_vlm
    records = shapes_questions(tmp_path, 6)
    write_json(tmp_path / "questions.jsonl", records, jsonl=True)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "shapes.yaml").write_text(TASK.format(data=tmp_path / "questions.jsonl"))
    (tmp_path / "task" / "utils.py").write_text(TASK_UTILS)
    tok = tasks.shapes.train_tokenizer([data.format_mcq(r["question"], r["options"]) for r in records] * 5, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    vlm = lettered(tiny_vlm(tok, seed=1), tok)
    vlm.save(str(tmp_path / "ckpt"), str(tmp_path / "tokenizer.json"))
    want = evaluate_mcq(vlm, tok, records, modes=("autoregressive",), scoring="generate", max_frames=4,
                        image_size=28, max_new_tokens=1, batch_size=1, progress=False)["accuracy"]
    env = dict(os.environ, LMMS_EVAL_PLUGINS="lmms_nanofvlm", PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    args = f"init_from={tmp_path / 'ckpt'},mode=autoregressive,max_frames=4,image_size=28,max_new_tokens=1"
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "nanofvlm", "--model_args", args,
                          "--tasks", "nanofvlm_shapes", "--include_path", str(tmp_path / "task"),
                          "--output_path", str(tmp_path / "out"), "--batch_size", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith("results.json")]
    assert len(results) == 1, run.stdout[-2000:] + run.stderr[-3000:]
    result = results[0]
    got = json.load(open(result))["results"]["nanofvlm_shapes"]
    assert got["accuracy,none"] == pytest.approx(want["autoregressive"])
    print("lmms-eval / bench accuracy", got["accuracy,none"], want["autoregressive"])
