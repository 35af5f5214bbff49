"""
Every input nanofVLM trains and evaluates on, in one file:
  1. tokenizer + ChatML template + per-stage loss masks
  2. media decoding: videos (PyAV), images (Pillow), frame jpgs inside tar shards
  3. ShardDataset: streaming tar shards, split once over ranks x workers, seeded
     shuffle buffer, text-only mixing at text_ratio, resumable state
  4. collate (text right-padded with <|im_end|>, frames padded + frame_mask)
  5. "shapes": the synthetic foveation task that is our embedded default
Bad inputs are skipped, warned about once (stderr) and counted (loader.skipped()).
"""
import glob as globlib
import io
import json
import os
import random
import re
import sys
import tarfile
import zlib
from collections import Counter
from itertools import chain, groupby

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

SYSTEM_PROMPT = "You are a helpful AI assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 exactly as SmolLM2
PAD_ID = 2  # <|im_end|> doubles as pad; padding is masked out via loss_mask, never via ignore==pad
MAX_LEN = {1: 512, 2: 1024, 3: 1024}
DEFAULT_USER = "Describe this video."  # sample.py's default question, and the shapes task's caption prompt
# Real caption shards carry an empty `user`: the question a caption answers, by `source`, as the original used
SOURCE_PROMPTS = {"openvid": "Write a brief caption for this video.",
                  "webvid": "What would be the WebVid caption for this video?",
                  "vript": "Provide a detailed narration of what happens in this video.",
                  "sharegpt4video": "Describe what happens in this video in detail."}
FALLBACK_PROMPT = "Describe this."  # any other source
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIDEO_EXTS = ("mp4", "webm", "mkv", "gif", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# -----------------------------------------------------------------------------
# bad input: never fatal, never silent

skipped = Counter()  # reason -> count of reads outside a ShardDataset (each dataset counts its own)
_warned = set()


class SkipSample(ValueError):  # a ValueError, so callers outside the dataset just see a bad file
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def _skip(counter, reason, msg):
    counter[reason] += 1
    if msg not in _warned:  # once per path+reason, a run with a million bad files must not flood the log
        _warned.add(msg)
        print(f"data.py: skipping {msg}", file=sys.stderr)


def expand_globs(globs):
    paths = []
    for g in [globs] if isinstance(globs, str) else globs:
        if not (hits := sorted(globlib.glob(g))):
            raise FileNotFoundError(f"data.py: glob '{g}' matched no files; check the path (or run make_shapes)")
        paths += hits
    return paths

# -----------------------------------------------------------------------------
# tokenizer and chat template


def load_tokenizer(path_or_dir):
    path = os.path.join(path_or_dir, "tokenizer.json") if os.path.isdir(path_or_dir) else path_or_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.py: {path} not found; pass a SmolLM2 dir or a tokenizer.json (make_shapes writes one)")
    tok = Tokenizer.from_file(path)
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"{path}: {s} must have id {i} (ChatML ids as in SmolLM2), got {tok.token_to_id(s)}")
    return tok


def encode_chat(tok, messages, stage, max_len=None):
    """ChatML with the system prompt, written by hand (reference section 5) -> (input_ids, loss_mask, truncated).
    Stage 1: every token is a target; stages 2/3: only assistant content and its <|im_end|> (not the '\\n' after it)."""
    text, spans = "", []
    for m in [{"role": "system", "content": SYSTEM_PROMPT}] + list(messages):
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"] + "<|im_end|>")))
        text += m["content"] + "<|im_end|>\n"
    # one encode of the whole text, so ids equal HF apply_chat_template; a target token's characters lie in a span
    enc = tok.encode(text, add_special_tokens=False)
    mask = [1] * len(enc.ids) if stage == 1 else [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
    max_len = max_len or MAX_LEN[stage]
    return enc.ids[:max_len], mask[:max_len], len(enc.ids) > max_len


def encode_prompt(tok, user):
    """System + user turn + generation prompt '<|im_start|>assistant\\n'."""
    text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return tok.encode(text, add_special_tokens=False).ids


def encode_answer(tok, text):
    """Assistant content + <|im_end|>. encode_prompt + encode_answer == encode_chat ids minus its final '\\n'."""
    return tok.encode(text, add_special_tokens=False).ids + [PAD_ID]


def format_mcq(question, options):
    """The user text of a multiple-choice question (reference section 7)."""
    return question + "\n" + "\n".join(f"{'ABCDEFGH'[i]}. {o}" for i, o in enumerate(options))

# -----------------------------------------------------------------------------
# media


def _normalize(frames):
    """uint8 [T,H,W,3] numpy -> ImageNet-normalised float32 [T,3,H,W]"""
    return (torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255) - MEAN) / STD


def _fit(w, h, size):
    """size of the resize that makes the short side `size`"""
    return max(size, round(w * (size / min(w, h)))), max(size, round(h * (size / min(w, h))))


def _crop(a, size):
    """centre crop [H,W,3] -> [size,size,3]"""
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def _pil_rgb(src, size, name):
    try:
        img = ImageOps.exif_transpose(Image.open(src)).convert("RGB")  # phones store sideways + an EXIF tag
    except Exception as e:
        raise SkipSample("bad_image", f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    return _crop(np.array(img.resize(_fit(*img.size, size), Image.BICUBIC)), size)  # [S,S,3] uint8


def load_image(path, image_size, replicate=1, name=None):
    """image -> [replicate,3,S,S]; images are replicated to 8 frames in stages 2-3 (reference section 4)"""
    return _normalize(_pil_rgb(path, image_size, name or str(path))[None]).expand(replicate, -1, -1, -1).contiguous()


def uniform_indices(n, k):
    """k indices spread uniformly over n frames (centres of k equal segments)"""
    return [int((i + 0.5) * n / min(k, n)) for i in range(min(k, n))]


def _duration(container, stream):
    """Seconds of video after the stream's start: from the headers, else from every packet's time (no decoding)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    ends = [float((p.pts + (p.duration or 0)) * stream.time_base) for p in container.demux(stream) if p.pts is not None]
    container.seek(0)
    return max(ends, default=0.0) - float((stream.start_time or 0) * stream.time_base)


def _upright_rgb(frame, size):
    """A decoded frame -> uint8 [size,size,3]: rotated as its display matrix says (phones record sideways),
    short side resized to `size`, centre-cropped."""
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns that make it upright
    w, h = (frame.width, frame.height) if turns % 2 == 0 else (frame.height, frame.width)  # as displayed
    w, h = _fit(w, h, size)
    a = frame.to_ndarray(width=w if turns % 2 == 0 else h, height=h if turns % 2 == 0 else w, format="rgb24")
    return _crop(np.rot90(a, turns), size)


def video_frames(src, image_size, max_frames, fps=None, start=None, end=None, name=None):
    """Yields uint8 frames [S,S,3] of a video file or file-like, picked by presentation time: k times at the
    centres of k equal slices of [start, end] seconds (default: the whole video), k = max_frames, or
    duration * fps if that is fewer. Each time gets the frame on screen then; a frame picked twice comes once.
    Frames in between are decoded (codecs need them) but never converted."""
    name = name or str(src)
    try:
        with av.open(src) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            origin = float((stream.start_time or 0) * stream.time_base)
            duration = _duration(container, stream)
            t0 = min(max(start or 0.0, 0.0), duration)
            t1 = min(end, duration) if end is not None and end > t0 else duration
            k = max_frames if fps is None else max(1, min(max_frames, int((t1 - t0) * fps)))
            targets = [origin + t0 + (i + 0.5) * (t1 - t0) / k for i in range(k)]
            if t0 > 0:  # jump to the keyframe before `start` instead of decoding everything up to it
                container.seek(int((origin + t0) / stream.time_base), stream=stream)
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            shown, last, picked = None, None, 0  # the frame on screen, the last one yielded, targets done
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else origin + i / rate
                while picked < k and targets[picked] < t:  # target `picked` fell before this frame
                    if (shown or frame) is not last:
                        last = shown or frame
                        yield _upright_rgb(last, image_size)
                    picked += 1
                if picked == k:
                    return
                shown = frame
            if shown is None:
                raise ValueError("no video frames")
            late = sum(targets[j] > shown.time + 2 / rate for j in range(picked, k)) if shown.time is not None else 0
            if late > max(1, k // 10):  # headers can be a frame off; more than that means the file was cut
                raise SkipSample("short_video", f"{name}: video stops at {shown.time - origin:.2f} s but its header "
                                 f"says {duration:.2f} s ({late} of {k} picked times are past the end)")
            if picked < k and shown is not last:
                yield _upright_rgb(shown, image_size)
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        if isinstance(e, SkipSample):
            raise
        raise SkipSample("bad_video", f"{name}: cannot decode video ({type(e).__name__}: {e})") from None


def load_video(src, max_frames, image_size, fps=None, start=None, end=None, name=None):
    """video_frames stacked and ImageNet-normalised -> [T,3,S,S]"""
    return _normalize(np.stack(list(video_frames(src, image_size, max_frames, fps, start, end, name))))

def natural_key(name):
    """sort key: 'frame_2' before 'frame_10'"""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(files):
    """The frame images of a record (its file extensions), in natural order: every image named beyond the key
    ({key}.000.jpg, {key}.frame_2.png). A lone {key}.jpg is an image, not a frame."""
    return sorted((e for e in files if "." in e and e.rsplit(".", 1)[1] in IMAGE_EXTS), key=natural_key)


def _turns(user, answer, where):
    """`user` / `assistant` as a json holds them (strings, or equal-length lists of strings: several turns)
    -> (users, answers) lists; an empty or missing user comes back as None. Any other type is a bad field."""
    if isinstance(answer, list):
        users = [None] * len(answer) if user in (None, "") else user
    else:
        users, answer = [user], [answer]
    if not (isinstance(users, list) and len(users) == len(answer) and all(isinstance(a, str) and a for a in answer)
            and all(u is None or isinstance(u, str) for u in users)):
        raise SkipSample("bad_field", f"{where}.json: 'user' and 'assistant' must be strings, or lists of strings "
                         f"of one length (got {type(user).__name__} and {type(answer).__name__})")
    return [u or None for u in users], answer

# -----------------------------------------------------------------------------
# tar shards (reference section 6): files sharing a key form one sample


def write_tar(path, samples):
    """samples: iterable of (key, {ext: bytes|str|dict}); deterministic bytes (mtime 0)"""
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                data = json.dumps(data) if isinstance(data, dict) else data
                data = data.encode() if isinstance(data, str) else data
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime = len(data), 0
                tf.addfile(ti, io.BytesIO(data))


def read_tar(path, counter=skipped):
    """stream one tar ('r|*', no seeking) -> {key, shard, files{ext: bytes}}; a truncated or
    corrupt tar keeps the samples before the damage and counts the rest as one skip"""
    def members(tf):  # (key, ext, bytes); a sample is only yielded once the next key (or the end) is reached intact
        for m in tf:
            if m.isfile():
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")  # keys contain no dots, so "k.000.jpg" -> "k", "000.jpg"
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise EOFError("unexpected end of data")
                yield os.path.join(d, key), ext.lower(), data
        # tarfile ends quietly when the stream stops at/inside a header; an intact plain tar ends with zero blocks
        if getattr(tf.fileobj, "comptype", "") == "tar" and tf.offset + 512 > os.path.getsize(path):
            raise EOFError("no end-of-archive marker (file cut short)")
    try:
        with tarfile.open(path, "r|*") as tf:
            for key, group in groupby(members(tf), key=lambda m: m[0]):
                yield {"key": key, "shard": path, "files": {ext: data for _, ext, data in group}}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        _skip(counter, "bad_tar", f"{path}: truncated or corrupt tar ({type(e).__name__}: {e}); rest of shard dropped")


def read_source(path, counter=skipped):
    """a tar shard, or a plain video/image file (+ optional sidecar {stem}.json / {stem}.txt) as one sample"""
    if ".tar" in os.path.basename(path):
        return read_tar(path, counter)
    stem, ext = os.path.splitext(path)
    files = {e.lower(): open(f"{stem}.{e}", "rb").read() for e in (ext[1:], "json", "txt") if os.path.exists(f"{stem}.{e}")}
    return [{"key": os.path.basename(stem), "shard": os.path.dirname(path), "files": files}]

# -----------------------------------------------------------------------------
# the dataset, its collate and its resumable loader


def _shuffled(it, rng, size):
    """bounded shuffle buffer"""
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) > size:  # full: a random element leaves, the new one takes its slot
            i = rng.randrange(size)
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Streams samples {key, frames [T,3,S,S], input_ids, loss_mask} (stage 3: chosen_/rejected_ ids and
    masks) from tar shards or plain files; json-only samples are text-only (frames [0,3,S,S]).
    Splitting: each epoch the shard list is shuffled with seed+epoch and shard i goes to global reader
    i % (world_size*num_workers), reader = rank*num_workers+worker_id: every shard once per epoch.
    Text mixing: with text_globs and text_ratio>0, each stream position draws (seeded) whether it takes the next
    sample from the text shards (all of them on every reader if they are fewer than the readers) or the main ones.
    Resume: per reader state (epoch, records consumed this epoch, text epoch/pos, position n); a resumed
    reader re-reads the current epoch's tar members and drops the consumed ones without decoding them."""

    def __init__(self, globs, tok, stage, image_size=224, max_frames=64, replicate_image_frames=1, text_ratio=0.0,
                 seed=0, rank=0, world_size=1, text_globs=None, loop=True, shuffle_buffer=1000, fps=None, max_len=None,
                 prompts=None):
        self.shards = expand_globs(globs)
        self.text_shards = expand_globs(text_globs) if text_globs else []
        self.tok, self.stage, self.image_size, self.max_frames = tok, stage, image_size, max_frames
        self.replicate, self.text_ratio, self.seed, self.fps = replicate_image_frames, text_ratio, seed, fps
        self.rank, self.world_size, self.loop, self.shuffle_buffer = rank, world_size, loop, shuffle_buffer
        self.max_len = max_len or MAX_LEN[stage]
        self.prompts = SOURCE_PROMPTS | {"": FALLBACK_PROMPT} | (prompts or {})  # source -> question; "" = any other
        self.batch_size, self.max_batch_frames = None, None  # set by make_loader: batches are built in workers
        self.resume, self.start_worker = {}, 0  # from Loader.load_state_dict: gwid -> state; whose turn was next
        self.skipped = Counter()  # this process's skips; collated batches carry it to the main process

    def _records(self, shards, gwid, total, st, ek, pk):
        """records (raw tar members, undecoded) of one reader, advancing st[ek] (epoch), st[pk] (pos)"""
        while True:
            order = list(shards)
            random.Random(self.seed * 7919 + st[ek]).shuffle(order)  # same on every reader
            mine = order[gwid::total]
            if len(order) < total and pk == "text_pos":
                mine = order  # few text shards: every reader reads all of them, in its own order
            elif len(order) < total and self.loop:  # (eval: surplus readers just read nothing)
                raise ValueError(f"data.py: {len(order)} shards for {total} readers (world_size x num_workers); use fewer workers or more shards")
            rng = random.Random((self.seed * 1_000_003 + st[ek]) * 10_007 + gwid + (pk == "text_pos") * 7)
            raw = (r for p in mine for r in read_source(p, self.skipped))
            done, got = st[pk], 0
            for got, rec in enumerate(_shuffled(raw, rng, self.shuffle_buffer), 1):
                if got > done:  # resume: the first `done` records were consumed; dropped without decoding
                    st[pk] += 1
                    yield rec
            if not self.loop or got == 0:
                return  # got == 0: nothing readable, stop instead of spinning forever
            st[ek], st[pk] = st[ek] + 1, 0

    def samples(self, gwid, total):
        st = {"epoch": 0, "pos": 0, "text_epoch": 0, "text_pos": 0, "n": 0} | self.resume.get(gwid, {})
        main = self._records(self.shards, gwid, total, st, "epoch", "pos")
        text = self._records(self.text_shards, gwid, total, st, "text_epoch", "text_pos") if self.text_shards and self.text_ratio > 0 else None
        while True:
            # the text-vs-media draw depends on the stream position n alone, so resume needs no RNG state
            draw = text and random.Random((self.seed * 1_000_003 + gwid) * 1_000_000_007 + st["n"]).random() < self.text_ratio
            rec = (draw and next(text, None)) or next(main, None)
            if rec is None:
                return
            st["n"] += 1
            try:
                s = self.decode(rec)
            except SkipSample as e:
                _skip(self.skipped, e.reason, str(e))
                continue
            except Exception as e:  # a sample no rule foresaw still never kills the run: named and counted
                _skip(self.skipped, "bad_sample", f"{rec['shard']}:{rec['key']}: {type(e).__name__}: {e}")
                continue
            yield dict(s, _state=(gwid, dict(st)))

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # worker 0 runs the reader whose turn was next: after a resume the DataLoader's round-robin goes on as before
        it = self.samples(self.rank * nw + (wid + self.start_worker) % nw, self.world_size * nw)
        return it if self.batch_size is None else self._batches(it)

    def _batches(self, it):
        """lists of samples; a batch is closed only when the next sample (or the end: None) arrives, so the skip
        counts it carries include the skips after its last sample"""
        batch, cap = [], self.max_batch_frames
        for s in chain(it, [None]):
            full = s is None or len(batch) == self.batch_size or (cap and sum(len(x["frames"]) for x in [*batch, s]) > cap)
            if batch and full:  # cap: dynamic batching by real frames
                batch[-1]["_state"] += (dict(self.skipped),)  # this reader's skip counts so far
                yield batch
                batch = []
            batch.append(s)

    def decode(self, rec):
        files, where = rec["files"], f"{rec['shard']}:{rec['key']}"
        try:
            meta = json.loads(files["json"]) if "json" in files else {}
            assert isinstance(meta, dict), "json is not an object"
        except (ValueError, AssertionError) as e:
            raise SkipSample("bad_json", f"{where}.json: bad json ({e})") from None
        txt = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None
        out = self.text(meta, txt, any(e not in ("json", "txt") for e in files), where)  # text first: cheap to reject
        return dict(out, key=rec["key"], frames=self.frames(files, meta, where))

    def _enc(self, users, answers, where):
        """equal-length lists of user / assistant strings: a conversation of one or more turns"""
        turns = [{"role": r, "content": c} for u, a in zip(users, answers) for r, c in (("user", u), ("assistant", a))]
        ids, mask, trunc = encode_chat(self.tok, turns, self.stage, self.max_len)
        if trunc:
            self.skipped["truncated (kept)"] += 1
        if not any(mask):
            raise SkipSample("no_targets", f"{where}: no target tokens left after truncation to {self.max_len}")
        return ids, mask

    def prompt_for(self, meta):
        """the question of a sample whose `user` is empty or missing: by its source"""
        return self.prompts.get(str(meta.get("source", "")).lower(), self.prompts.get("", FALLBACK_PROMPT))

    def text(self, meta, txt, has_media, where):
        if self.stage == 3:
            if need := [f for f in ("chosen_assistant", "rejected_assistant") if not meta.get(f)]:
                raise SkipSample("missing_field", f"{where}.json: DPO sample misses {need}")
            user = meta.get("user") or (self.prompt_for(meta) if has_media else None)
            c, r = (self._enc(*_turns(user, meta[f"{k}_assistant"], where), where) for k in ("chosen", "rejected"))
            return {"chosen_ids": c[0], "chosen_mask": c[1], "rejected_ids": r[0], "rejected_mask": r[1]}
        if "token_ids" in meta:
            return self._pretokenized(meta, where)
        # stage 1 prefers the caption, stage 2 the user/assistant pair; either falls back to the other.
        # `user` belongs to `assistant`: a caption next to an assistant answer gets the source's prompt
        cap, asst = meta.get("caption") or txt, meta.get("assistant")
        if asst and not (self.stage == 1 and cap):
            answer, user = asst, meta.get("user")
        else:
            answer, user = cap, None if asst else meta.get("user")
        if not answer:
            raise SkipSample("missing_field", f"{where}.json: needs 'assistant' (or 'caption')")
        users, answers = _turns(user, answer, where)
        if has_media:  # a sample with media and an answer is never dropped for lack of a question
            users = [u or self.prompt_for(meta) for u in users]
        if not all(users):
            raise SkipSample("missing_field", f"{where}.json: a text-only sample needs a 'user' question")
        return dict(zip(("input_ids", "loss_mask"), self._enc(users, answers, where)))

    def _pretokenized(self, meta, where):
        """token_ids + loss_mask as stored; a missing mask means "all targets" only in stage 1"""
        ids, mask = meta["token_ids"], meta.get("loss_mask", "all" if self.stage == 1 else None)
        mask = [1] * len(ids) if mask == "all" and isinstance(ids, list) else mask
        vocab = self.tok.get_vocab_size()
        if not (isinstance(ids, list) and all(type(i) is int and 0 <= i < vocab for i in ids)):
            raise SkipSample("bad_field", f"{where}.json: token_ids must be a list of ids in [0, {vocab})")
        if not (isinstance(mask, list) and len(mask) == len(ids) and all(m in (0, 1) for m in mask)):
            raise SkipSample("bad_field", f"{where}.json: token_ids without a matching loss_mask of 0/1")
        if len(ids) > self.max_len:
            self.skipped["truncated (kept)"] += 1
        return {"input_ids": ids[:self.max_len], "loss_mask": mask[:self.max_len]}

    def frames(self, files, meta, where):
        S = self.image_size
        jpgs = frame_files(files)
        if jpgs:
            if isinstance(meta.get("frame_count"), int) and len(jpgs) < meta["frame_count"]:
                raise SkipSample("short_video", f"{where}: {len(jpgs)} frame files but frame_count {meta['frame_count']}")
            pick = [jpgs[i] for i in uniform_indices(len(jpgs), self.max_frames)]  # others never decoded
            return _normalize(np.stack([_pil_rgb(io.BytesIO(files[e]), S, f"{where}.{e}") for e in pick]))
        for e in VIDEO_EXTS:
            if e in files:
                return load_video(io.BytesIO(files[e]), self.max_frames, S, self.fps, name=f"{where}.{e}")
        for e in IMAGE_EXTS:
            if e in files:
                return load_image(io.BytesIO(files[e]), S, self.replicate, name=f"{where}.{e}")
        return torch.zeros(0, 3, S, S)  # text-only


def collate(samples):
    """right-pad text with PAD_ID (loss_mask 0), pad frames to the batch's max T with frame_mask"""
    frames = pad_sequence([s["frames"] for s in samples], batch_first=True)  # [B,T,3,S,S], zeros after each clip
    frame_mask = torch.arange(frames.shape[1]) < torch.tensor([len(s["frames"]) for s in samples])[:, None]  # [B,T]
    out = {"frames": frames, "frame_mask": frame_mask, "keys": [s["key"] for s in samples]}
    # input_ids + loss_mask, or (stage 3) chosen_/rejected_ ids + mask, all [B,L] with one L for the batch
    names = [k for k in samples[0] if k.endswith(("_ids", "_mask"))]
    L = max(len(s[k]) for s in samples for k in names)
    for k in names:
        out[k] = torch.full((len(samples), L), PAD_ID if k.endswith("_ids") else 0, dtype=torch.long)
        for i, s in enumerate(samples):
            out[k][i, :len(s[k])] = torch.as_tensor(s[k], dtype=torch.long)
    if "_state" in samples[-1]:
        out["_state"] = samples[-1]["_state"]  # reader state after the batch's last sample
    return out


class Loader(DataLoader):
    """DataLoader that remembers how far the consumer got, per reader, so a resumed run continues with
    the next sample. Batches come round-robin from workers; after resume we keep that rotation."""

    def __init__(self, dataset, num_workers, **kw):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=collate,
                         persistent_workers=False, **kw)
        self.nw, self.workers, self.stats, self.samples_seen, self.next_worker = max(1, num_workers), {}, {}, 0, 0

    def __iter__(self):
        self.next_worker = self.dataset.start_worker
        for b in super().__iter__():
            g, st, sk = b.pop("_state")
            self.workers[g], self.stats[g] = st, sk
            self.samples_seen += len(b["keys"])
            self.next_worker = (g + 1) % self.nw  # g = rank * nw + worker
            yield b

    def skipped(self):
        """skip reasons summed over this rank's readers (log this)"""
        return sum((Counter(s) for s in self.stats.values()), Counter())

    def state_dict(self):
        """per-rank; keyed by global reader id, so train.py may merge all ranks' dicts into one"""
        return {"workers": {g: dict(s) for g, s in self.workers.items()}, "samples": self.samples_seen,
                "epoch": max([s["epoch"] for s in self.workers.values()] or [0]),
                "next_worker": {self.dataset.rank: self.next_worker}, "num_workers": self.nw,
                "world_size": self.dataset.world_size}

    def load_state_dict(self, sd):
        # which reader reads which shard depends on both numbers: another split would re-read or skip samples
        saved, now = (sd.get("num_workers"), sd.get("world_size")), (self.nw, self.dataset.world_size)
        if saved != now:
            raise ValueError(f"data.py: the checkpoint's data position was saved with num_workers={saved[0]} x "
                             f"world_size={saved[1]}, this run has {now[0]} x {now[1]}: resume with the same "
                             f"--num_workers and number of ranks (or start a new run from it with --init_from=DIR)")
        self.workers = {int(g): dict(s) for g, s in sd["workers"].items()}
        self.dataset.resume, self.samples_seen = dict(self.workers), sd.get("samples", 0)
        self.dataset.start_worker = {int(k): v for k, v in sd.get("next_worker", {}).items()}.get(self.dataset.rank, 0)


def make_loader(dataset, batch_size, num_workers=0, max_batch_frames=None, **kw):
    """batches are built inside the readers (so dynamic batching by frame count is possible);
    kw goes to DataLoader (e.g. pin_memory). Log loader.skipped(); checkpoint loader.state_dict()."""
    readers = dataset.world_size * max(1, num_workers)
    if dataset.loop and len(dataset.shards) < readers:  # said here, in the main process, not in a worker
        raise ValueError(f"data.py: {len(dataset.shards)} shards for {readers} readers (world_size x num_workers): "
                         f"every reader needs a shard of its own: use more shards, or "
                         + (f"--num_workers={n}" if (n := len(dataset.shards) // dataset.world_size) else "fewer ranks"))
    dataset.batch_size, dataset.max_batch_frames = batch_size, max_batch_frames
    return Loader(dataset, num_workers, **kw)

# -----------------------------------------------------------------------------
# "shapes": the synthetic task and our embedded default. Grey frames with clutter dots and two static grey decoy
# balls; one coloured ball moves from one quadrant to another. Every ball carries a small coloured spot. The
# questions are about the mover: its colour (visible in any summary of the frame), where it starts and where it
# stops (the right frames), and the colour of its spot: a few pixels that a summary of the whole frame blurs with
# the decoys' spots and the clutter, so the glimpse has to land on the mover. It does so by content (the only
# coloured ball), so the static coarse glimpse learns it as well as the steered ones: measured, the spot is read
# in every mode alike. The spot is 1/12 of the frame wide: at 1/16 (4 px, split over up to four 8 px patches)
# some seeds read it and others did not (21-76%).
# Half the training clips keep the ball in its quadrant: there every frame says where it is, so the LLM learns to
# read places off a glimpse. With moving balls only, a from-scratch LLM stayed at chance on places (the held-out
# clips all move). Which frame to read (start vs stop) is the slowest part to learn: seeds differ most there.
# Tried and dropped: the ball resting an extra frame at each end gave 87 / 91 / 74 / 82% AR for seeds 1 / 2 / 1337 / 3
# (73 / 74 / 93% for the first three without): the seeds that learn the direction changed, the spread did not.
# Also dropped: a quarter of the clips still instead of half (seeds 1 / 2: 47 / 70%).
# Learnable from scratch on a CPU in minutes was the constraint: small shapes (circle vs square) and a 3x3 grid of
# places with small balls were tried first and stayed at chance in that budget.

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30)}
SPOTS = {"white": (255, 255, 255), "black": (0, 0, 0), "cyan": (0, 230, 230), "magenta": (230, 0, 230)}
PLACES = ["top left", "top right", "bottom left", "bottom right"]  # the quadrants
QUESTIONS = {"colour": "what colour is the moving ball?", "spot": "what colour is the spot on the moving ball?",
             "start": "where does the moving ball start?", "end": "where does the moving ball stop?"}
DECOYS = 2  # static grey balls with spots (at most 2: the mover and the decoys each take a quadrant)
STILL = 0.5  # share of training clips whose ball stays put (see above)
SHAPES_VERSION = 4  # bump when the task changes: ensure_shapes then regenerates old copies


def shapes_clip(rng, image_size=64, frames=6, n_clutter=16, still=False):
    """one clip: (list of T PIL images, facts dict); still: the ball stays in its start quadrant"""
    S, r = image_size, image_size * 0.16
    colour, spots = list(COLOURS)[rng.integers(0, 4)], [list(SPOTS)[i] for i in rng.integers(0, 4, 1 + DECOYS)]
    cells = rng.permutation(4)[:2 + DECOYS]  # mover start, mover end, decoys
    if still:
        cells[1] = cells[0]
    pos = [((c % 2 * 2 + 1) * S / 4 + rng.uniform(-S / 25, S / 25), (c // 2 * 2 + 1) * S / 4 + rng.uniform(-S / 25, S / 25)) for c in cells]
    dots = [(rng.uniform(0, S), rng.uniform(0, S), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n_clutter)]
    imgs = []
    for t in range(frames):
        a = t / max(1, frames - 1)
        imgs.append(Image.new("RGB", (S, S), (128, 128, 128)))
        d = ImageDraw.Draw(imgs[-1])
        for x, y, c in dots:
            d.rectangle([x, y, x + S / 40, y + S / 40], fill=c)
        balls = [((pos[0][0] + a * (pos[1][0] - pos[0][0]), pos[0][1] + a * (pos[1][1] - pos[0][1])), COLOURS[colour], spots[0])]
        balls += [(pos[2 + k], (96, 96, 96), spots[1 + k]) for k in range(DECOYS)]
        for (x, y), fill, spot in balls:
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            d.rectangle([x - S / 24, y - S / 24, x + S / 24, y + S / 24], fill=SPOTS[spot])
    return imgs, {"colour": colour, "spot": spots[0], "start": PLACES[cells[0]], "end": PLACES[cells[1]]}


def shapes_caption(f):
    if f["start"] == f["end"]:
        return f"the {f['colour']} ball with the {f['spot']} spot stays in the {f['start']}."
    return f"the {f['colour']} ball with the {f['spot']} spot moves from the {f['start']} to the {f['end']}."


def shapes_question(rng, f, cat):
    """(question, options, answer index) with 4 options"""
    if cat in ("colour", "spot"):
        right, wrong = f[cat], [x for x in (COLOURS if cat == "colour" else SPOTS) if x != f[cat]]
    else:  # start/end: the other end of a path is always a distractor (you must know the direction)
        right, other = f[cat], f["end" if cat == "start" else "start"]
        rest = [p for p in PLACES if p not in (right, other)]
        wrong = [other] * (other != right) + [rest[i] for i in rng.permutation(len(rest))]  # 3 places either way
    order = rng.permutation(4)
    return QUESTIONS[cat], [([right] + wrong)[i] for i in order], int(np.argmax(order == 0))


def shapes_wrong_caption(rng, f):
    """subtly wrong caption for DPO: one fact about the mover swapped (a place never becomes the other end)"""
    what = list(QUESTIONS)[rng.integers(0, 4)]
    pool = [x for x in {"colour": COLOURS, "spot": SPOTS}.get(what, PLACES) if x not in (f[what], f["start"], f["end"])]
    return shapes_caption(dict(f, **{what: pool[rng.integers(0, len(pool))]}))


def _jpg(img):
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def train_tokenizer(texts, vocab_size=512):
    """tiny byte-level BPE with the ChatML special tokens at ids 0/1/2, as SmolLM2 has them"""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _shapes_text(rng):
    """(user, assistant) of a text-only sample: language facts about the task's words, no frames needed"""
    k = rng.integers(0, 3)
    if k == 0:
        p = PLACES[rng.integers(0, len(PLACES))]
        return f"what is the opposite of the {p}?", f"the {PLACES[len(PLACES) - 1 - PLACES.index(p)]}"
    if k == 1:
        w = (list(COLOURS) + list(SPOTS))[rng.integers(0, 8)]
        return f"is {w} a ball colour or a spot colour?", "a ball colour" if w in COLOURS else "a spot colour"
    return "name the ball colours and the spot colours.", ", ".join(COLOURS) + ". " + ", ".join(SPOTS) + "."


def make_shapes(out_dir, n_train=6000, n_val=500, n_dpo=1000, n_text=1000, image_size=64, frames=6,
                shard_size=1000, seed=0):
    """Write the shapes task: train-*.tar (json: caption for stage 1; for stage 2 a quarter caption answers and
    three quarters conversations that ask all four questions, each lettered or plain), val-*.tar + mcq_val.json (held-out MCQs, one per val clip, categories in rotation; frames
    live in the val shards, read_mcq joins them by key), dpo-*.tar (stage 3 pairs), text-*.tar (text-only samples
    for text_ratio), tokenizer.json. Sample i of a split comes from its own rng (seed, split, i) alone."""
    args = {k: v for k, v in locals().items() if k != "out_dir"} | {"version": SHAPES_VERSION}  # -> shapes.json
    os.makedirs(out_dir, exist_ok=True)
    cats, texts, mcqs = list(QUESTIONS), [SYSTEM_PROMPT, DEFAULT_USER, "system\n", "user\n", "assistant\n"], []
    for sid, (name, n) in enumerate([("train", n_train), ("val", n_val), ("dpo", n_dpo), ("text", n_text)]):
        for s0 in range(0, n, shard_size):
            shard, samples = f"{name}-{s0 // shard_size:04d}.tar", []
            for i in range(s0, min(n, s0 + shard_size)):
                rng, key = np.random.default_rng([seed, sid, i]), f"{name}{i:06d}"
                if name == "text":
                    q, a = _shapes_text(rng)
                    texts += [q, a]
                    samples.append((key, {"json": {"user": q, "assistant": a, "source": "shapes-text"}}))
                    continue
                imgs, f = shapes_clip(rng, image_size, frames, still=name == "train" and rng.random() < STILL)
                if name == "dpo":
                    meta = {"user": DEFAULT_USER, "chosen_assistant": shapes_caption(f), "rejected_assistant": shapes_wrong_caption(rng, f)}
                elif name == "val":  # one lettered MCQ per clip, categories in rotation
                    cat = cats[i % len(cats)]
                    q, opts, ans = shapes_question(rng, f, cat)
                    mcqs.append({"key": key, "shard": shard, "question": q, "options": opts, "answer": ans, "category": cat})
                    meta = {"user": format_mcq(q, opts), "assistant": f"{'ABCD'[ans]}. {opts[ans]}", "category": cat}
                elif rng.random() < 0.25:  # the caption as a stage-2 answer too, so one run learns captions and QA
                    meta = {"user": DEFAULT_USER, "assistant": shapes_caption(f), "category": "caption"}
                else:  # every question in one conversation (4 answers per encode), each lettered or plain
                    qa = [(*shapes_question(rng, f, c), rng.random() < 0.5) for c in rng.permutation(cats)]
                    meta = {"user": [format_mcq(q, o) if mcq else q for q, o, a, mcq in qa],
                            "assistant": [f"{'ABCD'[a]}. {o[a]}" if mcq else o[a] for q, o, a, mcq in qa], "category": "qa"}
                if name != "dpo":
                    meta["caption"] = shapes_caption(f)
                texts += [t for v in meta.values() for t in (v if isinstance(v, list) else [v])]
                files = {f"{t:03d}.jpg": _jpg(im) for t, im in enumerate(imgs)}
                samples.append((key, dict(files, json=dict(meta, frame_count=frames, source="shapes"))))
            write_tar(os.path.join(out_dir, shard), samples)
    with open(os.path.join(out_dir, "mcq_val.json"), "w") as fh:
        json.dump(mcqs, fh, indent=0)
    train_tokenizer(texts).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "shapes.json"), "w") as fh:  # written last: marks a complete dataset
        json.dump(args, fh)
    return args


def ensure_shapes(out_dir, **kw):
    """generate the shapes task unless out_dir already holds one made with the same arguments"""
    marker = os.path.join(out_dir, "shapes.json")
    want = kw | {"version": SHAPES_VERSION}
    if not (os.path.exists(marker) and all(json.load(open(marker)).get(k) == v for k, v in want.items())):
        print(f"data.py: generating the shapes task in {out_dir}", file=sys.stderr)
        make_shapes(out_dir, **kw)
    return out_dir


def read_mcq(path, image_size=64):
    """A json list of MCQs -> [{question, options, answer (index), category, frames [T,3,S,S] or video}]. Our shapes
    format: {key, shard, question, options, answer, category}, frames read from the shard. Also accepts {video,
    question, candidates, answer (text)} (MVBench) and options lettered "A. ..." with a letter answer (Video-MME)."""
    path = os.path.join(path, "mcq_val.json") if os.path.isdir(path) else path
    root = os.path.dirname(os.path.abspath(path))
    recs, need = [], {}
    for r in json.load(open(path)):
        opts, a = [re.sub(r"^[A-H]\. ", "", o) for o in r.get("options") or r["candidates"]], r["answer"]
        ans = a if not isinstance(a, str) else "ABCDEFGH".index(a) if re.fullmatch("[A-H]", a) else opts.index(a)
        out = {"question": r["question"], "options": opts, "answer": ans, "category": r.get("category", r.get("task_type", "all"))}
        if "shard" in r:
            need.setdefault(os.path.join(root, r["shard"]), {})[r["key"]] = out
        else:
            out.update(video=os.path.join(root, r["video"]), **{k: r[k] for k in ("start", "end") if k in r})
        recs.append(out)
    for shard, byk in need.items():
        for rec in read_tar(shard):
            if rec["key"] in byk:
                jpgs = frame_files(rec["files"])
                byk[rec["key"]]["frames"] = _normalize(np.stack([_pil_rgb(io.BytesIO(rec["files"][e]), image_size, shard) for e in jpgs]))
    if missing := [r["question"] for r in recs if "frames" not in r and "video" not in r]:
        raise ValueError(f"{path}: {len(missing)} MCQs whose key is not in their shard; regenerate with make_shapes")
    return recs
