"""
Every input nanofVLM trains and evaluates on, in one file:
  1. tokenizer + ChatML template + per-stage loss masks
  2. media decoding: videos (PyAV), images (Pillow), frame jpgs inside tar shards
  3. ShardDataset: streaming tar shards, split once over ranks x workers, seeded
     shuffle buffer, text-only mixing at text_ratio, resumable state
  4. collate (text right-padded with <|im_end|>, frames padded + frame_mask)
  5. "shapes": the synthetic foveation task that is our embedded default
Bad inputs are skipped, warned about once (stderr) and counted in `skipped`.
"""
import glob as globlib
import io
import json
import os
import random
import re
import sys
import tarfile
import time
import zlib
from collections import Counter, deque

import av
import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

SYSTEM_PROMPT = "You are a helpful AI assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 exactly as SmolLM2
PAD_ID = 2  # <|im_end|> doubles as pad; padding is masked out via loss_mask, never via ignore==pad
MAX_LEN = {1: 512, 2: 1024, 3: 1024}
DEFAULT_USER = "Describe this video."  # used when a caption sample carries no user prompt
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIDEO_EXTS = ("mp4", "webm", "mkv", "gif", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# -----------------------------------------------------------------------------
# bad input: never fatal, never silent

skipped = Counter()  # reason -> count, for this process (workers report theirs through batches)
_warned = set()


class SkipSample(Exception):
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def _skip(counter, reason, msg):
    counter[reason] += 1
    if counter is not skipped:
        skipped[reason] += 1
    if msg not in _warned:  # once per path+reason, a run with a million bad files must not flood the log
        _warned.add(msg)
        print(f"data.py: skipping {msg}", file=sys.stderr)


def expand_globs(globs):
    globs = [globs] if isinstance(globs, str) else list(globs)
    paths = []
    for g in globs:
        hits = sorted(globlib.glob(g))
        if not hits:
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
    """ChatML with the explicit system prompt, written by hand (reference section 5).
    Returns (input_ids, loss_mask, truncated). Stage 1: every token is a target.
    Stages 2/3: only assistant content and its <|im_end|> (not the '\\n' after it)."""
    text, spans = "", []
    for m in [{"role": "system", "content": SYSTEM_PROMPT}] + list(messages):
        head = f"<|im_start|>{m['role']}\n"
        start = len(text) + len(head)
        text += head + m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    # one encode of the whole string so ids equal HF apply_chat_template exactly; the
    # mask comes from character offsets (a token is a target if it lies inside a span)
    enc = tok.encode(text, add_special_tokens=False)
    ids = enc.ids
    if stage == 1:
        mask = [1] * len(ids)
    else:
        mask = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
    max_len = max_len or MAX_LEN[stage]
    truncated = len(ids) > max_len
    return ids[:max_len], mask[:max_len], truncated


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
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def _fit(w, h, size):
    """size of the resize that makes the short side `size`"""
    s = size / min(w, h)
    return max(size, round(w * s)), max(size, round(h * s))


def _crop(a, size):
    """centre crop [H,W,3] -> [size,size,3]"""
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def _pil_rgb(src, size, name):
    try:
        img = Image.open(src)
        img = img.convert("RGB")
    except Exception as e:
        raise ValueError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    if min(img.size) != size:
        img = img.resize(_fit(*img.size, size), Image.BICUBIC)
    return _crop(np.array(img), size)  # [S,S,3] uint8


def load_image(path, image_size, replicate=1, name=None):
    """image -> [replicate,3,S,S]; images are replicated to 8 frames in stages 2-3 (reference section 4)"""
    a = _pil_rgb(path, image_size, name or str(path))
    return _normalize(a[None]).expand(replicate, -1, -1, -1).contiguous()


def uniform_indices(n, k):
    """k indices spread uniformly over n frames (centres of k equal segments)"""
    k = min(k, n)
    return [int((i + 0.5) * n / k) for i in range(k)]


def load_video(path, max_frames, image_size, fps=None, start=None, end=None, name=None):
    """Decode up to max_frames frames sampled uniformly over the clip (or over
    [start,end] seconds), at most `fps` frames per second if given. Only the picked
    frames are converted to RGB/resized. Returns [T,3,S,S]. path: file path or file-like."""
    name = name or str(path)
    try:
        if hasattr(path, "seek"):
            path.seek(0)
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            rate = float(s.average_rate or s.guessed_rate or 0) or 25.0
            n = s.frames
            if n <= 0:  # webm/mkv/gif often carry no frame count: count packets (demux only, no decode)
                n = sum(1 for p in c.demux(s) if p.size)
                c.seek(0)
            if n <= 0:
                raise ValueError("no video frames")
            i0 = min(n - 1, int((start or 0) * rate))
            i1 = max(i0 + 1, min(n, int(round(end * rate)) if end is not None else n))
            k = max_frames if fps is None else max(1, min(max_frames, int((i1 - i0) / rate * fps)))
            want = [i0 + i for i in uniform_indices(i1 - i0, k)]
            out, j = [], 0
            for i, f in enumerate(c.decode(s)):
                if i < want[j]:
                    continue  # decoded (codecs need it) but never converted or resized
                w, h = _fit(f.width, f.height, image_size)
                a = _crop(f.to_ndarray(width=w, height=h, format="rgb24"), image_size)
                while j < len(want) and want[j] <= i:
                    out.append(a)
                    j += 1
                if j == len(want):
                    break
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        raise ValueError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from None
    if len(out) < len(want):
        # header frame counts can be off by a frame or two; anything more is a truncated file
        if not out or len(want) - len(out) > max(1, len(want) // 10):
            raise ValueError(f"{name}: video has fewer frames than asked (decoded {len(out)} of {len(want)} wanted, header says {n})")
        out += [out[-1]] * (len(want) - len(out))
    return _normalize(np.stack(out))  # [T,3,S,S]

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
    cur = None
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")  # keys contain no dots, so "k.000.jpg" -> "k", "000.jpg"
                key = os.path.join(d, key)
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise EOFError("unexpected end of data")
                if cur is not None and cur["key"] != key:
                    yield cur
                    cur = None
                cur = cur or {"key": key, "shard": path, "files": {}}
                cur["files"][ext.lower()] = data
            # tarfile ends quietly when the stream stops at/inside a header; an intact plain tar
            # has at least one zero block after its last member
            if getattr(tf.fileobj, "comptype", "") == "tar" and tf.offset + 512 > os.path.getsize(path):
                raise EOFError("no end-of-archive marker (file cut short)")
        if cur is not None:
            yield cur
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        _skip(counter, "bad_tar", f"{path}: truncated or corrupt tar ({type(e).__name__}: {e}); rest of shard dropped")



def read_source(path, counter=skipped):
    """a tar shard, or a plain video/image file (+ optional sidecar {stem}.json / {stem}.txt) as one sample"""
    if ".tar" in os.path.basename(path):
        yield from read_tar(path, counter)
        return
    stem, ext = os.path.splitext(path)
    files = {ext[1:].lower(): open(path, "rb").read()}
    for side in ("json", "txt"):
        if os.path.exists(f"{stem}.{side}"):
            files[side] = open(f"{stem}.{side}", "rb").read()
    yield {"key": os.path.basename(stem), "shard": os.path.dirname(path), "files": files}

# -----------------------------------------------------------------------------
# the dataset


def _rand(seed, gwid, n):
    """the text-vs-media draw at stream position n; a pure function so resume needs no RNG state"""
    return random.Random((seed * 1_000_003 + gwid) * 1_000_000_007 + n).random()


def _shuffled(it, rng, size):
    """bounded shuffle buffer"""
    buf = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Streams samples {frames [T,3,S,S], input_ids, loss_mask, key} (stage 3: chosen_/rejected_
    ids and masks) from tar shards.
    Splitting: each epoch the shard list is shuffled with seed+epoch, then shard i goes to global
    reader i % (world_size*num_workers), reader = rank*num_workers+worker_id: every shard once per epoch.
    Text mixing: with text_globs and text_ratio>0, each stream position draws (seeded) whether it takes
    the next text-only sample from the text shards or the next sample from the main shards. Json-only
    samples inside the main shards are also decoded as text-only (frames [0,3,S,S]). If there are fewer
    text shards than readers, every reader reads all text shards (in its own order).
    Resume: per reader state (epoch, records consumed this epoch, text epoch/pos, position n). A resumed
    reader re-reads tar members of the current epoch and drops the consumed ones without decoding them."""

    def __init__(self, globs, tok, stage, image_size=224, max_frames=64, replicate_image_frames=1,
                 text_ratio=0.0, seed=0, rank=0, world_size=1, text_globs=None, loop=True,
                 shuffle_buffer=1000, fps=None, max_len=None):
        self.shards = expand_globs(globs)
        self.text_shards = expand_globs(text_globs) if text_globs else []
        self.tok, self.stage, self.image_size, self.max_frames = tok, stage, image_size, max_frames
        self.replicate, self.text_ratio, self.seed, self.fps = replicate_image_frames, text_ratio, seed, fps
        self.rank, self.world_size, self.loop, self.shuffle_buffer = rank, world_size, loop, shuffle_buffer
        self.max_len = max_len or MAX_LEN[stage]
        self.batch_size, self.max_batch_frames = None, None  # set by make_loader: batches are built in workers
        self.resume = {}  # gwid -> reader state, from load_state_dict
        self.progress = {}  # gwid -> reader state, tracked in-process (num_workers=0)
        self.skipped = Counter()  # this process's skips; collated batches carry it to the main process

    def state_dict(self):
        return {"workers": {g: dict(s) for g, s in self.progress.items()}}

    def load_state_dict(self, sd):
        self.resume = {int(g): dict(s) for g, s in sd["workers"].items()}

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
            todo, got = st[pk], 0
            for rec in _shuffled(raw, rng, self.shuffle_buffer):
                got += 1
                if todo:  # resume: skip consumed records without decoding them
                    todo -= 1
                    continue
                st[pk] += 1
                yield rec
            if not self.loop or got == 0:
                return  # got == 0: nothing readable, stop instead of spinning forever
            st[ek], st[pk] = st[ek] + 1, 0

    def samples(self, gwid, total):
        st = {"epoch": 0, "pos": 0, "text_epoch": 0, "text_pos": 0, "n": 0}
        st.update(self.resume.get(gwid, {}))
        main = self._records(self.shards, gwid, total, st, "epoch", "pos")
        text = None
        if self.text_shards and self.text_ratio > 0:
            text = self._records(self.text_shards, gwid, total, st, "text_epoch", "text_pos")
        while True:
            rec = None
            if text is not None and _rand(self.seed, gwid, st["n"]) < self.text_ratio:
                rec = next(text, None)
            rec = rec or next(main, None)
            if rec is None:
                return
            st["n"] += 1
            try:
                s = self.decode(rec)
            except SkipSample as e:
                _skip(self.skipped, e.reason, str(e))
                continue
            self.progress[gwid] = dict(st)
            s["_state"] = (gwid, dict(st))
            yield s

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        it = self.samples(self.rank * nw + wid, self.world_size * nw)
        if self.batch_size is None:
            yield from it
            return
        # a full batch waits for the next sample (or the end) so its skip counts include trailing skips
        batch, nf, cap = [], 0, self.max_batch_frames
        for s in it:
            t = s["frames"].shape[0]
            if batch and (len(batch) == self.batch_size or (cap and nf + t > cap)):  # cap: dynamic batching by real frames
                yield self._stamp(batch)
                batch, nf = [], 0
            batch.append(s)
            nf += t
        if batch:
            yield self._stamp(batch)

    def _stamp(self, batch):
        batch[-1]["_state"] = batch[-1]["_state"][:2] + (dict(self.skipped),)
        return batch

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

    def _enc(self, messages, where):
        ids, mask, trunc = encode_chat(self.tok, messages, self.stage, self.max_len)
        if trunc:
            self.skipped["truncated (kept)"] += 1
        if not any(mask):
            raise SkipSample("no_targets", f"{where}: no target tokens left after truncation to {self.max_len}")
        return ids, mask

    def text(self, meta, txt, has_media, where):
        if self.stage == 3:
            need = [f for f in ("user", "chosen_assistant", "rejected_assistant") if not meta.get(f)]
            if need:
                raise SkipSample("missing_field", f"{where}.json: DPO sample misses {need}")
            c = self._enc([{"role": "user", "content": meta["user"]}, {"role": "assistant", "content": meta["chosen_assistant"]}], where)
            r = self._enc([{"role": "user", "content": meta["user"]}, {"role": "assistant", "content": meta["rejected_assistant"]}], where)
            return {"chosen_ids": c[0], "chosen_mask": c[1], "rejected_ids": r[0], "rejected_mask": r[1]}
        if "token_ids" in meta:  # pre-tokenized; a missing mask means "all targets" only in stage 1
            ids = meta["token_ids"]
            mask = meta.get("loss_mask", [1] * len(ids) if self.stage == 1 else None)
            if mask is None or len(mask) != len(ids):
                raise SkipSample("missing_field", f"{where}.json: token_ids without a matching loss_mask")
            if len(ids) > self.max_len:
                self.skipped["truncated (kept)"] += 1
            return {"input_ids": ids[:self.max_len], "loss_mask": mask[:self.max_len]}
        # stage 1 prefers the caption, stage 2 the user/assistant pair; either falls back to the other.
        # `user` belongs to `assistant`: a caption next to an assistant answer gets DEFAULT_USER
        cap, asst = meta.get("caption") or txt, meta.get("assistant")
        if asst and not (self.stage == 1 and cap):
            answer, user = asst, meta.get("user")
        else:
            answer, user = cap, (None if asst else meta.get("user")) or (DEFAULT_USER if has_media else None)
        if not answer or not user:
            raise SkipSample("missing_field", f"{where}.json: needs 'user' and 'assistant' (or 'caption')")
        ids, mask = self._enc([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], where)
        return {"input_ids": ids, "loss_mask": mask}

    def frames(self, files, meta, where):
        S = self.image_size
        try:
            jpgs = sorted(e for e in files if re.fullmatch(r"\d+\.(jpg|jpeg|png)", e))
            if jpgs:
                want = meta.get("frame_count")
                if isinstance(want, int) and len(jpgs) < want:
                    raise SkipSample("short_video", f"{where}: {len(jpgs)} frame files but frame_count {want}")
                pick = [jpgs[i] for i in uniform_indices(len(jpgs), self.max_frames)]  # others never decoded
                return _normalize(np.stack([_pil_rgb(io.BytesIO(files[e]), S, f"{where}.{e}") for e in pick]))
            for e in VIDEO_EXTS:
                if e in files:
                    if not files[e]:
                        raise ValueError(f"{where}.{e}: zero-length video")
                    return load_video(io.BytesIO(files[e]), self.max_frames, S, self.fps, name=f"{where}.{e}")
            for e in IMAGE_EXTS:
                if e in files:
                    return load_image(io.BytesIO(files[e]), S, self.replicate, name=f"{where}.{e}")
        except ValueError as e:
            reason = "short_video" if "fewer frames" in str(e) else "bad_image" if "image" in str(e) else "bad_video"
            raise SkipSample(reason, str(e)) from None
        return torch.zeros(0, 3, S, S)  # text-only

# -----------------------------------------------------------------------------
# collate and loader


def _pad(seqs, S, value):
    out = torch.full((len(seqs), S), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate(samples):
    """right-pad text with PAD_ID (loss_mask 0), pad frames to the batch's max T with frame_mask"""
    B, T = len(samples), max(s["frames"].shape[0] for s in samples)
    S = samples[0]["frames"].shape[-1]
    frames = torch.zeros(B, T, 3, S, S)  # [B,T,3,S,S]
    frame_mask = torch.zeros(B, T, dtype=torch.bool)  # [B,T] True = real frame
    for i, s in enumerate(samples):
        t = s["frames"].shape[0]
        frames[i, :t] = s["frames"]
        frame_mask[i, :t] = True
    out = {"frames": frames, "frame_mask": frame_mask, "keys": [s["key"] for s in samples]}
    if "chosen_ids" in samples[0]:
        L = max(len(s[k]) for s in samples for k in ("chosen_ids", "rejected_ids"))
        for k in ("chosen", "rejected"):
            out[f"{k}_ids"] = _pad([s[f"{k}_ids"] for s in samples], L, PAD_ID)
            out[f"{k}_mask"] = _pad([s[f"{k}_mask"] for s in samples], L, 0)
    else:
        L = max(len(s["input_ids"]) for s in samples)
        out["input_ids"] = _pad([s["input_ids"] for s in samples], L, PAD_ID)  # [B,L]
        out["loss_mask"] = _pad([s["loss_mask"] for s in samples], L, 0)  # [B,L]
    if "_state" in samples[-1]:
        out["_state"] = samples[-1]["_state"]  # reader state after the batch's last sample
    return out


class Loader(DataLoader):
    """DataLoader that remembers how far the consumer got, per reader, so a resumed run continues with
    the next sample. Batches come round-robin from workers; after resume we keep that rotation."""

    def __init__(self, dataset, num_workers, **kw):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=collate,
                         persistent_workers=False, **kw)
        self.nw = max(1, num_workers)
        self.workers, self.stats, self.samples_seen, self.start_worker, self.next_worker = {}, {}, 0, 0, 0

    def __iter__(self):
        pending, self.next_worker = {w: deque() for w in range(self.nw)}, self.start_worker
        base = self.dataset.rank * self.nw

        def emit(b):
            g, st, sk = b.pop("_state")
            self.workers[g], self.stats[g] = st, sk
            self.samples_seen += len(b["keys"])
            self.next_worker = (g - base + 1) % self.nw
            return b
        for b in super().__iter__():
            pending[b["_state"][0] - base].append(b)
            while pending[self.next_worker]:
                yield emit(pending[self.next_worker].popleft())
        while any(pending.values()):  # eval: some readers ended early, flush the rest in rotation
            if pending[self.next_worker]:
                yield emit(pending[self.next_worker].popleft())
            else:
                self.next_worker = (self.next_worker + 1) % self.nw

    def skipped(self):
        """skip reasons summed over this rank's readers (log this)"""
        return sum((Counter(s) for s in self.stats.values()), Counter())

    def state_dict(self):
        """per-rank; keyed by global reader id, so train.py may merge all ranks' dicts into one"""
        return {"workers": {g: dict(s) for g, s in self.workers.items()}, "samples": self.samples_seen,
                "epoch": max([s["epoch"] for s in self.workers.values()] or [0]),
                "next_worker": {self.dataset.rank: self.next_worker}, "num_workers": self.nw}

    def load_state_dict(self, sd):
        if sd.get("num_workers", self.nw) != self.nw:
            raise ValueError(f"data.py: loader state saved with num_workers={sd['num_workers']}, now {self.nw}; resume with the same num_workers and world size")
        self.dataset.load_state_dict(sd)
        self.workers = {int(g): dict(s) for g, s in sd["workers"].items()}
        self.samples_seen = sd.get("samples", 0)
        self.start_worker = {int(k): v for k, v in sd.get("next_worker", {}).items()}.get(self.dataset.rank, 0)


def make_loader(dataset, batch_size, num_workers=0, max_batch_frames=None, **kw):
    """batches are built inside the readers (so dynamic batching by frame count is possible);
    kw goes to DataLoader (e.g. pin_memory). Log loader.skipped(); checkpoint loader.state_dict()."""
    dataset.batch_size, dataset.max_batch_frames = batch_size, max_batch_frames
    return Loader(dataset, num_workers, **kw)

# -----------------------------------------------------------------------------
# multiple choice records for bench.py


def read_mcq(path, image_size=64):
    """A json list of MCQs -> [{question, options, answer (index), category, frames [T,3,S,S] or video}].
    Our shapes format: {key, shard, question, options, answer, category}; the frames are read from
    the shard. Also accepts {video, question, candidates, answer (text)} (MVBench) and options
    lettered "A. ..." with a letter answer (Video-MME)."""
    path = os.path.join(path, "mcq_val.json") if os.path.isdir(path) else path
    root = os.path.dirname(os.path.abspath(path))
    recs, need = [], {}
    for r in json.load(open(path)):
        opts = r.get("options") or r.get("candidates")
        opts = [re.sub(r"^[A-H]\. ", "", o) for o in opts]
        ans = r["answer"]
        if isinstance(ans, str):
            ans = "ABCDEFGH".index(ans) if len(ans) == 1 and ans in "ABCDEFGH" else opts.index(ans)
        out = {"question": r["question"], "options": opts, "answer": ans, "category": r.get("category", r.get("task_type", "all"))}
        if "shard" in r:
            need.setdefault(os.path.join(root, r["shard"]), {})[r["key"]] = out
        else:
            out["video"] = os.path.join(root, r["video"])
            out.update({k: r[k] for k in ("start", "end") if k in r})
        recs.append(out)
    for shard, byk in need.items():
        for rec in read_tar(shard):
            if rec["key"] in byk:
                jpgs = sorted(e for e in rec["files"] if re.fullmatch(r"\d+\.jpg", e))
                byk[rec["key"]]["frames"] = _normalize(np.stack([_pil_rgb(io.BytesIO(rec["files"][e]), image_size, shard) for e in jpgs]))
    missing = [r["question"] for r in recs if "frames" not in r and "video" not in r]
    if missing:
        raise ValueError(f"{path}: {len(missing)} MCQs whose key is not in their shard; regenerate with make_shapes")
    return recs

# -----------------------------------------------------------------------------
# "shapes": the synthetic task and our embedded default. Grey frames with static clutter dots
# and 3 coloured shapes, each in its own cell of a 3x3 grid; exactly one shape moves from one
# cell to another over the clip. Every question is about the mover (which one, its colour, its
# shape, where it starts, where it stops), so the model must compare frames to find it and then
# look closely at it; a fixed per-frame summary has to encode all 3 objects + clutter at once.

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 30)}
SHAPES = ["circle", "square", "triangle", "cross"]
PLACES = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
QUESTIONS = {"object": "which object moves?", "colour": "what colour is the moving object?",
             "shape": "what shape is the moving object?", "start": "where does the moving object start?",
             "end": "where does the moving object stop?"}


def _draw(d, shape, x, y, r, col):
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=col)
    elif shape == "square":
        d.rectangle([x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r], fill=col)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=col)
    else:
        w = r / 3
        d.rectangle([x - r, y - w, x + r, y + w], fill=col)
        d.rectangle([x - w, y - r, x + w, y + r], fill=col)


def shapes_clip(rng, image_size=64, frames=6, n_clutter=16):
    """one clip: (list of T PIL images, facts dict); 3 objects with distinct colours"""
    S = image_size
    cols = [list(COLOURS)[i] for i in rng.permutation(4)]  # cols[3] is absent from the clip
    shps = [SHAPES[i] for i in rng.integers(0, 4, 4)]
    cells = rng.permutation(9)[:4]  # mover start, mover end, two static objects
    pos = [((c % 3 * 2 + 1) * S / 6 + rng.uniform(-S / 25, S / 25), (c // 3 * 2 + 1) * S / 6 + rng.uniform(-S / 25, S / 25)) for c in cells]
    dots = [(rng.uniform(0, S), rng.uniform(0, S), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n_clutter)]
    r, imgs = S * 0.09, []
    for t in range(frames):
        a = t / max(1, frames - 1)
        img = Image.new("RGB", (S, S), (128, 128, 128))
        d = ImageDraw.Draw(img)
        for x, y, c in dots:
            d.rectangle([x, y, x + S / 40, y + S / 40], fill=c)
        for k in (1, 2):
            _draw(d, shps[k], *pos[k + 1], r, COLOURS[cols[k]])
        _draw(d, shps[0], pos[0][0] + a * (pos[1][0] - pos[0][0]), pos[0][1] + a * (pos[1][1] - pos[0][1]), r, COLOURS[cols[0]])
        imgs.append(img)
    facts = {"colour": cols[0], "shape": shps[0], "start": PLACES[cells[0]], "end": PLACES[cells[1]],
             "others": [f"{cols[k]} {shps[k]}" for k in (1, 2)], "absent": f"{cols[3]} {shps[3]}"}
    return imgs, facts


def shapes_caption(f):
    return f"the {f['colour']} {f['shape']} moves from the {f['start']} to the {f['end']}. the {f['others'][0]} and the {f['others'][1]} stay still."


def shapes_question(rng, f, cat):
    """(question, options, answer index) with 4 options"""
    if cat == "object":
        right, wrong = f"the {f['colour']} {f['shape']}", [f"the {o}" for o in f["others"]] + [f"the {f['absent']}"]
    elif cat in ("colour", "shape"):
        right = f[cat]
        wrong = [x for x in (COLOURS if cat == "colour" else SHAPES) if x != right]
    else:  # start/end: the other end of the path is always a distractor (you must know the direction)
        right, other = f[cat], f["end" if cat == "start" else "start"]
        rest = [p for p in PLACES if p not in (right, other)]
        wrong = [other] + [rest[i] for i in rng.permutation(len(rest))[:2]]
    opts = [right] + list(wrong)
    order = rng.permutation(4)
    opts = [opts[i] for i in order]
    return QUESTIONS[cat], opts, int(np.argmax(order == 0))


def shapes_wrong_caption(rng, f):
    """subtly wrong caption for DPO: one attribute of the mover swapped"""
    g = dict(f)
    what = ["colour", "shape", "start", "end"][rng.integers(0, 4)]
    pool = {"colour": list(COLOURS), "shape": SHAPES}.get(what, PLACES)
    g[what] = [x for x in pool if x not in (f[what], f["start"], f["end"])][rng.integers(0, len(pool) - 3)] if what in ("start", "end") \
        else [x for x in pool if x != f[what]][rng.integers(0, len(pool) - 1)]
    return shapes_caption(g)


def _jpg(img):
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


def train_tokenizer(texts, vocab_size=512):
    """tiny byte-level BPE with the ChatML special tokens at ids 0/1/2, as SmolLM2 has them"""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _shapes_text(rng):
    """text-only sample: language facts about the task's words, no frames needed"""
    k = rng.integers(0, 3)
    if k == 0:
        p = PLACES[rng.integers(0, 9)]
        opp = PLACES[8 - PLACES.index(p)]
        return f"what is the opposite of the {p}?", f"the {opp}"
    if k == 1:
        w = (list(COLOURS) + SHAPES)[rng.integers(0, 8)]
        return f"is {w} a colour or a shape?", "a colour" if w in COLOURS else "a shape"
    return "name the colours and the shapes.", ", ".join(COLOURS) + ". " + ", ".join(SHAPES) + "."


def make_shapes(out_dir, n_train=6000, n_val=500, n_dpo=1000, n_text=1000, image_size=64, frames=6,
                shard_size=1000, seed=0):
    """Write the shapes task: train-*.tar (json: caption for stage 1, user/assistant QA for stage 2,
    half of it in the lettered MCQ form), val-*.tar + mcq_val.json (held-out MCQs, one per val clip,
    categories in rotation; frames live in the val shards, read_mcq joins them by key),
    dpo-*.tar (stage 3 pairs), text-*.tar (text-only samples for text_ratio), tokenizer.json."""
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    cats, texts, mcqs = list(QUESTIONS), [SYSTEM_PROMPT, DEFAULT_USER, "system\n", "user\n", "assistant\n"], []

    def write_split(name, n, sid, make):
        for s0 in range(0, n, shard_size):
            shard = f"{name}-{s0 // shard_size:04d}.tar"
            samples = []
            for i in range(s0, min(n, s0 + shard_size)):
                rng = np.random.default_rng([seed, sid, i])
                key = f"{name}{i:06d}"
                files = make(rng, key, shard, i)
                texts.extend(v for k, v in files["json"].items() if k in ("user", "assistant", "caption", "chosen_assistant", "rejected_assistant"))
                samples.append((key, files))
            write_tar(os.path.join(out_dir, shard), samples)

    def clip_files(rng, meta):
        imgs, f = shapes_clip(rng, image_size, frames)
        files = {f"{t:03d}.jpg": _jpg(im) for t, im in enumerate(imgs)}
        files["json"] = dict(meta(f), frame_count=frames, source="shapes")
        return files

    def train(rng, key, shard, i):
        def meta(f):
            cat = cats[rng.integers(0, len(cats))]
            q, opts, ans = shapes_question(rng, f, cat)
            r = rng.random()
            if r < 0.25:  # the caption as a stage-2 answer too, so one run learns captions and QA
                q, a, cat = DEFAULT_USER, shapes_caption(f), "caption"
            elif r < 0.625:
                q, a = format_mcq(q, opts), f"{'ABCD'[ans]}. {opts[ans]}"
            else:
                a = opts[ans]
            return {"caption": shapes_caption(f), "user": q, "assistant": a, "category": cat}
        return clip_files(rng, meta)

    def val(rng, key, shard, i):
        def meta(f):
            cat = cats[i % len(cats)]
            q, opts, ans = shapes_question(rng, f, cat)
            mcqs.append({"key": key, "shard": shard, "question": q, "options": opts, "answer": ans, "category": cat})
            return {"caption": shapes_caption(f), "user": format_mcq(q, opts), "assistant": f"{'ABCD'[ans]}. {opts[ans]}", "category": cat}
        return clip_files(rng, meta)

    def dpo(rng, key, shard, i):
        return clip_files(rng, lambda f: {"user": DEFAULT_USER, "chosen_assistant": shapes_caption(f),
                                          "rejected_assistant": shapes_wrong_caption(rng, f)})

    def text(rng, key, shard, i):
        q, a = _shapes_text(rng)
        return {"json": {"user": q, "assistant": a, "source": "shapes-text"}}

    write_split("train", n_train, 0, train)
    write_split("val", n_val, 1, val)
    write_split("dpo", n_dpo, 2, dpo)
    write_split("text", n_text, 3, text)
    with open(os.path.join(out_dir, "mcq_val.json"), "w") as fh:
        json.dump(mcqs, fh, indent=0)
    train_tokenizer(texts).save(os.path.join(out_dir, "tokenizer.json"))
    args = dict(n_train=n_train, n_val=n_val, n_dpo=n_dpo, n_text=n_text, image_size=image_size, frames=frames, shard_size=shard_size, seed=seed)
    with open(os.path.join(out_dir, "shapes.json"), "w") as fh:  # written last: marks a complete dataset
        json.dump(args, fh)
    return {"seconds": time.time() - t0, **args}


def ensure_shapes(out_dir, **kw):
    """generate the shapes task unless out_dir already holds one made with the same arguments"""
    marker = os.path.join(out_dir, "shapes.json")
    if os.path.exists(marker) and all(json.load(open(marker)).get(k) == v for k, v in kw.items()):
        return out_dir
    print(f"data.py: generating the shapes task in {out_dir}", file=sys.stderr)
    make_shapes(out_dir, **kw)
    return out_dir

