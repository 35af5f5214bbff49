"""
Benchmarks for nanofVLM: multiple-choice accuracy on video/image benchmarks, and training and
inference speed.

    python bench.py --task=shapes  # after `python train.py`: the held-out shapes MCQs
    python bench.py --task=mvbench --data_dir=MVBench --init_from=out/my_run --out=results.json
    python bench.py --task=videomme --data_dir=Video-MME --llm_dir=SmolLM2-135M-Instruct \\
        --dino_dir=dinov2-small --init_from=fVLM-135M/model.safetensors --limit=200
    python bench.py --task=speed --llm_dir=SmolLM2-135M-Instruct  # train step, decode, MCQ, DPO
    python bench.py --task=longvideo --minutes=60 --fps=1  # an hour at 1 fps: wall, glimpses/s, RSS

`python bench.py --help` lists every config key. Scoring: score_options; each benchmark's layout:
its read_* function (read_task).
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, namedtuple
from contextlib import contextmanager
from functools import partial

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data import (DEFAULT_USER, IMAGE_EXTS, IMAGE_FRAMES, PAD_ID, VIDEO_EXTS, ShardDataset,
                  SkipSample, _jpg, context_error, encode_answer, format_mcq, frame_files,
                  image_files, load_image, load_tokenizer, load_video, make_loader, prompt_parts,
                  read_ahead, read_tar, record_frames, record_text, shapes_clip, uniform_indices,
                  video_chunks, video_frames, video_length, write_tar)
from model import (MODES, DinoConfig, DINOv2, FoveatedVLM, LLMConfig, SmolLM2, compile_counts,
                   compile_model, decode, keep_freed_memory, left_pad, load_model, mfu, native_bf16,
                   peak_flops, train_flops, use_tf32, warn_slow_bf16)

# -----------------------------------------------------------------------------
# config: every global below is a config key (configurator.py). The model comes from init_from /
# llm_dir / dino_dir as in train.py (model.load_model). "original": the original fVLM benchmark.
task = 'shapes'  # mvbench | videomme | scienceqa | pope | shards | shapes | speed | longvideo
data_dir = ''  # the benchmark as downloaded ('' for shapes: data/shapes)
# our checkpoint (dir, run dir) | a .safetensors file over llm_dir + dino_dir
init_from = 'out/shapes'
llm_dir = ''  # a Hugging Face SmolLM2 dir
dino_dir = ''  # a Hugging Face DINOv2 dir
modes = 'coarse_only,coarse_fine,autoregressive'
limit = 0  # the first N questions only; 0 = all
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'float32'  # float32 | bfloat16 (autocast)
# frames per video, spread over it; with fps > 0 or --stream, the cap. 0 = the task's own: 16
# (shards: up to 64, as the original), or streamed, every frame at fps
max_frames = 0
fps = 0.0  # > 0: videos at this many frames per second, up to max_frames
image_size = 0  # 0 = 224 (shapes: the size it was generated at)
score = 'mean'  # with likelihood scoring, an option's score: mean | sum | original (SCORES)
scoring = 'likelihood'  # how the answer is picked: likelihood | generate (SCORING)
split = 'test'  # scienceqa split
videomme_duration = ''  # Video-MME: short | medium | long; '' = all
batch_size = 32  # questions per model call
# videos streamed, autoregressive only (long videos: --fps=1 --max_frames=0 holds no frame's K/V)
stream = False
out = ''  # write every result (and each question's scores) to this json
# --task=speed: the stage-2 train step of the 135M shape with llm_dir, else of init_from
speed_dtypes = ''  # '' = float32,bfloat16 on CPU (float32 without native bf16); bfloat16 on CUDA
speed_batch = 0  # 0 = 2 on CPU; on CUDA the per-GPU batch_size of speed_recipe
speed_recipe = 'config/stage2_135m.py'
speed_frames = '8'  # frame counts to time the step at, comma-separated
speed_text = 64  # text tokens per sample
speed_steps = 3  # timed steps per dtype, after 2 warm-up steps
speed_loader = True  # also time data.py's loader on synthetic shards at the step's shape
compile = False  # the step through model.compile_model, as train.py --compile=True
compile_dynamic = True
compile_backend = 'inductor'
compare_with = ''  # a command that times another implementation's step (compare())
minutes = 10  # longvideo: the synthetic video's length
longvideo_dtypes = ''  # '' = bfloat16,float32 (float32 alone on a CPU without native bf16)
# as a script: a config file and --key=value overrides; as an import, these defaults
if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

LETTERS = "ABCDEFGH"
SHORT = {"coarse_only": "co", "coarse_fine": "cf", "autoregressive": "ar"}  # progress bar labels
# lmms-eval's MCQ post-prompt
GENERATE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
# --score: how a question's K answers are ranked (lowest wins)
SCORES = {
    "mean": "mean CE of the tokens of 'X. option<|im_end|>'",
    "sum": "summed CE of 'X. option<|im_end|>'",
    "original": "(CE of 'X. option' + CE of the final newline) / (tokens + 2), the original "
                "benchmark's score of 'X. option<|im_end|>\\n' with <|im_end|> ignored but counted",
}
SCORING = {
    "likelihood": "likelihood: lowest score of the assistant turn ({score})",
    "generate": "generate: greedy answer, letter extracted lmms-eval style "
                "(comparable with SmolVLM2 numbers)",
}

# -----------------------------------------------------------------------------
# scoring a batch of questions: one DINOv2 encode per question, one LLM prefill per mode


def option_answers(tok, options, score="mean"):
    """The ids of the K answers to score: "X. option" + <|im_end|> (+ "\\n" for score=original)."""
    newline = tok.encode("\n", add_special_tokens=False).ids if score == "original" else []
    return [encode_answer(tok, f"{LETTERS[i]}. {o}") + newline for i, o in enumerate(options)]


def longest_answer(answers):  # over Q lists of answers
    return max(len(x) for a in answers for x in a)


def prompt_batch(tok, users, layout, device):
    """Q user turns -> left-padded (question, prompt_ids, prompt_valid); question: (ids, valid) of
    the turn that comes before the frames, or None (frames first)."""
    parts = [prompt_parts(tok, u, layout) for u in users]
    question_first = bool(parts[0][0])
    question = left_pad([q for q, _ in parts], device) if question_first else None
    prompt_ids, prompt_valid = left_pad([p for _, p in parts], device)
    return question, prompt_ids, prompt_valid


def prefill_users(model, tok, kv, frame_mask, users, mode, extra):
    """Q user turns' prefixes in one cache with room for `extra` tokens -> (cache, last logits
    [Q,V], attention)."""
    question, prompt_ids, prompt_valid = prompt_batch(tok, users, model.layout, frame_mask.device)
    return model.prefill(kv, frame_mask, prompt_ids, mode, extra, prompt_valid, question)


@torch.no_grad()
def score_options(model, tok, kv, frame_mask, users, answers, mode, score="mean"):
    """users [Q user turns], answers [Q lists of K_q answers (ids)] -> Q score tensors [K_q] (lower
    = more likely). Each prefix is computed once, its cache row repeated for its answers, which are
    right-padded (invisible to them: causal attention)."""
    extra = longest_answer(answers)
    cache, last, _ = prefill_users(model, tok, kv, frame_mask, users, mode, extra)
    return score_cached(model, cache, last, answers, score)


def score_cached(model, cache, last, answers, score="mean"):
    """score_options from a filled cache of Q rows and their last logits [Q,V]."""
    device = last.device
    Q, K, A = len(answers), max(len(a) for a in answers), longest_answer(answers)
    # row q*K+k: question q, answer k
    cache = cache.rows(torch.arange(Q, device=device).repeat_interleave(K))
    ids = torch.full((Q * K, A), PAD_ID, dtype=torch.long, device=device)  # [QK,A]
    real = torch.zeros(Q * K, A, dtype=torch.bool, device=device)  # [QK,A]
    for q, options in enumerate(answers):
        for k, a in enumerate(options):
            ids[q * K + k, :len(a)] = torch.tensor(a, device=device)
            real[q * K + k, :len(a)] = True
    logits = model.llm(ids, cache=cache)  # [QK,A,V]; position i predicts answer token i+1
    # the prompt's last logits predict token 0
    pred = torch.cat((last.repeat_interleave(K, 0)[:, None], logits[:, :-1]), 1).float()
    # class dim last and contiguous: the transposed layout takes a less accurate kernel
    ce = F.cross_entropy(pred.flatten(0, 1), ids.flatten(), reduction="none").view(Q * K, A) * real
    # the original fVLM benchmark's CE ignored the pad id (<|im_end|>), but its mask counted it
    if score == "original":
        ce = ce * (ids != PAD_ID)
    if score == "sum":
        scores = ce.sum(1).view(Q, K)
    else:
        scores = (ce.sum(1) / real.sum(1).clamp(min=1)).view(Q, K)
    return [scores[q, :len(a)] for q, a in enumerate(answers)]


@torch.no_grad()
def generate_answers(model, tok, kv, frame_mask, users, mode, max_new_tokens=16):
    """Greedy answer texts of Q user turns, decoded as one batch."""
    cache, last, _ = prefill_users(model, tok, kv, frame_mask, users, mode, extra=max_new_tokens)
    steps = list(decode(model.llm, cache, last, max_new_tokens, stop_id=PAD_ID))
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in users]
    rows = [r[:r.index(PAD_ID)] if PAD_ID in r else r for r in rows]  # up to <|im_end|>
    return [tok.decode(r, skip_special_tokens=True) for r in rows]


def extract_choice(text, options):
    """Generated text -> option index, or None: an explicit letter, then option text, then a lone
    capital letter (lmms-eval's first capital misreads "A man is ..." as option A)."""
    letters = LETTERS[:len(options)]
    prefix = r"(?i)^\s*(the )?(best |correct )?(answer|option)( is)?\s*[:\-]?\s*"
    s = re.sub(prefix, "", text.strip()).strip()
    # "B", "(B)", "B.", "B) cat", "(b)"
    m = (re.fullmatch(rf"\(?([{letters}])\)?[.):]?", s)
         or re.match(rf"\(?([{letters}])[.):]", s)
         or re.match(rf"\(([{letters.lower()}])\)", s))
    if m:
        return LETTERS.index(m.group(1).upper())

    def norm(x):  # lower case, punctuation and repeated spaces out
        return " ".join(re.sub(r"[^\w\s]", " ", x.lower()).split())
    found = [i for i, o in enumerate(options)
             if norm(o) and re.search(rf"\b{re.escape(norm(o))}\b", norm(s))]
    if found:  # the longest mention wins ("dark red" over "red")
        return max(found, key=lambda i: len(norm(options[i])))
    for m in re.finditer(rf"\b([{letters}])\b", s):
        is_article = m.group(1) == "A" and re.match(r"\s+[a-z]", s[m.end():])  # "A dog ..."
        if not is_article:
            return LETTERS.index(m.group(1))
    return None


# -----------------------------------------------------------------------------
# a question's frames


def load_frame_dir(path, size, n, start=None, end=None, folder_fps=3):
    """A folder of frame images at folder_fps (MVBench's tvqa) -> [n,3,S,S] within [start,end] s."""
    files = image_files(path)
    if not files:
        raise ValueError(f"{path}: frame folder holds no images")
    i0 = min(len(files) - 1, max(0, round(start * folder_fps))) if start is not None else 0
    i1 = max(i0 + 1, min(len(files), round(end * folder_fps))) if end is not None else len(files)
    picked = [files[i0 + i] for i in uniform_indices(i1 - i0, n)]
    return torch.cat([load_image(os.path.join(path, f), size) for f in picked])


def load_frames(rec, max_frames=16, image_size=224, fps=None):
    """A record's frames [T,3,S,S], or ValueError/OSError with the reason."""
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
        return load_frame_dir(path, image_size, max_frames, rec.get("start"), rec.get("end"))
    if path.lower().rsplit(".", 1)[-1] in IMAGE_EXTS:
        return load_image(path, image_size, replicate=IMAGE_FRAMES)
    return load_video(path, image_size, max_frames, fps, start=rec.get("start"), end=rec.get("end"))


# -----------------------------------------------------------------------------
# evaluation

LoadedQuestion = namedtuple("LoadedQuestion", "record item video")


def new_item(rec, i):
    """The i-th record's result, its pred (and scores or text) per mode or "error" to come."""
    return {"id": rec.get("id", i), "category": rec.get("category", "all"),
            "answer": rec["answer"], "pred": {}}


def evaluate_mcq(model, tok, records, modes=MODES, device="cpu", score="mean", progress=True,
                 scoring="likelihood", max_frames=16, image_size=224, max_new_tokens=16,
                 batch_size=32, fps=None):
    """Accuracy per mode and category of multiple-choice records {question, options [str], answer
    (index), category?, id?} + one of: frames [T,3,S,S] | video (file or frame folder, + start/end
    s) | image | load (callable -> frames) | error (why the media is unavailable). A record whose
    media fails counts as wrong in every mode and is listed in "skipped". Deterministic."""
    was_training = model.training
    model.eval()
    items = []
    bar = tqdm(total=len(records), disable=not progress, desc=f"mcq ({scoring})",
               dynamic_ncols=True)

    def load(rec):
        try:
            return load_frames(rec, max_frames, image_size, fps)
        except (ValueError, OSError, RuntimeError, SkipSample) as e:
            return e
    # ahead=1: one video waits and the next decodes in a thread while the model runs
    loaded = read_ahead(((rec, load(rec)) for rec in records), ahead=1)
    for start in range(0, len(records), batch_size):
        batch = []
        for i in range(start, min(start + batch_size, len(records))):
            rec, video = next(loaded)
            item = new_item(rec, i)
            items.append(item)
            if isinstance(video, Exception):
                item["error"] = str(video)
            else:
                batch.append(LoadedQuestion(rec, item, video))
        if batch:
            score_batch(model, tok, batch, modes, device, score, scoring, max_new_tokens)
        acc = mcq_results(items, modes, scoring, score)["accuracy"]
        bar.set_postfix({SHORT.get(m, m): f"{100 * a:.1f}" for m, a in acc.items()},
                        refresh=False)
        bar.update(len(items) - bar.n)
    bar.close()
    model.train(was_training)
    return mcq_results(items, modes, scoring, score)


@torch.no_grad()
def score_batch(model, tok, batch, modes, device, score, scoring, max_new_tokens):
    """Fills the items' pred (and scores or text) per mode for a batch of LoadedQuestions."""
    videos = [q.video.to(device, model.dino.patch_embed.weight.dtype) for q in batch]
    videos = pad_sequence(videos, batch_first=True)  # [Q,T,3,S,S]
    lengths = torch.tensor([q.video.shape[0] for q in batch], device=device)
    frame_mask = torch.arange(videos.shape[1], device=device) < lengths[:, None]  # [Q,T]
    kv = model.encode(videos, frame_mask)  # once per question: every mode and option reuses it
    users = [format_mcq(q.record["question"], q.record["options"]) for q in batch]
    for mode in modes:
        if scoring == "generate":
            users_asked = [u + GENERATE_SUFFIX for u in users]
            texts = generate_answers(model, tok, kv, frame_mask, users_asked, mode, max_new_tokens)
            for text, q in zip(texts, batch):
                q.item.setdefault("text", {})[mode] = text
                q.item["pred"][mode] = extract_choice(text, q.record["options"])
        else:
            answers = [option_answers(tok, q.record["options"], score) for q in batch]
            scores = score_options(model, tok, kv, frame_mask, users, answers, mode, score)
            for s, q in zip(scores, batch):
                set_scores(q.item, mode, s)


def set_scores(item, mode, scores):
    item.setdefault("scores", {})[mode] = [round(float(x), 5) for x in scores]
    item["pred"][mode] = int(scores.argmin())


def mcq_results(items, modes, scoring="likelihood", score="mean"):
    """Accuracy per mode and category of evaluate_mcq's items (or several ranks' items joined)."""
    total = Counter(i["category"] for i in items)
    correct = {m: Counter() for m in modes}
    for item in items:
        for m in modes:
            correct[m][item["category"]] += int(item["pred"].get(m, -1) == item["answer"])

    def stats(right, count):
        return {"accuracy": right / count if count else 0.0, "correct": right, "total": count}
    per_mode = {}
    for m in modes:
        per_category = {k: stats(correct[m][k], t) for k, t in sorted(total.items())}
        per_mode[m] = dict(stats(sum(correct[m].values()), len(items)), per_category=per_category)
    skipped = [{"id": i["id"], "category": i["category"], "reason": i["error"]}
               for i in items if "error" in i]
    return {"scoring": SCORING[scoring].format(score=SCORES[score]), "score": score,
            "count": len(items), "accuracy": {m: r["accuracy"] for m, r in per_mode.items()},
            "modes": per_mode, "skipped": skipped, "skipped_count": len(skipped), "items": items}


@torch.no_grad()
def stream_mcq(model, tok, records, fps=1.0, max_frames=0, image_size=224, score="mean",
               progress=True):
    """Likelihood scoring of long videos in autoregressive mode, streamed (model.stream): the
    questions about one video share one decode and one encode of each chunk. max_frames: the cap
    (0: none). A video that fails to decode or fit the LLM's context counts its questions wrong."""
    device, items, by_video = model.q_init.device, [], {}  # by_video: path -> [(record, item)]
    cap = max_frames or 10 ** 9
    for i, rec in enumerate(records):
        items.append(new_item(rec, i))
        path = rec.get("video") or rec.get("image") or f"error {i}"
        by_video.setdefault(path, []).append((rec, items[-1]))
    videos = tqdm(by_video.items(), disable=not progress, desc="videos (streamed)",
                  dynamic_ncols=True)
    for path, group in videos:
        recs = [rec for rec, _ in group]
        users = [format_mcq(rec["question"], rec["options"]) for rec in recs]
        question, prompt_ids, prompt_valid = prompt_batch(tok, users, model.layout, device)
        answers = [option_answers(tok, rec["options"], score) for rec in recs]
        A = longest_answer(answers)
        try:
            if "error" in recs[0]:
                raise ValueError(recs[0]["error"])
            n, seconds = video_length(path, cap, fps)
            text_tokens = prompt_ids.shape[1] + A + (question[0].shape[1] if question else 0)
            too_long = context_error(n, seconds, text_tokens, model.llm.cfg.max_seq_len, path)
            if too_long:
                raise ValueError(too_long)
            chunks = video_chunks(path, image_size, cap, fps, device=device)
            cache, last = model.stream(chunks, n, prompt_ids, extra=A, question=question,
                                       prompt_valid=prompt_valid)
        except (ValueError, OSError) as e:
            for _, item in group:
                item["error"] = str(e)
            continue
        for scores, (_, item) in zip(score_cached(model, cache, last, answers, score), group):
            set_scores(item, "autoregressive", scores)
    return mcq_results(items, ["autoregressive"], "likelihood", score)


def format_table(results):
    """Accuracy (%) per category (rows) and mode (columns)."""
    per_mode = results["modes"]
    cats = list(next(iter(per_mode.values()))["per_category"]) if per_mode else []
    w = max([len(c) for c in cats] + [8])

    def line(name, n, cells):
        return f"{name:<{w}} {n:>5} " + " ".join(f"{x:>14}" for x in cells)
    lines = [results["scoring"], line("category", "n", per_mode)]
    for c in cats:
        row = [r["per_category"][c] for r in per_mode.values()]
        lines.append(line(c, row[0]["total"], [f"{100 * r['accuracy']:.1f}" for r in row]))
    accuracies = [f"{100 * r['accuracy']:.1f}" for r in per_mode.values()]
    lines.append(line("all", results["count"], accuracies))
    if results["skipped_count"]:
        lines.append(f"{results['skipped_count']} questions had no usable media "
                     f"(counted wrong; see 'skipped' in out)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# task readers: MCQ records (see evaluate_mcq) from data_dir, the benchmark's folder as
# downloaded. A missing video/image is recorded as an error (counted wrong), never dropped.

# task json -> folder under video/, as in the official MVBench evaluation (Ask-Anything)
MVBENCH_VIDEO = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}
# the tasks whose start/end the official evaluation applies
MVBENCH_BOUNDED = {"action_sequence", "action_prediction", "object_interaction",
                   "action_localization", "episodic_reasoning"}


def media_finder(root):
    """locate(rec, "video" | "image", path, rel) -> rec with rec[key] = path if it exists, else a
    file named like `rel` (or its stem + a media extension) anywhere under root, as datasets get
    unpacked in many ways; else rec['error']."""
    by_name = {}  # a file or folder name, and its stem + ".*" -> the paths under root

    def locate(rec, key, path, rel):
        exts = VIDEO_EXTS if key == "video" else IMAGE_EXTS
        if not os.path.exists(path):
            if not by_name:
                for folder, dirs, files in os.walk(root):
                    for name in files + dirs:
                        for k in (name, os.path.splitext(name)[0] + ".*"):
                            by_name.setdefault(k, []).append(os.path.join(folder, name))
            rel = rel.replace("\\", "/")
            base = os.path.basename(rel.rstrip("/"))
            same_stem = by_name.get(os.path.splitext(base)[0] + ".*", [])
            hits = by_name.get(base, []) + [p for p in same_stem
                                            if p.lower().rsplit(".", 1)[-1] in exts]
            hits.sort(key=lambda p: (not p.replace("\\", "/").endswith(rel), p))
            if not hits:
                rec["error"] = f"missing file: {rel} (not at {path}, nor anywhere under {root})"
            path = hits[0] if hits else path
        rec[key] = path
        return rec
    return locate


def read_rows(path):
    """Rows (dicts) of a .json (a list, {id: row}, or one row), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: only needed for parquet input
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:  # JSON lines: .jsonl, and POPE's .json files
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    # {id: row} as ScienceQA's problems.json, or one row (JSON lines of one line)
    if isinstance(rows, dict):
        nested = rows and all(isinstance(v, dict) for v in rows.values())
        rows = [dict(v, _key=k) for k, v in rows.items()] if nested else [rows]
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def table_files(data_dir, need):
    """(path, rows) of each table under data_dir whose rows have the fields `need` (a|b: either)."""
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "**", "*"), recursive=True)
                   if p.endswith((".json", ".jsonl", ".parquet")))
    out = []
    for path in paths:
        try:
            rows = read_rows(path)
        except (ValueError, OSError, ImportError):  # ImportError: parquet without pyarrow
            continue
        if rows and all(any(k in rows[0] for k in alt.split("|")) for alt in need):
            out.append((path, rows))
    if not out:
        hint = ""
        if any(p.endswith(".parquet") for p in paths):
            hint = " (parquet needs pyarrow: pip install pyarrow, or convert it to json)"
        raise FileNotFoundError(f"bench.py: no json/jsonl under {data_dir} with fields "
                                f"{need}{hint}; check data_dir")
    return out


def answer_index(answer, options):
    """An answer as benchmarks write it (index, option text, letter or "B. text") -> its index. The
    text first: MVBench's answer is the option's text, and its Character Order options are letters."""
    if isinstance(answer, int):
        return answer
    answer = str(answer).strip()
    if answer in options:
        return options.index(answer)
    if len(answer) == 1 and answer.upper() in LETTERS[:len(options)]:
        return LETTERS.index(answer.upper())
    return options.index(re.sub(r"^[A-H]\.\s*", "", answer))


def mcq_record(row, where, category="all"):
    """An MCQ row {question, options | candidates, answer} -> a record without its media."""
    options = [re.sub(r"^[A-H]\.\s*", "", o) for o in row.get("options") or row["candidates"]]
    rec = {"question": row["question"], "options": options,
           "category": row.get("category", category)}
    try:
        rec["answer"] = answer_index(row["answer"], options)
    except ValueError:
        rec["error"] = f"{where}: answer {row['answer']!r} is not among the options"
        rec["answer"] = -1
    return rec


def read_mcq_file(path, image_size=64):
    """--task=shapes: our MCQ json (make_shapes' mcq_val.json, or the dir holding it): rows
    {key, shard, question, options, answer, category}, frames from the shard, or rows with a
    `video` path (+ start, end)."""
    path = os.path.join(path, "mcq_val.json") if os.path.isdir(path) else path
    root = os.path.dirname(os.path.abspath(path))
    records, wanted = [], {}  # wanted: shard -> {clip key: record}
    for j, row in enumerate(read_rows(path)):
        rec = dict(mcq_record(row, f"{path}[{j}]"), id=j)
        if "shard" in row:
            wanted.setdefault(os.path.join(root, row["shard"]), {})[row["key"]] = rec
        else:
            rec["video"] = os.path.join(root, row["video"])
            rec.update({k: row[k] for k in ("start", "end") if k in row})
        records.append(rec)
    for shard, by_key in wanted.items():
        for clip in read_tar(shard):
            if clip["key"] in by_key:
                files = clip["files"]
                by_key[clip["key"]]["frames"] = record_frames(files, frame_files(files),
                                                              image_size, shard)
    if missing := [r["question"] for r in records if "frames" not in r and "video" not in r]:
        raise ValueError(f"{path}: {len(missing)} MCQs whose key is not in their shard; "
                         f"regenerate with make_shapes")
    return records


def read_mvbench(data_dir):
    """MVBench: json/<task>.json (rows {video, question, candidates, answer (option text), start?,
    end?}) and video/<MVBENCH_VIDEO[task]>/<video> (a file or frame folder). Category = the task."""
    json_dir = os.path.join(data_dir, "json")
    json_dir = json_dir if os.path.isdir(json_dir) else data_dir
    files = sorted(glob.glob(os.path.join(json_dir, "*.json")))
    if not files:
        raise FileNotFoundError(f"bench.py: no MVBench json/*.json under {data_dir}; "
                                f"point data_dir at the download")
    locate, records = media_finder(data_dir), []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(data_dir, "video", MVBENCH_VIDEO.get(name, ""))
        for j, row in enumerate(read_rows(path)):
            rec = dict(mcq_record(row, f"{path}[{j}]", name), id=f"{name}/{j}")
            if name in MVBENCH_BOUNDED or name not in MVBENCH_VIDEO:
                rec.update({k: float(row[k]) for k in ("start", "end") if row.get(k) is not None})
            video = os.path.join(folder, row["video"])
            records.append(locate(rec, "video", video, row["video"]))
    return records


def read_videomme(data_dir, duration=""):
    """Video-MME, one `duration` or all (''): tables of rows {videoID, question, options ["A. ..",
    ...], answer (letter), duration, domain, task_type}; videos data/<videoID>.mp4. Category =
    duration."""
    locate, records = media_finder(data_dir), []
    if duration not in ("", "short", "medium", "long"):
        raise ValueError(f"bench.py: videomme_duration={duration!r}: "
                         f"choose short, medium, long or '' (all)")
    need = ["videoID|videoid|video_id", "question", "options", "answer"]
    for path, rows in table_files(data_dir, need):
        for j, row in enumerate(rows):
            if duration and row.get("duration") != duration:
                continue
            vid = str(row.get("videoID") or row.get("videoid") or row.get("video_id"))
            rec = dict(mcq_record(row, f"{path}[{j}]", row.get("duration", "all")),
                       id=row.get("question_id", f"{vid}/{j}"), domain=row.get("domain"),
                       task_type=row.get("task_type"))
            video = os.path.join(data_dir, "data", vid + ".mp4")
            records.append(locate(rec, "video", video, vid + ".mp4"))
    return records


def read_scienceqa(data_dir, split="test"):
    """ScienceQA's image questions of `split`: the official problems.json ({pid: {question, choices,
    answer (index), hint, image, split, subject}}) + images/<split>/<pid>/image.png, or tables of
    rows {question, choices, answer, image (relative to the table), hint?, subject?}. Category =
    the subject."""
    locate, records = media_finder(data_dir), []
    official = glob.glob(os.path.join(data_dir, "**", "problems.json"), recursive=True)
    sources = [(p, read_rows(p)) for p in official]
    sources = sources or table_files(data_dir, ["question", "choices", "answer"])
    for path, rows in sources:
        root = os.path.dirname(path)
        for j, row in enumerate(rows):
            if not row.get("image") or (official and row.get("split", split) != split):
                continue
            rel = f"{split}/{row['_key']}/{row['image']}" if official else row["image"]
            image = os.path.join(root, "images" if official else "", rel)
            hint = (row.get("hint") or "").strip()
            key = row.get("_key", row.get("id", j))
            question = (f"Context: {hint}\n" if hint else "") + row["question"]
            mcq = {"question": question, "options": list(row["choices"]), "answer": row["answer"]}
            rec = mcq_record(mcq, f"{path}: {key}", row.get("subject", "all")) | {"id": key}
            records.append(locate(rec, "image", image, rel))
    return records


def read_pope(data_dir):
    """POPE: the official files (coco_pope_random.json, ...: JSON lines {question_id, image, text,
    label yes|no}) + the COCO images. A. yes / B. no; category = the file (coco_random, ...)."""
    locate, records = media_finder(data_dir), []
    for path, rows in table_files(data_dir, ["text|question", "label|answer", "image"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        for j, row in enumerate(rows):
            label = str(row.get("label", row.get("answer"))).strip().lower()
            rec = {"id": f"{stem}/{row.get('question_id', j)}",
                   "question": row.get("text") or row["question"],
                   "options": ["yes", "no"], "answer": 0 if label == "yes" else 1,
                   "category": row.get("category") or stem.replace("_pope", "")}
            image = os.path.join(os.path.dirname(path), row["image"])
            records.append(locate(rec, "image", image, row["image"]))
    return records


def read_shards(data_dir, tok, max_frames=64, image_size=224):
    """MCQs from tar shards (a dir of *.tar*, or a glob): `user` ends with option lines "X. ...",
    `assistant` starts with the letter. Other records are left out."""
    pattern = os.path.join(data_dir, "*.tar*") if os.path.isdir(data_dir) else data_dir
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"bench.py: no *.tar shards in {data_dir}")
    ds = ShardDataset(shards, tok, stage=2, image_size=image_size, max_frames=max_frames,
                      replicate_image_frames=IMAGE_FRAMES, loop=False)
    records = []
    for shard in shards:
        for clip in read_tar(shard):
            try:
                meta, _ = record_text(clip)
            except SkipSample:
                continue
            lines = str(meta.get("user") or "").split("\n")
            k = len(lines)  # lines[k:]: the options
            while k > 0 and re.match(r"^[A-H]\. ", lines[k - 1]):
                k -= 1
            options = [line[3:] for line in lines[k:]]
            m = re.match(r"^\(?([A-H])[.):]", str(meta.get("assistant") or "").strip())
            answer = LETTERS.index(m.group(1)) if m else None
            if len(options) < 2 or answer is None or answer >= len(options):
                continue  # not a lettered MCQ
            files, where = clip["files"], f"{shard}:{clip['key']}"
            category = meta.get("category", meta.get("source", "all"))
            records.append({"id": where, "question": "\n".join(lines[:k]), "options": options,
                            "answer": answer, "category": category,
                            "load": partial(ds.frames, files, meta, where)})
    return records


def read_task(task, data_dir, tok, max_frames, image_size, split, duration):
    if task == "shapes":
        return read_mcq_file(data_dir, image_size)
    if task == "shards":
        return read_shards(data_dir, tok, max_frames, image_size)
    if task == "scienceqa":
        return read_scienceqa(data_dir, split)
    if task == "videomme":
        return read_videomme(data_dir, duration)
    return {"mvbench": read_mvbench, "pope": read_pope}[task](data_dir)


# -----------------------------------------------------------------------------
# speed: what nanoGPT's bench.py is for


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
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
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
    frames = [_jpg(Image.fromarray(block_image())) for _ in range(T)]
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


def compare(command, row, B, T, S, size, dtypes):
    """Another implementation's step per dtype and our speedup (its s / ours): `command` + --llm_dir
    --B --T --S --size --steps --dtypes --device prints JSON {dtype: {step_s}} last."""
    args = shlex.split(command) + [
        "--llm_dir", llm_dir, "--B", str(B), "--T", str(T), "--S", str(S), "--size", str(size),
        "--steps", str(speed_steps), "--dtypes", ",".join(dtypes), "--device", str(device)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        return {"command": command, "error": out.stderr[-2000:]}
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    per_dtype = {name: {"their_step_s": theirs[name]["step_s"],
                        "speedup": theirs[name]["step_s"] / row[name]["step_s"]}
                 for name in dtypes if name in theirs}
    return {"command": command, **per_dtype}


def decode_speed(model, tok, frames, device, n=32):
    """Tokens/s of n greedy tokens after the prompt of a video's frames [1,T,3,S,S]."""
    mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=device)
    with torch.no_grad():
        kv = model.encode(frames, mask)

    def generate(n=n):
        cache, last, _ = prefill_users(model, tok, kv, mask, [DEFAULT_USER], "autoregressive", n)
        for _ in decode(model.llm, cache, last, n, stop_id=-1):  # never stops: a fixed length
            pass
    generate(4)  # warm-up
    return n / median([timed(generate, device) for _ in range(3)])


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


def model_135m():
    """SmolLM2-135M from llm_dir (else random weights of its shape) + a random DINOv2-small."""
    llm = SmolLM2.from_pretrained(llm_dir) if llm_dir else SmolLM2(LLMConfig())
    return FoveatedVLM(llm, DINOv2(DinoConfig()))


def speed_model():
    """(model, tokenizer, frame size): with llm_dir the 135M shape, else init_from."""
    if llm_dir:
        model, tok = model_135m(), load_tokenizer(llm_dir)
    else:
        model, tok_path = load_model(init_from)
        tok = load_tokenizer(tok_path)
    size = image_size or (224 if llm_dir else model.dino.cfg.image_size)
    return model.to(device), tok, size


def speed():
    """--task=speed: per frame count and dtype the train step (samples/s, tokens/s, MFU, memory,
    graphs compiled), the loader and compare_with's step; decode, MCQ and DPO speed."""
    torch.manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        use_tf32()  # as train.py does: fp32 matmuls outside autocast on tensor cores
    else:
        keep_freed_memory()  # as train.py does
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
        if compare_with:
            row["compare"] = compare(compare_with, row, B, T, S, size, dtypes)
        if T == sweep[0]:
            report.update(dpo_speed(model.train(), batch, device))
            first = batch["frames"][:1]
    model.eval()
    # fp32 weights
    report["decode_tokens_per_s"] = decode_speed(model, tok, first, device)
    with peak_memory(device) as mem:
        report["mcq_questions_per_s"] = mcq_speed(model, tok, 16, size, device)
    report.update(mcq_peak_mem_mb=mem["peak_mem_mb"], mcq_frames=16)
    if "bfloat16" in dtypes:  # last: bf16 weights, as sample.py --dtype=bfloat16 loads them
        model.to(torch.bfloat16)
        report["decode_tokens_per_s_bf16"] = decode_speed(model, tok, first.bfloat16(), device)
    return report


# -----------------------------------------------------------------------------
# long video: an hour at one glimpse per second, streamed


def write_h264(path, frames, n, rate=25, keyint=250):
    """n av.VideoFrames -> an H.264 mp4 (x264's default GOP), unless `path` exists."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.options = {"preset": "veryfast", "g": str(keyint)}
        bar = tqdm(frames, total=n, desc=f"making {path}", unit="frame", dynamic_ncols=True)
        for i, frame in enumerate(bar):
            if i == 0:
                s.width, s.height, s.pix_fmt = frame.width, frame.height, "yuv420p"
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


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


def shapes_video(path, minutes, rate=25, seed=0):
    """A `minutes` long video of shapes clips (the README's figure), each frame held 10 s."""
    rng = np.random.default_rng(seed)

    def frames():
        for _ in range(minutes):
            for img in shapes_clip(rng, frames=6)[0]:  # 6 frames x 10 s: a clip a minute
                frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                for _ in range(10 * rate):
                    yield frame
    return write_h264(path, frames(), minutes * 60 * rate, rate)


def longvideo():
    """--task=longvideo: the 135M shape answers a synthetic `minutes`-long video (made once under
    data/) streamed at `fps` in autoregressive mode: per dtype wall time, glimpses/s, peak memory
    and video decoding's share of it. The prompt is random ids (speed does not read it)."""
    torch.manual_seed(0)
    path = synthetic_video(os.path.join("data", f"longvideo-{minutes}min.mp4"), minutes)
    size = image_size or 224
    pick_fps = fps or 1.0
    model = model_135m().to(device).eval()
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
        model.to(getattr(torch, name))
        chunks = video_chunks(path, size, cap, pick_fps, device=device, progress=True)
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            cache, last = model.stream(chunks, n, prompt, 16)
            answer = list(decode(model.llm, cache, last, 16, stop_id=-1))
            wall = time.perf_counter() - t0
        report[name] = dict(mem, wall_s=wall, glimpses_per_s=n / wall, realtime_x=seconds / wall,
                            decode_share=report["decode_alone_s"] / wall, new_tokens=len(answer))
        del cache
    assert decoded == n, f"{path}: decoded {decoded} frames, expected {n}"
    return report


# -----------------------------------------------------------------------------
# CLI


TASKS = ("mvbench", "videomme", "scienceqa", "pope", "shards", "shapes", "speed", "longvideo")


def main():
    for key, value, choices in (("task", task, TASKS), ("score", score, tuple(SCORES)),
                                ("scoring", scoring, tuple(SCORING)),
                                ("dtype", dtype, ("float32", "bfloat16"))):
        if value not in choices:
            sys.exit(f"bench.py: {key}={value!r}: choose one of {', '.join(choices)}")
    warn_slow_bf16(device, dtype, "bench.py")
    if task == "speed":
        return speed()
    if task == "longvideo":
        return longvideo()
    try:
        model, tok_path = load_model(init_from, llm_dir, dino_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    model.to(device)
    tok = load_tokenizer(tok_path)
    folder = data_dir or ("data/shapes" if task == "shapes" else "")
    if not folder:
        sys.exit(f"bench.py: --task={task} needs --data_dir (the benchmark folder as downloaded)")
    size = image_size or 224
    if task == "shapes" and not image_size:  # the size its frames were drawn at
        marker = os.path.join(folder, "shapes.json")
        size = json.load(open(marker))["image_size"] if os.path.isfile(marker) else 64
    n_frames = max_frames or (64 if task == "shards" else 16)
    run_modes = [m for m in modes.split(",") if m]
    if stream and (run_modes != ["autoregressive"] or scoring != "likelihood"):
        sys.exit("bench.py: --stream=True scores autoregressive only (coarse_only / coarse_fine "
                 "hold every frame's K/V at once): pass --modes=autoregressive "
                 "--scoring=likelihood")
    if unknown := sorted(set(run_modes) - set(MODES)):
        sys.exit(f"bench.py: unknown modes {unknown}; choose from {', '.join(MODES)}")
    records = read_task(task, folder, tok, n_frames, size, split, videomme_duration)
    records = records[:limit or None]
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
        if stream:
            results = stream_mcq(model, tok, records, fps or 1.0, max_frames, size, score)
        else:
            results = evaluate_mcq(model, tok, records, run_modes, device, score, scoring=scoring,
                                   max_frames=n_frames, image_size=size, batch_size=batch_size,
                                   fps=fps or None)
    print(format_table(results))
    weights = init_from if init_from != "scratch" else f"{llm_dir} + {dino_dir}"
    return dict(results, task=task, data_dir=folder, image_size=size, dtype=dtype, weights=weights,
                max_frames=max_frames if stream else n_frames)  # streamed: the cap (0: none)


if __name__ == "__main__":
    result = main()
    if task in ("speed", "longvideo"):
        print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
