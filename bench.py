"""
Multiple-choice accuracy of nanofVLM on video and image benchmarks, in every mode: each question's
frames are encoded once, each mode prefills the LLM once, and every option is scored from that
cached prefix (score_options). Each benchmark's layout is read by its file in tasks/.

    python bench.py --task=shapes  # after `python train.py`: the held-out shapes MCQs
    python bench.py --task=mvbench --data_dir=MVBench --init_from=out/my_run --out=results.json
    python bench.py --task=videomme --data_dir=Video-MME --llm_dir=SmolLM2-135M-Instruct \\
        --dino_dir=dinov2-small --init_from=fVLM-135M/model.safetensors --limit=200

`python bench.py --help` lists every config key. Training and inference speed: perf/ (README).
"""
import json
import os
import sys
from collections import Counter, namedtuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data import (PAD_ID, SkipSample, context_error, encode_answer, format_mcq, load_tokenizer,
                  prompt_parts, video_chunks, video_length)
from model import MODES, generate, left_pad, load_model
from perf.platform import tune, warn_slow_bf16
from perf.readahead import read_ahead
from tasks import mvbench, pope, scienceqa, shapes, shards, videomme
from tasks.common import extract_choice, load_frames

# -----------------------------------------------------------------------------
# config: every global below is a config key (configurator.py). The model comes from init_from /
# llm_dir / dino_dir as in train.py (model.load_model). "original": the original fVLM benchmark.
task = 'shapes'  # mvbench | videomme | scienceqa | pope | shards | shapes
data_dir = ''  # the benchmark as downloaded ('' for shapes: data/shapes)
init_from = 'out/shapes'  # our checkpoint (dir, run dir) | a .safetensors over llm_dir + dino_dir
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
split = 'test'  # scienceqa split: train | val (or validation) | test
image_root = ''  # pope: the COCO val2014 folder, when it is not under data_dir
videomme_duration = ''  # Video-MME: short | medium | long; '' = all
batch_size = 32  # questions per model call
stream = False  # videos streamed, autoregressive only: --fps=1 --max_frames=0 holds no K/V
out = ''  # write every result (and each question's scores) to this json
# as a script: a config file and --key=value overrides; as an import, these defaults
if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

LETTERS = "ABCDEFGH"
TASKS = ("mvbench", "videomme", "scienceqa", "pope", "shards", "shapes")
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
    """Q user turns' prefixes in one cache, room for `extra` more -> (cache, logits [Q,V], attn)"""
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
    cache = cache.copy_rows(torch.arange(Q, device=device).repeat_interleave(K))
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
    steps = list(generate(model.llm, cache, last, max_new_tokens, stop_id=PAD_ID))
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in users]
    rows = [r[:r.index(PAD_ID)] if PAD_ID in r else r for r in rows]  # up to <|im_end|>
    return [tok.decode(r, skip_special_tokens=True) for r in rows]


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


def read_task(task, data_dir, tok, max_frames, image_size, split, duration, image_root=""):
    """The MCQ records (evaluate_mcq) of a benchmark, from data_dir: its folder as downloaded"""
    if task == "shapes":
        return shapes.read(data_dir, image_size)
    if task == "shards":
        return shards.read(data_dir, tok, max_frames, image_size)
    if task == "scienceqa":
        return scienceqa.read(data_dir, split)
    if task == "videomme":
        return videomme.read(data_dir, duration)
    if task == "pope":
        return pope.read(data_dir, image_root)
    return mvbench.read(data_dir)


# -----------------------------------------------------------------------------
# CLI


def main():
    if task in ("speed", "longvideo"):
        sys.exit(f"bench.py: --task={task} is the speed lab's now: python -m perf.{task} (its "
                 f"keys: python -m perf.{task} --help)")
    for key, value, choices in (("task", task, TASKS), ("score", score, tuple(SCORES)),
                                ("scoring", scoring, tuple(SCORING)),
                                ("dtype", dtype, ("float32", "bfloat16"))):
        if value not in choices:
            sys.exit(f"bench.py: {key}={value!r}: choose one of {', '.join(choices)}")
    warn_slow_bf16(device, dtype, "bench.py")
    if out and not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):  # before the work
        sys.exit(f"bench.py: --out={out}: its folder is missing or not writable")
    try:
        model, tok_path = load_model(init_from, llm_dir, dino_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    tune(model.to(device))
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
    try:
        records = read_task(task, folder, tok, n_frames, size, split, videomme_duration, image_root)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    if not (records := records[:limit or None]):
        sys.exit(f"bench.py: --task={task} found no questions in {folder}: check --data_dir")
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
        if stream:
            results = stream_mcq(model, tok, records, fps or 1.0, max_frames, size, score)
        else:
            results = evaluate_mcq(model, tok, records, run_modes, device, score, scoring=scoring,
                                   max_frames=n_frames, image_size=size, batch_size=batch_size,
                                   fps=fps or None)
    print(format_table(results))
    if task == "pope":
        results["pope"] = pope.metrics(results["items"], list(results["modes"]))
        print(pope.table(results["pope"]))
    if results["skipped_count"] == results["count"]:  # a table of zeros is not a score
        sys.exit(f"bench.py: none of the {results['count']} questions could be scored (no usable "
                 f"media; the first reason: {results['skipped'][0]['reason']})")
    weights = init_from if init_from != "scratch" else f"{llm_dir} + {dino_dir}"
    return dict(results, task=task, data_dir=folder, image_size=size, dtype=dtype, weights=weights,
                max_frames=max_frames if stream else n_frames)  # streamed: the cap (0: none)


if __name__ == "__main__":
    result = main()
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
