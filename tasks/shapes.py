"""
"shapes": our embedded default, a synthetic task where the question decides where to look. Three
coloured balls, each in its own quadrant with a coloured spot, on grey frames with clutter; one
ball moves into the free quadrant. A question asks for a ball's spot (a glimpse of the whole frame
mixes three spots); the control question (which colour is missing) needs no particular ball.
Learnable from scratch on a CPU in minutes (docs/LOG.md). train.py generates it (ensure_shapes);
bench.py --task=shapes scores its held-out MCQs (read).
"""
import glob
import io
import json
import os
import sys

import av
import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from data import (DEFAULT_USER, SPECIALS, SYSTEM_PROMPT, format_mcq, frame_files, read_tar,
                  record_frames, record_text, write_tar)
from model import DinoConfig, DINOv2, FoveatedVLM, LLMConfig, SmolLM2
from tasks.common import mcq_record, read_rows

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
           "yellow": (240, 210, 30)}
SPOTS = {"white": (255, 255, 255), "black": (0, 0, 0), "cyan": (0, 230, 230),
         "magenta": (230, 0, 230)}
PLACES = ["top left", "top right", "bottom left", "bottom right"]  # the quadrants
QUESTIONS = {"spot": "what colour is the spot on the {} ball?",
             "missing": "which ball colour is missing?"}
BALLS = 3  # each in a quadrant; the fourth quadrant is where the mover goes
# share of training clips with one or two balls: there a glimpse of the whole frame reads the spot
FEWER = 0.5
SHAPES_VERSION = 7  # bump when the task changes: ensure_shapes then regenerates old copies


def shapes_clip(rng, image_size=64, frames=4, n_clutter=16, balls=BALLS):
    """one clip: (T PIL images, facts {"balls": [{colour, spot, start, end}], "missing"})"""
    S, r = image_size, image_size * 0.16
    colours = [list(COLOURS)[i] for i in rng.permutation(4)]  # the balls', then the missing ones
    cells = rng.permutation(4)  # the balls' start quadrants, then free ones
    mover, goal = rng.integers(0, balls), cells[rng.integers(balls, 4)]
    facts = [{"colour": colours[b], "spot": list(SPOTS)[rng.integers(0, 4)],
              "start": PLACES[cells[b]], "end": PLACES[goal if b == mover else cells[b]]}
             for b in range(balls)]
    jitter = rng.uniform(-S / 25, S / 25, (4, 2))
    centre = [((c % 2 * 2 + 1) * S / 4 + jitter[c][0], (c // 2 * 2 + 1) * S / 4 + jitter[c][1])
              for c in range(4)]
    dots = [(rng.uniform(0, S), rng.uniform(0, S), tuple(int(v) for v in rng.integers(0, 256, 3)))
            for _ in range(n_clutter)]
    imgs = []
    for t in range(frames):
        a = t / max(1, frames - 1)  # how far along its path the mover is
        imgs.append(Image.new("RGB", (S, S), (128, 128, 128)))
        draw = ImageDraw.Draw(imgs[-1])
        for x, y, c in dots:
            draw.rectangle([x, y, x + S / 40, y + S / 40], fill=c)
        for ball in sorted(facts, key=lambda ball: ball is facts[mover]):  # the mover on top
            (x0, y0), (x1, y1) = (centre[PLACES.index(ball[k])] for k in ("start", "end"))
            x, y = x0 + a * (x1 - x0), y0 + a * (y1 - y0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS[ball["colour"]])
            # the spot, S/8 wide: large enough that a glimpse of its ball reads it
            draw.rectangle([x - S / 16, y - S / 16, x + S / 16, y + S / 16],
                           fill=SPOTS[ball["spot"]])
    return imgs, {"balls": facts, "missing": colours[balls] if balls == 3 else None}


def shapes_caption(facts):
    return " ".join(f"the {b['colour']} ball with the {b['spot']} spot " + (
        f"stays in the {b['start']}." if b["start"] == b["end"]
        else f"moves from the {b['start']} to the {b['end']}.")
        for b in facts["balls"])


def shapes_question(rng, facts, cat, ball=None):
    """(question, 4 options, answer index); `ball` (index) names the ball of a spot question"""
    if cat == "missing":
        question, right, pool = QUESTIONS[cat], facts["missing"], COLOURS
    else:
        b = facts["balls"][rng.integers(0, len(facts["balls"])) if ball is None else ball]
        question, right, pool = QUESTIONS[cat].format(b["colour"]), b["spot"], SPOTS
    options = [right] + [x for x in pool if x != right]
    order = rng.permutation(4)
    return question, [options[i] for i in order], int(np.argmax(order == 0))


def jpg(img):
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def train_tokenizer(texts, vocab_size=512):
    """tiny byte-level BPE with the ChatML special tokens at ids 0/1/2, as SmolLM2 has them"""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _shapes_text(rng):
    """(user, assistant) of a text-only sample: facts about the task's words"""
    k = rng.integers(0, 3)
    if k == 0:
        p = PLACES[rng.integers(0, len(PLACES))]
        opposite = PLACES[len(PLACES) - 1 - PLACES.index(p)]
        return f"what is the opposite of the {p}?", f"the {opposite}"
    if k == 1:
        w = (list(COLOURS) + list(SPOTS))[rng.integers(0, 8)]
        answer = "a ball colour" if w in COLOURS else "a spot colour"
        return f"is {w} a ball colour or a spot colour?", answer
    answer = ", ".join(COLOURS) + ". " + ", ".join(SPOTS) + "."
    return "name the ball colours and the spot colours.", answer


def shapes_sample(rng, name, i, image_size, frames, cats):
    """(json, frame images) of sample i of a split. train: a conversation of 3 of the clip's
    questions, each lettered or plain; val: one lettered MCQ, the categories in rotation; dpo: a
    plain question, its answer against a wrong option."""
    few = name == "train" and rng.random() < FEWER
    balls = rng.integers(1, BALLS) if few else BALLS
    imgs, facts = shapes_clip(rng, image_size, frames, balls=balls)
    if name == "val":
        cat = cats[i % len(cats)]
        q, opts, ans = shapes_question(rng, facts, cat)
        meta = {"user": format_mcq(q, opts), "assistant": f"{'ABCD'[ans]}. {opts[ans]}",
                "category": cat, "question": q, "options": opts, "answer": ans}
    elif name == "dpo":
        q, opts, ans = shapes_question(rng, facts, cats[rng.integers(0, len(cats))])
        wrong = [o for k, o in enumerate(opts) if k != ans]
        meta = {"user": q, "chosen_assistant": opts[ans],
                "rejected_assistant": wrong[rng.integers(0, 3)]}
    else:
        asks = [("missing", None)] * (not few) + [("spot", b) for b in range(len(facts["balls"]))]
        qa = [(*shapes_question(rng, facts, *asks[k]), rng.random() < 0.25)
              for k in rng.permutation(len(asks))[:3]]
        meta = {"user": [format_mcq(q, o) if lettered else q for q, o, a, lettered in qa],
                "assistant": [f"{'ABCD'[a]}. {o[a]}" if lettered else o[a]
                              for q, o, a, lettered in qa],
                "category": "qa"}
    return dict(meta, caption=shapes_caption(facts), frame_count=frames, source="shapes"), imgs


def tiny_model(vocab, image_size, llm, dino, visual_scale, **fresh):
    """The embedded default's fVLM, both backbones from scratch: llm = (dim, layers, heads,
    kv_heads, hidden), dino = (dim, layers, heads, patch_size); `fresh` goes to FoveatedVLM."""
    dim, layers, heads, kv_heads, hidden = llm
    llm = SmolLM2(LLMConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                            n_kv_heads=kv_heads, head_dim=dim // heads, hidden_dim=hidden,
                            max_seq_len=2048))
    dim, layers, heads, patch_size = dino
    dino = DINOv2(DinoConfig(image_size=image_size, patch_size=patch_size, dim=dim,
                             n_layers=layers, n_heads=heads))
    return FoveatedVLM(llm, dino, visual_scale=visual_scale, **fresh)


def make_shapes(out_dir, n_train=6000, n_val=500, n_dpo=1000, n_text=1000, image_size=64, frames=4,
                shard_size=1000, seed=0):
    """Write the shapes task: train-*.tar (stage 2 conversations, captions for stage 1), val-*.tar +
    mcq_val.json (one held-out MCQ per val clip, joined by key), dpo-*.tar (stage 3 pairs),
    text-*.tar (for text_ratio), tokenizer.json. Sample i of a split comes from its own rng."""
    args = {k: v for k, v in locals().items() if k != "out_dir"} | {"version": SHAPES_VERSION}
    os.makedirs(out_dir, exist_ok=True)
    cats, mcqs = list(QUESTIONS), []
    texts = ([SYSTEM_PROMPT, DEFAULT_USER, "system\n", "user\n", "assistant\n"]
             + [q.format(c) for q in QUESTIONS.values() for c in COLOURS])
    splits = [("train", n_train), ("val", n_val), ("dpo", n_dpo), ("text", n_text)]
    for sid, (name, n) in enumerate(splits):
        for s0 in range(0, n, shard_size):
            shard, samples = f"{name}-{s0 // shard_size:04d}.tar", []
            for i in range(s0, min(n, s0 + shard_size)):
                rng, key = np.random.default_rng([seed, sid, i]), f"{name}{i:06d}"
                if name == "text":
                    q, a = _shapes_text(rng)
                    texts += [q, a]
                    text_meta = {"user": q, "assistant": a, "source": "shapes-text"}
                    samples.append((key, {"json": text_meta}))
                    continue
                meta, imgs = shapes_sample(rng, name, i, image_size, frames, cats)
                if name == "val":
                    mcqs.append({"key": key, "shard": shard}
                                | {k: meta.pop(k) for k in ("question", "options", "answer")}
                                | {"category": meta["category"]})
                texts += [t for v in meta.values() if isinstance(v, (str, list))
                          for t in (v if isinstance(v, list) else [v])]
                files = {f"{t:03d}.jpg": jpg(im) for t, im in enumerate(imgs)}
                samples.append((key, dict(files, json=meta)))
            write_tar(os.path.join(out_dir, shard), samples)
    with open(os.path.join(out_dir, "mcq_val.json"), "w") as fh:
        json.dump(mcqs, fh, indent=0)
    train_tokenizer(texts).save(os.path.join(out_dir, "tokenizer.json"))
    # written last: marks a complete dataset
    with open(os.path.join(out_dir, "shapes.json"), "w") as fh:
        json.dump(args, fh)
    return args


def ensure_shapes(out_dir, **kw):
    """make_shapes unless out_dir holds one made with the same arguments"""
    marker = os.path.join(out_dir, "shapes.json")
    want = kw | {"version": SHAPES_VERSION}
    if not (os.path.exists(marker)
            and all(json.load(open(marker)).get(k) == v for k, v in want.items())):
        print(f"tasks/shapes.py: generating the shapes task in {out_dir}", file=sys.stderr)
        make_shapes(out_dir, **kw)
    return out_dir


def read(path, image_size=64):
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


def val_clip(root, index, image_size=0):
    """sample.py's default input: (frames [T,3,S,S] at image_size, or as stored if 0, the question,
    the reference answer) of clip `index` of the val split in root"""
    shards = sorted(glob.glob(os.path.join(root, "val-*.tar")))
    if not shards:
        raise ValueError(f"{root}/val-*.tar: not found; run `python train.py` (it generates the "
                         f"shapes task) or pass --video/--image")
    recs = (rec for shard in shards for rec in read_tar(shard))
    rec = next((r for i, r in enumerate(recs) if i == index), None)
    if rec is None:
        raise ValueError(f"{root}: the val split has no clip {index}")
    names = frame_files(rec["files"])
    side = image_size or Image.open(io.BytesIO(rec["files"][names[0]])).width
    meta = record_text(rec)[0]
    frames = record_frames(rec["files"], names, side, rec["shard"])
    return frames, meta.get("user"), meta.get("assistant")


# a long video of the shapes world (the README's contact sheet)


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
