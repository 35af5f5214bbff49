"""
Benchmarks for nanofVLM: multiple-choice accuracy on video/image benchmarks, and training/inference speed.

    python bench.py --task shapes                               # after `python train.py`: the held-out shapes MCQs
    python bench.py --task mvbench --data_dir MVBench --ckpt out/my/ckpt --out results.json
    python bench.py --task videomme --data_dir Video-MME --llm_dir SmolLM2-135M-Instruct --dino_dir dinov2-small \
        --init_from fVLM-135M/model.safetensors --limit 200
    python bench.py --task speed [--llm_dir SmolLM2-135M-Instruct] [--dtype both] [--naive]

Scoring (reference section 7): ONE DINOv2 encode per question and ONE LLM prefill per mode; the K options
("X. option text" + <|im_end|>) are scored in one batch from the repeated cache. Lowest mean (--score=sum: summed)
per-token CE wins: "likelihood". --scoring=generate answers greedily and extracts a letter lmms-eval style (minus
its traps), comparable with published SmolVLM2 results but not with "likelihood"; the output says which was used.

Layouts read (--data_dir points at the folder you downloaded):
  mvbench    json/<task>.json (20 tasks, lists of {video, question, candidates, answer (option text), start?, end?})
             and video/<folder>/<video>: folder from the official task -> folder table (MVBENCH_VIDEO below);
             a video not found there is searched by file name under --data_dir. mp4/webm/avi/gif or frame folders.
  videomme   any *.json / *.jsonl (or *.parquet when pyarrow is installed) with rows {videoID, question,
             options ["A. ..", ...], answer (letter), duration, domain, task_type}; videos <videoID>.mp4 anywhere
             under --data_dir (the release unzips them into data/). Category = duration (short/medium/long).
  scienceqa  the official release: problems.json ({pid: {question, choices, answer (index), hint, image, split,
             subject}}) with images/<split>/<pid>/image.png; or a JSON/JSONL list of {question, choices,
             answer (index, letter or text), image (path relative to the file), hint?, subject?}.
             Image questions of --split (default test) only. Images are replicated to 8 frames.
  pope       the official POPE files (e.g. coco_pope_random.json, JSON lines {question_id, image, text, label
             yes|no}; `question`/`answer` also accepted) + the COCO images (val2014/) anywhere under --data_dir.
             Asked as a 2-option MCQ (A. yes / B. no); category = the file (coco_random, aokvqa_popular, ...).
  shards     the research tar shards (reference section 6): `user` = question + lettered options, `assistant`
             = "X. ..."; read with data.read_tar, frames decoded by data.ShardDataset.
  shapes     the synthetic held-out MCQs of the embedded default (data.read_mcq; default data/shapes).
A missing or undecodable video/image is counted wrong and listed under "skipped" with its reason, never dropped.
"""
import argparse
import ctypes
import glob
import json
import os
import re
import sys
import time
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data import (IMAGE_EXTS, PAD_ID, VIDEO_EXTS, ShardDataset, SkipSample, encode_answer, encode_prompt, format_mcq,
                  load_image, load_tokenizer, load_video, natural_key, read_mcq, read_tar, uniform_indices)
from model import MODES, DinoConfig, DINOv2, FoveatedVLM, SmolLM2, decode, find_checkpoint, left_pad

LETTERS = "ABCDEFGH"
SHORT = {"coarse_only": "co", "coarse_fine": "cf", "autoregressive": "ar"}
GENERATE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."  # lmms-eval's MCQ post-prompt
SCORES = {"mean": "mean CE of the tokens of 'X. option<|im_end|>'", "sum": "summed CE of 'X. option<|im_end|>'",
          "original": "(CE of 'X. option' + CE of the final newline) / (tokens + 2), the original benchmark's score "
                      "of 'X. option<|im_end|>\\n' with <|im_end|> ignored but counted"}
SCORING = {"likelihood": "likelihood: lowest score of the assistant turn ({score})",
           "generate": "generate: greedy answer, letter extracted lmms-eval style (comparable with SmolVLM2 numbers)"}

# -----------------------------------------------------------------------------
# scoring one question


def option_answers(tok, options, score="mean"):
    """The K assistant turns to score: "X. option text" + <|im_end|> (+ the newline after it for the original
    score), as token ids."""
    newline = tok.encode("\n", add_special_tokens=False).ids if score == "original" else []
    return [encode_answer(tok, f"{LETTERS[i]}. {o}") + newline for i, o in enumerate(options)]


@torch.no_grad()
def score_options(model, kv, frame_mask, prompts, answers, mode, score="mean"):
    """Q questions at once: prompts [Q lists of ids], answers [Q lists of K_q answers (ids)] -> Q score tensors [K_q]
    (lower = more likely). Each prefix [visual tokens][prompt] is computed once; its cache row is repeated K times and
    all Q*K answers, right-padded, run as one batch. Padding after an answer is invisible to it (causal attention)
    and only real answer tokens are scored."""
    device = frame_mask.device
    Q, K = len(prompts), max(len(a) for a in answers)
    A = max(len(x) for a in answers for x in a)
    prompt_ids, prompt_valid = left_pad(prompts, device)
    cache, last, _ = model.prefill(kv, frame_mask, prompt_ids, mode, extra=A, prompt_valid=prompt_valid)
    cache = cache.repeat(K)  # row q*K+k continues question q with answer k
    ids = torch.full((Q * K, A), PAD_ID, dtype=torch.long, device=device)  # [QK,A]
    real = torch.zeros(Q * K, A, dtype=torch.bool, device=device)  # [QK,A]
    for q, options in enumerate(answers):
        for k, a in enumerate(options):
            ids[q * K + k, :len(a)], real[q * K + k, :len(a)] = torch.tensor(a, device=device), True
    logits = model.llm(ids, cache=cache)  # [QK,A,V]; position i predicts answer token i+1
    pred = torch.cat((last.repeat_interleave(K, 0)[:, None], logits[:, :-1]), 1).float()  # the prompt predicts token 0
    # class dim last and contiguous: the transposed layout takes a kernel ~1e-4 less accurate over 49k classes
    ce = F.cross_entropy(pred.flatten(0, 1), ids.flatten(), reduction="none").view(Q * K, A) * real
    if score == "original":  # its CE ignored the pad id, which is <|im_end|>, but its mask still counted it
        ce = ce * (ids != PAD_ID)
    scores = (ce.sum(1) if score == "sum" else ce.sum(1) / real.sum(1).clamp(min=1)).view(Q, K)
    return [scores[q, :len(a)] for q, a in enumerate(answers)]


@torch.no_grad()
def score_options_naive(model, frames, prompt_ids, answers, mode, score="mean"):
    """What the original evaluation did: per option a full forward, re-encoding the video every time.
    Kept as the reference the fast path is tested against, and as the baseline of `--task speed --naive`."""
    out = []
    for a in answers:
        ids = torch.tensor([prompt_ids + a], device=frames.device)
        mask = torch.tensor([[0] * len(prompt_ids) + [1] * len(a)], device=frames.device)
        _, loss = model(frames[None], ids, loss_mask=mask, mode=mode)
        out.append(loss * (1 if score == "mean" else len(a)))
    return torch.stack(out).float()


@torch.no_grad()
def generate_answers(model, tok, kv, frame_mask, prompts, mode, max_new_tokens=16):
    """Greedy answer texts of Q questions after their [visual tokens][prompt], decoded as one batch."""
    prompt_ids, prompt_valid = left_pad(prompts, frame_mask.device)
    cache, last, _ = model.prefill(kv, frame_mask, prompt_ids, mode, extra=max_new_tokens, prompt_valid=prompt_valid)
    steps = list(decode(model.llm, cache, last, max_new_tokens, stop_id=PAD_ID))
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    return [tok.decode(r[:r.index(PAD_ID)] if PAD_ID in r else r, skip_special_tokens=True) for r in rows]


def extract_choice(text, options):
    """Generated text -> option index, or None. lmms-eval takes the first capital A-D after stripping
    'The answer is'-style prefixes; that misreads an article ("A man is ...") as option A and misses an answer
    given as the option's text. Here: an explicit letter first, then option text, then a lone capital letter."""
    letters = LETTERS[:len(options)]
    s = re.sub(r"(?i)^\s*(the )?(best |correct )?(answer|option)( is)?\s*[:\-]?\s*", "", text.strip()).strip()
    m = (re.fullmatch(rf"\(?([{letters}])\)?[.):]?", s) or re.match(rf"\(?([{letters}])[.):]", s)
         or re.match(rf"\(([{letters.lower()}])\)", s))  # "B", "(B)", "B.", "B) cat", "(b)"
    if m:
        return LETTERS.index(m.group(1).upper())
    norm = lambda x: " ".join(re.sub(r"[^\w\s]", " ", x.lower()).split())
    found = [i for i, o in enumerate(options) if norm(o) and re.search(rf"\b{re.escape(norm(o))}\b", norm(s))]
    if found:  # the longest mention wins ("dark red" over "red")
        return max(found, key=lambda i: len(norm(options[i])))
    for m in re.finditer(rf"\b([{letters}])\b", s):
        if not (m.group(1) == "A" and re.match(r"\s+[a-z]", s[m.end():])):  # "A dog ..." is an article
            return LETTERS.index(m.group(1))
    return None

# -----------------------------------------------------------------------------
# loading a question's frames (records: see evaluate_mcq)


def load_frame_dir(path, n, size, start=None, end=None, fps=3):
    """A folder of frame images (MVBench's tvqa frames, 3 fps) -> [n,3,S,S], within [start,end] seconds."""
    files = sorted((f for f in os.listdir(path) if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTS), key=natural_key)
    if not files:
        raise ValueError(f"{path}: frame folder holds no images")
    i0 = min(len(files) - 1, max(0, round(start * fps))) if start is not None else 0
    i1 = max(i0 + 1, min(len(files), round(end * fps))) if end is not None else len(files)
    return torch.cat([load_image(os.path.join(path, files[i0 + i]), size) for i in uniform_indices(i1 - i0, n)])


def load_frames(rec, frames=16, image_size=224, image_frames=8):
    """A record's frames [T,3,S,S]; raises ValueError/OSError with the reason when they cannot be had."""
    if "error" in rec:
        raise ValueError(rec["error"])
    if "frames" in rec:
        return rec["frames"]
    if "load" in rec:
        return rec["load"]()
    path = rec.get("video") or rec.get("image")
    if not os.path.exists(path):
        raise ValueError(f"missing file: {path}")
    if os.path.isdir(path):
        return load_frame_dir(path, frames, image_size, rec.get("start"), rec.get("end"))
    if path.lower().rsplit(".", 1)[-1] in IMAGE_EXTS:  # images: replicated to 8 frames (reference section 4)
        return load_image(path, image_size, replicate=image_frames)
    return load_video(path, frames, image_size, start=rec.get("start"), end=rec.get("end"))


def prefetched(records, load, ahead=2):
    """(record, frames or the exception) in order; the next videos decode in a thread while the model runs."""
    def safe(r):
        try:
            return load(r)
        except (ValueError, OSError, RuntimeError, SkipSample) as e:
            return e
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(safe, r) for r in records[:ahead]]
        for i, r in enumerate(records):
            if i + ahead < len(records):
                futures.append(pool.submit(safe, records[i + ahead]))
            yield r, futures[i].result()
            futures[i] = None  # free the frames

# -----------------------------------------------------------------------------
# evaluation


def evaluate_mcq(model, tok, records, modes=MODES, device="cpu", score="mean", progress=True,
                 scoring="likelihood", frames=16, image_size=224, max_new_tokens=16, batch_size=32):
    """Accuracy per mode and per category of multiple-choice records
    {question, options [str], answer (index), category?, id?} + one of: frames [T,3,S,S] | video (file or frame
    folder, + start/end s) | image | load (callable -> frames) | error (why the media is unavailable).
    batch_size questions share every model call (videos of different lengths are padded and masked).
    A record whose media fails counts as wrong in every mode and is listed in "skipped". Deterministic."""
    was_training = model.training
    model.eval()
    dtype = model.dino.patch_embed.weight.dtype
    items = []
    bar = tqdm(total=len(records), disable=not progress, desc=f"mcq ({scoring})", dynamic_ncols=True)
    loaded = prefetched(records, lambda r: load_frames(r, frames, image_size))
    for start in range(0, len(records), batch_size):
        batch = []  # (record, item, video [T,3,S,S]) of the questions whose media loaded
        for i in range(start, min(start + batch_size, len(records))):
            rec, video = next(loaded)
            item = {"id": rec.get("id", i), "category": rec.get("category", "all"), "answer": rec["answer"], "pred": {}}
            items.append(item)
            if isinstance(video, Exception):  # counted (wrong), never silently out of the denominator
                item["error"] = str(video)
            else:
                batch.append((rec, item, video))
        if batch:
            vids = pad_sequence([v.to(device, dtype) for _, _, v in batch], batch_first=True)  # [Q,T,3,S,S], zero-padded
            lengths = torch.tensor([v.shape[0] for _, _, v in batch], device=device)
            frame_mask = torch.arange(vids.shape[1], device=device) < lengths[:, None]  # [Q,T]
            with torch.no_grad():
                kv = model.encode(vids, frame_mask)  # once per question: every mode and option reuses it
            users = [format_mcq(rec["question"], rec["options"]) for rec, _, _ in batch]
            for mode in modes:
                if scoring == "generate":
                    prompts = [encode_prompt(tok, u + GENERATE_SUFFIX) for u in users]
                    outs = generate_answers(model, tok, kv, frame_mask, prompts, mode, max_new_tokens)  # texts
                    preds = [extract_choice(t, rec["options"]) for t, (rec, _, _) in zip(outs, batch)]
                else:
                    scores = score_options(model, kv, frame_mask, [encode_prompt(tok, u) for u in users],
                                           [option_answers(tok, rec["options"], score) for rec, _, _ in batch],
                                           mode, score)
                    preds = [int(s.argmin()) for s in scores]
                    outs = [[round(float(x), 5) for x in s] for s in scores]
                for pred, out, (rec, item, _) in zip(preds, outs, batch):
                    item.setdefault("text" if scoring == "generate" else "scores", {})[mode] = out
                    item["pred"][mode] = pred
        acc = mcq_results(items, modes, scoring, score)["accuracy"]
        bar.set_postfix({SHORT.get(m, m): f"{100 * a:.1f}" for m, a in acc.items()}, refresh=False)
        bar.update(len(items) - bar.n)
    bar.close()
    model.train(was_training)
    return mcq_results(items, modes, scoring, score)


def mcq_results(items, modes, scoring="likelihood", score="mean"):
    """Accuracy per mode and category of evaluate_mcq's items (also of several ranks' items put together)."""
    total, correct = Counter(i["category"] for i in items), {m: Counter() for m in modes}
    for item in items:
        for m in modes:
            correct[m][item["category"]] += int(item["pred"].get(m, -1) == item["answer"])
    stats = lambda c, t: {"accuracy": c / t if t else 0.0, "correct": c, "total": t}
    per_mode = {m: dict(stats(sum(correct[m].values()), len(items)), per_category={
        k: stats(correct[m][k], t) for k, t in sorted(total.items())}) for m in modes}
    skipped = [{"id": i["id"], "category": i["category"], "reason": i["error"]} for i in items if "error" in i]
    return {"scoring": SCORING[scoring].format(score=SCORES[score]), "score": score, "count": len(items),
            "accuracy": {m: r["accuracy"] for m, r in per_mode.items()}, "modes": per_mode, "skipped": skipped,
            "skipped_count": len(skipped), "items": items}


def format_table(results):
    """Accuracy (%) per category (rows) and mode (columns)."""
    modes = list(results["modes"])
    cats = list(next(iter(results["modes"].values()))["per_category"]) if modes else []
    w = max([len(c) for c in cats] + [8])
    lines = [results["scoring"], f"{'category':<{w}} {'n':>5} " + " ".join(f"{m:>14}" for m in modes)]
    for c in cats:
        row = [results["modes"][m]["per_category"][c] for m in modes]
        lines.append(f"{c:<{w}} {row[0]['total']:>5} " + " ".join(f"{100 * r['accuracy']:>14.1f}" for r in row))
    lines.append(f"{'all':<{w}} {results['count']:>5} " + " ".join(f"{100 * results['modes'][m]['accuracy']:>14.1f}" for m in modes))
    if results["skipped_count"]:
        lines.append(f"{results['skipped_count']} questions had no usable media (counted wrong; see 'skipped' in --out)")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# task readers: each returns MCQ records (see evaluate_mcq)

MVBENCH_VIDEO = {  # task json -> folder under video/, as in the official MVBench evaluation (Ask-Anything)
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd", "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa", "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}
MVBENCH_BOUNDED = {"action_sequence", "action_prediction", "object_interaction", "action_localization",
                   "episodic_reasoning"}  # the tasks whose start/end the official evaluation applies


def media_finder(root):
    """locate(rec, key, path, rel, exts) sets rec[key] = path if it exists, else a file named like `rel` (a name, or a
    relative path matched by its ending; exts: other extensions accepted) found anywhere under root -- datasets get
    unpacked in many ways; one os.walk, on first need -- else sets rec['error']. Returns rec."""
    by_name = {}

    def locate(rec, key, path, rel, exts):
        if not os.path.exists(path):
            if not by_name:
                for d, dirs, files in os.walk(root):
                    for name in files + dirs:
                        for k in (name, os.path.splitext(name)[0] + ".*"):
                            by_name.setdefault(k, []).append(os.path.join(d, name))
            rel = rel.replace("\\", "/")
            base = os.path.basename(rel.rstrip("/"))
            hits = by_name.get(base, []) + [p for p in by_name.get(os.path.splitext(base)[0] + ".*", [])
                                            if p.lower().rsplit(".", 1)[-1] in exts]
            hits.sort(key=lambda p: (not p.replace("\\", "/").endswith(rel), p))  # whole `rel` matched first
            if not hits:
                rec["error"] = f"missing file: {rel} (not at {path}, nor anywhere under {root})"
            path = hits[0] if hits else path
        rec[key] = path
        return rec
    return locate


def read_rows(path):
    """Rows of a .json (list, or dict of rows), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: only asked for when a parquet file is the input
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        try:
            rows = json.load(f)
        except json.JSONDecodeError:  # POPE's .json files are JSON lines
            f.seek(0)
            return [json.loads(line) for line in f if line.strip()]
    if isinstance(rows, dict):  # {id: row} as ScienceQA's problems.json, or one row (JSON lines of one line)
        nested = rows and all(isinstance(v, dict) for v in rows.values())
        rows = [dict(v, _key=k) for k, v in rows.items()] if nested else [rows]
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def table_files(data_dir, need):
    """(path, rows) of every json/jsonl/parquet under data_dir whose rows have the fields `need` ("a|b": either)."""
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "**", "*"), recursive=True)
                   if p.endswith((".json", ".jsonl", ".parquet")))
    out = []
    for path in paths:
        try:
            rows = read_rows(path)
        except (ValueError, OSError, ImportError):  # ImportError: parquet without pyarrow
            continue
        if rows and isinstance(rows[0], dict) and all(any(k in rows[0] for k in alt.split("|")) for alt in need):
            out.append((path, rows))
    if not out:
        hint = " (parquet needs pyarrow: pip install pyarrow, or convert it to json)" if any(
            p.endswith(".parquet") for p in paths) else ""
        raise FileNotFoundError(f"bench.py: no json/jsonl under {data_dir} with fields {need}{hint}; check --data_dir")
    return out


def _answer_index(ans, opts):
    if isinstance(ans, int):
        return ans
    ans = str(ans).strip()
    if len(ans) == 1 and ans.upper() in LETTERS[:len(opts)]:
        return LETTERS.index(ans.upper())
    return opts.index(re.sub(r"^[A-H]\.\s*", "", ans))


def read_mvbench(data_dir):
    json_dir = os.path.join(data_dir, "json") if os.path.isdir(os.path.join(data_dir, "json")) else data_dir
    files = sorted(glob.glob(os.path.join(json_dir, "*.json")))
    if not files:
        raise FileNotFoundError(f"bench.py: no MVBench json/*.json under {data_dir}; point --data_dir at the MVBench download")
    locate, recs = media_finder(data_dir), []
    for path in files:
        task = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(data_dir, "video", MVBENCH_VIDEO.get(task, ""))
        for j, r in enumerate(read_rows(path)):
            rec = {"id": f"{task}/{j}", "question": r["question"], "options": list(r["candidates"]), "category": task}
            if task in MVBENCH_BOUNDED or task not in MVBENCH_VIDEO:
                rec.update({k: float(r[k]) for k in ("start", "end") if r.get(k) is not None})
            locate(rec, "video", os.path.join(folder, r["video"]), r["video"], VIDEO_EXTS + ("webm", "avi"))
            if r["answer"] not in rec["options"]:
                rec["error"], rec["answer"] = f"{path}[{j}]: answer {r['answer']!r} is not among the candidates", -1
            else:
                rec["answer"] = rec["options"].index(r["answer"])
            recs.append(rec)
    return recs


def read_videomme(data_dir):
    locate, recs = media_finder(data_dir), []
    for path, rows in table_files(data_dir, ["videoID|videoid|video_id", "question", "options", "answer"]):
        for j, r in enumerate(rows):
            vid = str(r.get("videoID") or r.get("videoid") or r.get("video_id"))
            opts = [re.sub(r"^[A-H]\.\s*", "", o) for o in r["options"]]
            rec = {"id": r.get("question_id", f"{vid}/{j}"), "question": r["question"], "options": opts,
                   "answer": _answer_index(r["answer"], opts), "category": r.get("duration", "all"),
                   "domain": r.get("domain"), "task_type": r.get("task_type")}
            recs.append(locate(rec, "video", os.path.join(data_dir, "data", vid + ".mp4"), vid + ".mp4", VIDEO_EXTS))
    return recs


def read_scienceqa(data_dir, split="test"):
    locate, recs = media_finder(data_dir), []
    official = glob.glob(os.path.join(data_dir, "**", "problems.json"), recursive=True)
    sources = [(p, read_rows(p)) for p in official] or table_files(data_dir, ["question", "choices", "answer"])
    for path, rows in sources:
        root = os.path.dirname(path)
        for j, r in enumerate(rows):
            if not r.get("image") or (official and r.get("split", split) != split):
                continue  # image questions of the split only (the usual ScienceQA-IMG protocol)
            # problems.json: images/<split>/<pid>/image.png; a plain list: relative to its file
            rel = f"{split}/{r['_key']}/{r['image']}" if official else r["image"]
            hint = (r.get("hint") or "").strip()
            rec = {"id": r.get("_key", r.get("id", j)), "question": (f"Context: {hint}\n" if hint else "") + r["question"],
                   "options": list(r["choices"]), "answer": _answer_index(r["answer"], r["choices"]),
                   "category": r.get("subject", "all")}
            recs.append(locate(rec, "image", os.path.join(root, "images" if official else "", rel), rel, IMAGE_EXTS))
    return recs


def read_pope(data_dir):
    locate, recs = media_finder(data_dir), []
    for path, rows in table_files(data_dir, ["text|question", "label|answer", "image"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        for j, r in enumerate(rows):
            label = str(r.get("label", r.get("answer"))).strip().lower()
            rec = {"id": f"{stem}/{r.get('question_id', j)}", "question": r.get("text") or r["question"],
                   "options": ["yes", "no"], "answer": 0 if label == "yes" else 1,
                   "category": r.get("category") or stem.replace("_pope", "")}  # e.g. coco_random, gqa_popular
            recs.append(locate(rec, "image", os.path.join(os.path.dirname(path), r["image"]), r["image"], IMAGE_EXTS))
    return recs


def read_shards(data_dir, tok, frames=16, image_size=224):
    """MCQs from research tar shards: `user` ends with lettered option lines, `assistant` starts with the letter."""
    shards = sorted(glob.glob(os.path.join(data_dir, "*.tar*"))) if os.path.isdir(data_dir) else glob.glob(data_dir)
    if not shards:
        raise FileNotFoundError(f"bench.py: no *.tar shards in {data_dir}")
    ds = ShardDataset(shards, tok, 2, image_size=image_size, max_frames=frames, replicate_image_frames=8, loop=False)
    recs = []
    for shard in shards:
        for rec in read_tar(shard):
            try:
                meta = json.loads(rec["files"].get("json", b"{}"))
            except ValueError:
                continue
            lines = (meta.get("user") or "").split("\n")
            k = len(lines)
            while k > 0 and re.match(r"^[A-H]\. ", lines[k - 1]):
                k -= 1
            opts = [line[3:] for line in lines[k:]]
            m = re.match(r"^\(?([A-H])[.):]", (meta.get("assistant") or "").strip())
            if len(opts) < 2 or not m or LETTERS.index(m.group(1)) >= len(opts):
                continue  # not a lettered MCQ
            files, where = rec["files"], f"{shard}:{rec['key']}"
            recs.append({"id": where, "question": "\n".join(lines[:k]), "options": opts,
                         "answer": LETTERS.index(m.group(1)), "category": meta.get("category", meta.get("source", "all")),
                         "load": lambda files=files, meta=meta, where=where: ds.frames(files, meta, where)})
    return recs


def read_task(task, data_dir, tok, frames, image_size, split="test"):
    if task == "shapes":  # at the size the task was generated with, as train.py's eval reads it
        return [dict(r, id=i) for i, r in enumerate(read_mcq(data_dir, image_size=image_size))]
    if task == "shards":
        return read_shards(data_dir, tok, frames, image_size)
    if task == "scienceqa":
        return read_scienceqa(data_dir, split)
    return {"mvbench": read_mvbench, "videomme": read_videomme, "pope": read_pope}[task](data_dir)

# -----------------------------------------------------------------------------
# speed: what nanoGPT's bench.py is for. FLOPs, peak FLOPs, step throughput, decode, MCQ, memory.

GPU_PEAK = {  # dense TFLOPS: (bf16/fp16 tensor core, fp32 without TF32), matched by substring of the device name
    "H100": (989, 67), "A100": (312, 19.5), "A10G": (70, 31.2), "A10": (125, 31.2), "L40S": (362, 91.6),
    "L4": (121, 30.3), "RTX 5090": (209.5, 104.8), "RTX 4090": (165.2, 82.6), "RTX 3090": (71, 35.6),
    "V100": (125, 15.7), "T4": (65, 8.1)}
_cpu_peak = {}


def peak_flops(device="cpu", dtype=torch.float32):
    """Peak FLOP/s for MFU: a table for known GPUs; on CPU a measured matmul peak (cached per process)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, full) in GPU_PEAK.items():
            if key in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else full) * 1e12
        print(f"bench.py: unknown GPU {name!r}, MFU against 312 TFLOPS (A100 bf16)", file=sys.stderr)
        return 312e12
    if dtype not in _cpu_peak:
        a = torch.randn(1024, 1024, dtype=dtype)
        best = min(timed(lambda: a @ a, 0, 1, "cpu") for _ in range(10))  # best of 10: the machine may be shared
        _cpu_peak[dtype] = 2 * 1024 ** 3 / best
    return _cpu_peak[dtype]


def keep_freed_memory():
    """CPU training: glibc returns freed blocks to the OS (mmap'd blocks over a few MB, the heap's top) and then
    page-faults them back in on the next step, which made the 135M train step ~1.25x slower on CPU. Keep them: blocks up
    to 32 MB (glibc's maximum) come from the heap, and the heap is never trimmed. No effect off Linux/glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD


def train_flops(model, B, T, S, image_size):
    """Analytic FLOPs of one coarse_fine training step (forward + backward = 3x forward): DINOv2 encode of B*T
    frames, 2 glimpse passes (coarse, fine), 2 LLM passes (T visual tokens; T+S), lm_head over the S text tokens."""
    d, lc = model.dino.cfg, model.llm.cfg
    D, Hd, P = d.dim, int(d.dim * d.mlp_ratio), (image_size // d.patch_size) ** 2
    N = P + 1
    per_token_mlp = 2 * 2 * D * Hd
    dino = P * 2 * 3 * d.patch_size ** 2 * D + d.n_layers * N * (2 * 4 * D * D + per_token_mlp + 2 * 2 * N * D)
    glimpse = 2 * D * D * 2 + d.n_layers * (2 * 2 * D * D + 2 * 2 * N * D + per_token_mlp)  # in/out proj + walk
    connect = 2 * D * lc.dim  # dino_to_llm
    L, q, kvd = lc.dim, lc.n_heads * lc.head_dim, lc.n_kv_heads * lc.head_dim

    def llm(n):  # n tokens, causal attention (every token sees ~n/2 keys on average)
        return lc.n_layers * n * (2 * L * (2 * q + 2 * kvd) + 2 * 3 * L * lc.hidden_dim + 2 * 2 * q * (n + 1) / 2)
    fwd = (B * T * (dino + 2 * (glimpse + connect) + 2 * L * D)  # + llm_to_query
           + B * (llm(T) + llm(T + S)) + B * S * 2 * L * lc.vocab_size)
    return 3 * fwd


def _peak_rss():
    """The process's peak RSS in bytes (VmHWM), 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


@contextmanager
def peak_memory(device):
    """Yields a dict that gets the block's peak memory in MB ("peak_mem_mb", "mem_growth_mb"): on GPU from
    torch.cuda.max_memory_allocated; on CPU the process's peak RSS, reset through /proc/self/clear_refs (if that is
    not allowed, only the growth is the block's own)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
    mem, base = {}, torch.cuda.memory_allocated() if cuda else _peak_rss()
    yield mem
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    mem.update(peak_mem_mb=peak / 2 ** 20, mem_growth_mb=(peak - base) / 2 ** 20)


def timed(fn, warmup, iters, device):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def mcq_speed(model, tok_len, T, image_size, device, naive=False, batch=4, K=4, modes=MODES, rounds=3):
    """Questions/s of K options x modes on random frames: the fast path scores `batch` questions per call, as
    evaluate_mcq does; the naive one (naive=True) re-encodes per option and mode, one question at a time.
    With naive, the two alternate for `rounds` rounds and each reports its median."""
    g = torch.Generator().manual_seed(0)
    vids = torch.randn(batch, T, 3, image_size, image_size, generator=g).to(device)
    prompt = torch.randint(3, tok_len, (48,), generator=g).tolist()
    answers = [torch.randint(3, tok_len, (4 + i,), generator=g).tolist() + [PAD_ID] for i in range(K)]
    fm = torch.ones(batch, T, dtype=torch.bool, device=device)

    def fast():
        with torch.no_grad():
            kv = model.encode(vids, fm)
            for m in modes:
                score_options(model, kv, fm, [prompt] * batch, [answers] * batch, m)

    slow = lambda: [score_options_naive(model, vids[0], prompt, answers, m) for m in modes]
    fast()  # warm-up
    times = {"fast": [], "slow": []}
    for _ in range(rounds if naive else 1):  # interleaved, so that load from other jobs hits both alike
        times["fast"].append(timed(fast, 0, 1, device))
        if naive:
            times["slow"].append(timed(slow, 0, 1, device))
    median = lambda t: sorted(t)[len(t) // 2]
    out = {"mcq_questions_per_s": batch / median(times["fast"]), "mcq_batch": batch}
    if naive:
        out["mcq_naive_questions_per_s"] = 1 / median(times["slow"])
        out["mcq_speedup"] = out["mcq_questions_per_s"] / out["mcq_naive_questions_per_s"]
    return out


def speed(llm_dir=None, ckpt=None, device="cpu", dtypes=("float32", "bfloat16"), B=2, T=8, S=64, steps=3,
          decode_tokens=32, naive=False, mcq_frames=16):
    """Training step throughput (samples/s, tokens/s, MFU), decode tokens/s, MCQ questions/s, peak memory."""
    torch.manual_seed(0)
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # as train.py does
    if llm_dir:  # the 135M shape: real SmolLM2, random DINOv2-small
        model = FoveatedVLM(SmolLM2.from_pretrained(llm_dir), DINOv2(DinoConfig()))
    else:  # the embedded default's checkpoint (a run dir or a dir of step-* works too)
        try:
            model = FoveatedVLM.from_checkpoint(ckpt)
        except FileNotFoundError as e:
            sys.exit(f"bench.py: {e}, or pass --llm_dir for the 135M shape")
    size = 224 if llm_dir else model.dino.cfg.image_size
    model.to(device)
    V = model.llm.cfg.vocab_size
    frames = torch.randn(B, T, 3, size, size, device=device)
    ids = torch.randint(3, V, (B, S), device=device)
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    flops = train_flops(model, B, T, S, size)
    opt = model.configure_optimizers(0.01, dict.fromkeys(("connector", "dino", "dino_qk", "llm"), 1e-5))
    report = {"device": str(device), "shape": "135M" if llm_dir else "tiny", "B": B, "T": T, "S": S,
              "image_size": size, "params": sum(p.numel() for p in model.parameters()), "train_flops_per_step": flops}
    model.train()
    with torch.no_grad():  # the same loss in every dtype, before any update: bf16 must be within its rounding noise
        for name in dtypes:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=name == "bfloat16"):
                report[name] = {"loss": model(frames, ids, loss_mask=mask, mode="coarse_fine")[1].item()}

    def step(dtype):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(frames, ids, loss_mask=mask, mode="coarse_fine")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = {}
    for name in dtypes:  # warm-up (the optimizer state and the allocator's pools are built in the first two steps)
        with peak_memory(device) as mem:
            step(getattr(torch, name)), step(getattr(torch, name))
        report[name].update(mem)
    for _ in range(steps):  # dtypes interleaved, medians: load from other jobs on a shared VM hits both alike
        for name in dtypes:
            times.setdefault(name, []).append(timed(lambda: step(getattr(torch, name)), 0, 1, device))
    for name in dtypes:
        dt, peak = sorted(times[name])[steps // 2], peak_flops(device, getattr(torch, name))
        report[name].update(step_s=dt, samples_per_s=B / dt, tokens_per_s=B * (T + S) / dt, mfu=flops / dt / peak,
                            peak_flops=peak)
    model.eval()
    fm = torch.ones(1, T, dtype=torch.bool, device=device)
    kv = model.encode(frames[:1], fm)

    def gen():
        cache, last, _ = model.prefill(kv, fm, ids[:1, :16], "autoregressive", extra=decode_tokens)
        for _ in decode(model.llm, cache, last, decode_tokens, stop_id=-1):  # never stops: a fixed length
            pass
    report["decode_tokens_per_s"] = decode_tokens / timed(gen, 1, 2, device)
    with peak_memory(device) as mem:
        report.update(mcq_speed(model, V, mcq_frames, size, device, naive))
    report.update(mcq_peak_mem_mb=mem["peak_mem_mb"], mcq_frames=mcq_frames)
    return report

# -----------------------------------------------------------------------------
# CLI


def load_model(args):
    """(model, tokenizer) from --ckpt (our format), or --llm_dir/--dino_dir/--init_from (released weights)."""
    if args.llm_dir:
        dino = DINOv2.from_pretrained(args.dino_dir) if args.dino_dir else DINOv2(DinoConfig())
        model = FoveatedVLM(SmolLM2.from_pretrained(args.llm_dir), dino)
        if args.init_from:
            model.load_weights(args.init_from)
        elif not args.dino_dir:
            sys.exit("bench.py: --llm_dir needs --dino_dir or --init_from (the DINOv2 weights)")
        return model, load_tokenizer(args.llm_dir)
    try:
        ckpt = find_checkpoint(args.ckpt)
    except FileNotFoundError as e:
        sys.exit(f"bench.py: {e}, or pass --ckpt / --llm_dir")
    return FoveatedVLM.from_checkpoint(ckpt), load_tokenizer(ckpt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="shapes", choices=["mvbench", "videomme", "scienceqa", "pope", "shards", "shapes", "speed"])
    p.add_argument("--data_dir", default=None, help="the benchmark as downloaded (shapes: data/shapes)")
    p.add_argument("--ckpt", default="out/shapes/ckpt", help="our checkpoint dir")
    p.add_argument("--llm_dir", default=None, help="SmolLM2 HF dir (released weights)")
    p.add_argument("--dino_dir", default=None, help="DINOv2 HF dir")
    p.add_argument("--init_from", default=None, help="fVLM checkpoint (released safetensors or our dir) over the backbones")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=None, help="frames sampled per video (shards: up to 64, "
                   "every frame as in the original; others 16)")
    p.add_argument("--image_size", type=int, default=None, help="default 224 (shapes: as generated, 64)")
    p.add_argument("--score", default="mean", choices=list(SCORES))
    p.add_argument("--scoring", default="likelihood", choices=["likelihood", "generate"])
    p.add_argument("--split", default="test", help="scienceqa split")
    p.add_argument("--out", default=None, help="write everything to this json")
    p.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"], help="speed: training dtype")
    p.add_argument("--batch_size", type=int, default=2, help="speed")
    p.add_argument("--num_frames", type=int, default=8, help="speed: frames per training sample")
    p.add_argument("--seq_len", type=int, default=64, help="speed: text tokens per training sample")
    p.add_argument("--steps", type=int, default=3, help="speed: timed training steps")
    p.add_argument("--naive", action="store_true", help="speed: also time the naive MCQ evaluation (slow)")
    args = p.parse_args(argv)
    args.frames = args.frames or (64 if args.task == "shards" else 16)
    if args.task == "speed":
        dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
        out = speed(args.llm_dir, args.ckpt, args.device, dtypes, args.batch_size, args.num_frames, args.seq_len,
                    args.steps, naive=args.naive, mcq_frames=args.frames)
        print(json.dumps(out, indent=2))
    else:
        model, tok = load_model(args)
        model.to(args.device)
        data_dir = args.data_dir or ("data/shapes" if args.task == "shapes" else None)
        if data_dir is None:
            sys.exit(f"bench.py: --task {args.task} needs --data_dir (the benchmark folder as downloaded)")
        if args.image_size is None:  # shapes: the size its frames were drawn at (data/shapes/shapes.json)
            marker = os.path.join(data_dir, "shapes.json")
            args.image_size = 224 if args.task != "shapes" else \
                json.load(open(marker))["image_size"] if os.path.isfile(marker) else 64
        records = read_task(args.task, data_dir, tok, args.frames, args.image_size, args.split)[:args.limit]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if set(modes) - set(MODES):
            sys.exit(f"bench.py: unknown --modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
        out = evaluate_mcq(model, tok, records, modes, args.device, args.score, scoring=args.scoring,
                           frames=args.frames, image_size=args.image_size)
        out.update(task=args.task, data_dir=data_dir, frames=args.frames, image_size=args.image_size,
                   weights=args.init_from or args.llm_dir or args.ckpt)
        print(format_table(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
