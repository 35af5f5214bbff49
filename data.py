"""From files to batches:
  1. tokenizer, ChatML template, per-stage loss masks
  2. media: images (Pillow) and videos (PyAV, frames picked by presentation time), shown upright
  3. tar shards ("the research layout", as the original fVLM code wrote them): the common record
     every source becomes (tasks/llava.py turns LLaVA-style annotation rows into it)
  4. ShardDataset (split over readers, seeded shuffle, text mixing), collate, the resumable Loader
The synthetic shapes task and every benchmark's layout live in tasks/."""
import bisect
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain, groupby, islice

import av
import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from perf.readahead import read_ahead
from tasks import llava, pretokenized

# always explicit: SmolLM2's default one injects a persona
SYSTEM_PROMPT = "You are a helpful AI assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 exactly as SmolLM2
PAD_ID = 2  # <|im_end|> doubles as pad; padding is masked out via loss_mask, never via ignore==pad
MAX_LEN = {1: 512, 2: 1024, 3: 1024}  # text tokens per sample, by stage
DEFAULT_USER = "Describe this video."  # sample.py's default question
# the question of a caption with no `user`, by `source`, as the original fVLM code asked it
SOURCE_PROMPTS = {"openvid": "Write a brief caption for this video.",
                  "webvid": "What would be the WebVid caption for this video?",
                  "vript": "Provide a detailed narration of what happens in this video.",
                  "sharegpt4video": "Describe what happens in this video in detail."}
FALLBACK_PROMPT = "Describe this."  # any other source
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, as DINOv2 was trained
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIDEO_EXTS = ("mp4", "webm", "mkv", "gif", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_FRAMES = 8  # an image becomes this many frames (config/stage1_135m.py sets 1)

# -----------------------------------------------------------------------------
# bad input: skipped, warned about once (stderr) and counted (loader.skipped()); never fatal

_warned = set()


class SkipSample(ValueError):  # a ValueError, so callers outside the dataset just see a bad file
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def count_skip(counter, reason, msg):
    if counter is not None:  # a ShardDataset's, say; a one-off read only warns
        counter[reason] += 1
    if msg not in _warned:  # once per path and reason: a million bad files must not flood the log
        _warned.add(msg)
        print(f"data.py: skipping {msg}", file=sys.stderr)


def expand_globs(globs):
    paths = []
    for pattern in [globs] if isinstance(globs, str) else globs:
        if not (hits := sorted(globlib.glob(pattern))):
            raise FileNotFoundError(f"data.py: glob '{pattern}' matched no files; check the path "
                                    f"(python train.py makes data/shapes)")
        paths += hits
    return paths


# -----------------------------------------------------------------------------
# 1. tokenizer and chat template


def load_tokenizer(path):  # a SmolLM2 dir or a tokenizer.json
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.py: {path} not found; pass a SmolLM2 dir or a "
                                f"tokenizer.json (make_shapes writes one)")
    tok = Tokenizer.from_file(path)
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"{path}: {s} must have id {i} (ChatML ids as in SmolLM2), "
                             f"got {tok.token_to_id(s)}")
    return tok


def encode_chat(tok, messages, stage, max_len=None):
    """ChatML with the system prompt -> (input_ids, loss_mask, truncated, question_tokens: those up
    to the first user turn's end). Targets: stage 1 all; 2-3 assistant content + <|im_end|>"""
    text, spans, question_end_char = "", [], None
    for m in [{"role": "system", "content": SYSTEM_PROMPT}] + list(messages):
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"] + "<|im_end|>")))
        text += m["content"] + "<|im_end|>\n"
        if m["role"] == "user" and question_end_char is None:
            question_end_char = len(text)
    enc = tok.encode(text, add_special_tokens=False)  # all at once: ids as HF apply_chat_template
    mask = [int(stage == 1 or any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
    max_len = max_len or MAX_LEN[stage]
    question_tokens = sum(b <= (question_end_char or 0) for _, b in enc.offsets)
    return enc.ids[:max_len], mask[:max_len], len(enc.ids) > max_len, min(question_tokens, max_len)


def encode_question(tok, user):
    """What the question-first layout puts before the frames."""
    text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    return tok.encode(text, add_special_tokens=False).ids


def encode_reply_start(tok):
    return tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids


def encode_prompt(tok, user):
    return encode_question(tok, user) + encode_reply_start(tok)


def prompt_parts(tok, user, layout):
    """(question, prompt) ids of a user turn: what goes before the frames and what after"""
    if layout == "question_first":
        return encode_question(tok, user), encode_reply_start(tok)
    return [], encode_prompt(tok, user)


def encode_answer(tok, text):
    """Assistant content + <|im_end|>: encode_chat's ids = encode_prompt + this + '\\n'"""
    return tok.encode(text, add_special_tokens=False).ids + [PAD_ID]


def format_mcq(question, options):
    return question + "\n" + "\n".join(f"{'ABCDEFGH'[i]}. {o}" for i, o in enumerate(options))


# -----------------------------------------------------------------------------
# 2. media


def normalize(frames):
    """uint8 [T,H,W,3] numpy -> ImageNet-normalised float32 [T,3,H,W]"""
    channels_first = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return (channels_first.float().div_(255) - MEAN) / STD


def short_side_to(w, h, size):
    return max(size, round(w * (size / min(w, h)))), max(size, round(h * (size / min(w, h))))


def centre_crop(a, size):
    """[H,W,3] -> [size,size,3]"""
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def read_image(src, size, name=None):
    """An image file or file-like -> uint8 [size,size,3]: upright (EXIF), resized, centre crop"""
    try:
        img = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
    except Exception as e:
        raise SkipSample("bad_image",
                         f"{name or src}: unreadable image ({type(e).__name__}: {e})") from None
    return centre_crop(np.array(img.resize(short_side_to(*img.size, size), Image.BICUBIC)), size)


def load_image(src, image_size, replicate=1, name=None):
    """An image -> normalised [replicate,3,S,S]."""
    return normalize(read_image(src, image_size, name)[None]).repeat(replicate, 1, 1, 1)


def uniform_indices(n, k):
    """k indices spread uniformly over n frames (centres of k equal segments)"""
    return [int((i + 0.5) * n / min(k, n)) for i in range(min(k, n))]


def natural_key(name):
    """sort key: 'frame_2' before 'frame_10'"""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def image_files(folder):
    names = [n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    return sorted(names, key=natural_key)


def _duration(container, stream):
    """Seconds of video after the stream's start: from the headers, else the packets' times."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    tb = stream.time_base
    ends = [float((p.pts + (p.duration or 0)) * tb)
            for p in container.demux(stream) if p.pts is not None]
    container.seek(0)
    return max(ends, default=0.0) - float((stream.start_time or 0) * tb)


def _upright_rgb(frame, size, scaler):
    """A decoded frame -> uint8 [size,size,3] as read_image, upright as its display matrix says.
    scaler: this video's own, one thread: a forked DataLoader worker hangs in PyAV's shared one"""
    quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, to upright
    w, h = short_side_to(frame.width, frame.height, size)  # as stored: a turn keeps the short side
    try:
        rgb = scaler.reformat(frame, w, h, "rgb24", threads=1)
    except TypeError:  # PyAV < 17 has no `threads`: its scaler is never threaded
        rgb = scaler.reformat(frame, w, h, "rgb24")
    return centre_crop(np.rot90(rgb.to_ndarray(), quarter_turns), size)


def _frame_times(container, stream, max_frames, fps, start, end):
    """(origin, t0, t1, the times to pick: centres of k equal slices of [t0, t1] after origin)"""
    origin = float((stream.start_time or 0) * stream.time_base)
    duration = _duration(container, stream)
    t0 = min(max(start or 0.0, 0.0), duration)
    t1 = min(end, duration) if end is not None and end > t0 else duration
    k = max_frames if fps is None else max(1, min(max_frames, int((t1 - t0) * fps)))
    return origin, t0, t1, [origin + t0 + (i + 0.5) * (t1 - t0) / k for i in range(k)]


@contextmanager
def _opened(src, name, max_frames, fps, start, end):
    """(container, video stream, picks = _frame_times); a file PyAV cannot read -> SkipSample"""
    if max_frames < 1:  # a caller's mistake, not the file's: said before the file is opened
        raise ValueError(f"data.py: max_frames={max_frames}: a video needs at least 1 frame "
                         f"(no cap: a large number, with fps)")
    try:
        with av.open(src) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: see docs/LOG.md for decode-all vs seeking
            yield container, stream, _frame_times(container, stream, max_frames, fps, start, end)
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        if isinstance(e, SkipSample):
            raise
        raise SkipSample("bad_video",
                         f"{name}: cannot decode video ({type(e).__name__}: {e})") from None


def video_length(src, max_frames, fps=None, start=None, end=None, name=None):
    """(at most how many frames video_frames picks, the seconds they span), without decoding"""
    with _opened(src, name or str(src), max_frames, fps, start, end) as (_, _, (_, t0, t1, picks)):
        return len(picks), t1 - t0


def context_error(n_frames, seconds, text_tokens, max_seq_len, where):
    """None if n_frames + text_tokens fit max_seq_len, else a message saying how many frames do"""
    if n_frames + text_tokens <= max_seq_len:
        return None
    fit = max(0, max_seq_len - text_tokens)
    return (f"{where}: {n_frames} frames ({seconds:.0f} s of video) + {text_tokens} prompt and "
            f"answer tokens exceed the LLM's max_seq_len {max_seq_len}: {fit} frames fit, i.e. "
            f"--fps={fit / seconds:.3g} for all {seconds:.0f} s, or --max_frames={fit}")


def _keyframe_times(container, stream):
    """The sorted times of the stream's keyframes, from packets; [] (no seeking) if one has none"""
    pts = [packet.pts for packet in container.demux(stream) if packet.is_keyframe]
    container.seek(0)
    return [] if None in pts else sorted(float(t * stream.time_base) for t in pts)


def video_frames(src, image_size, max_frames, fps=None, start=None, end=None, name=None,
                 progress=False):
    """Yields uint8 frames [S,S,3]: the one on screen at each time of _frame_times (once if picked
    twice). Seeks to the keyframe before a pick ahead of the last decoded frame: skips whole GOPs"""
    name = name or str(src)
    with _opened(src, name, max_frames, fps, start, end) as (container, stream, picks):
        origin, t0, t1, targets = picks
        keyframes = _keyframe_times(container, stream)
        scaler, k = av.video.reformatter.VideoReformatter(), len(targets)
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        bar = tqdm(total=round(t1 - t0), unit="s", desc="video", disable=not progress,
                   dynamic_ncols=True)
        shown, last, picked = None, None, 0  # the frame on screen, the last yielded, targets done
        decoded, i, position = None, 0, float("-inf")  # position: the last decoded frame's time
        while picked < k:
            before = bisect.bisect_right(keyframes, targets[picked]) - 1
            if before >= 0 and keyframes[before] > position:  # seeking skips a GOP or more
                try:
                    container.seek(round(keyframes[before] / stream.time_base), stream=stream)
                    decoded, shown, position = None, None, keyframes[before]
                except av.error.FFmpegError:  # a file that cannot seek: decode every frame
                    keyframes = []
            if decoded is None:
                decoded = container.decode(stream)
            frame = next(decoded, None)
            if frame is None:
                break
            t = frame.time if frame.time is not None else origin + i / rate
            i, position = i + 1, max(position, t)
            while picked < k and targets[picked] < t:
                if (shown or frame) is not last:
                    last = shown or frame
                    yield _upright_rgb(last, image_size, scaler)
                picked += 1
                bar.update(min(round(t - origin - t0), bar.total) - bar.n)
            shown = frame
        bar.close()
        if picked == k:
            return
        if shown is None:
            raise ValueError("no video frames")
        end_time = shown.time if shown.time is not None else origin + t1
        late = sum(t > end_time + 2 / rate for t in targets[picked:])
        if late > max(1, k // 10):  # headers can be a frame off; more than that: the file was cut
            raise SkipSample("short_video",
                             f"{name}: video stops at {end_time - origin:.2f} s but its header "
                             f"says {t1:.2f} s ({late} of {k} picked times are past the end)")
        if shown is not last:
            yield _upright_rgb(shown, image_size, scaler)


def video_chunks(src, image_size, max_frames, fps=None, start=None, end=None, chunk=8,
                 device="cpu", progress=False):
    """video_frames as normalised chunks [<=chunk,3,S,S] on `device` for model.stream, read ahead"""
    frames = read_ahead(video_frames(src, image_size, max_frames, fps, start, end,
                                     progress=progress))
    while batch := list(islice(frames, chunk)):
        yield normalize(np.stack(batch)).to(device)


def load_video(src, image_size, max_frames, fps=None, start=None, end=None, name=None):
    """video_frames stacked and normalised -> [T,3,S,S]"""
    frames = video_frames(src, image_size, max_frames, fps, start, end, name)
    return normalize(np.stack(list(frames)))


# -----------------------------------------------------------------------------
# 3. tar shards: {key}.json (+ .txt) and frames {key}.000.jpg ..., an image {key}.jpg or a video


def write_tar(path, samples):
    """samples: iterable of (key, {ext: bytes|str|dict}); deterministic bytes (mtime 0)"""
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, payload in files.items():
                payload = json.dumps(payload) if isinstance(payload, dict) else payload
                payload = payload.encode() if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(payload), 0
                tf.addfile(info, io.BytesIO(payload))


def read_tar(path, counter=None):
    """A tar, streamed -> records {key, shard, files {ext: bytes}}; all after damage: one skip"""
    def members(tf):  # (key, ext, bytes): a record is yielded once the next key is read intact
        for m in tf:
            if m.isfile():
                folder, base = os.path.split(m.name)
                key, _, ext = base.partition(".")  # keys have no dots: k.000.jpg -> k, 000.jpg
                payload = tf.extractfile(m).read()
                if len(payload) != m.size:
                    raise EOFError("unexpected end of data")
                yield os.path.join(folder, key), ext.lower(), payload
        # tarfile ends quietly when the stream stops in a header; an intact tar ends with zeros
        if getattr(tf.fileobj, "comptype", "") == "tar" and tf.offset + 512 > os.path.getsize(path):
            raise EOFError("no end-of-archive marker (file cut short)")
    try:
        with tarfile.open(path, "r|*") as tf:
            for key, group in groupby(members(tf), key=lambda m: m[0]):
                yield {"key": key, "shard": path, "files": {ext: b for _, ext, b in group}}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        count_skip(counter, "bad_tar", f"{path}: truncated or corrupt tar "
                                       f"({type(e).__name__}: {e}); rest of shard dropped")


def read_source(path, counter=None):
    """A tar shard, or a plain video/image file (+ sidecar {stem}.json / .txt) as one record"""
    if ".tar" in os.path.basename(path):
        return read_tar(path, counter)
    stem, ext = os.path.splitext(path)
    exts = [e for e in (ext[1:], "json", "txt") if os.path.exists(f"{stem}.{e}")]
    files = {e.lower(): open(f"{stem}.{e}", "rb").read() for e in exts}
    return [{"key": os.path.basename(stem), "shard": os.path.dirname(path), "files": files}]


def frame_files(files):
    """A record's frame images ({key}.000.jpg; a lone {key}.jpg is an image), in natural order"""
    frame_names = (e for e in files if "." in e and e.rsplit(".", 1)[1] in IMAGE_EXTS)
    return sorted(frame_names, key=natural_key)


def record_frames(files, names, image_size, where):
    """The named image files of a record -> normalised frames [T,3,S,S]"""
    images = [read_image(io.BytesIO(files[e]), image_size, f"{where}.{e}") for e in names]
    return normalize(np.stack(images))


def record_text(record):
    """A record's json ({} when it has none) and its .txt caption (or None)."""
    files, where = record["files"], f"{record['shard']}:{record['key']}"
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except ValueError as e:
        raise SkipSample("bad_json", f"{where}.json: bad json ({e})") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json",
                         f"{where}.json: bad json (a {type(meta).__name__}, not an object)")
    return meta, (files["txt"].decode("utf-8", "replace").strip() if "txt" in files else None)


def turns(user, answer, where):
    """A json's `user` / `assistant` (strings, or equal-length lists) -> lists; no user -> None"""
    if not isinstance(answer, list):
        users, answer = [user], [answer]
    else:
        users = [None] * len(answer) if user in (None, "") else user
    if not (isinstance(users, list) and len(users) == len(answer)
            and all(isinstance(a, str) and a for a in answer)
            and all(u is None or isinstance(u, str) for u in users)):
        raise SkipSample("bad_field", f"{where}.json: 'user' and 'assistant' must be strings, or "
                         f"lists of strings of one length (got {type(user).__name__} and "
                         f"{type(answer).__name__})")
    return [u or None for u in users], answer


# -----------------------------------------------------------------------------
# 4. the dataset, its collate and its resumable loader


def seeded(*keys):
    """How this file draws random numbers: seeded by keys (seed, epoch, reader...), the same in
    every process, so a resumed run replays any draw from its keys alone."""
    return random.Random(repr(keys))  # a str seed goes through sha512: no per-process hash salt


def shuffled(items, rng, size):
    """A shuffle buffer of `size` items over a stream"""
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) > size:
            i = rng.randrange(size)
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


@dataclass
class Cursor:
    """Where a reader is in one stream of shards"""
    epoch: int = 0
    consumed: int = 0


@dataclass
class ReaderState:
    """What a reader needs to resume exactly (the text-or-main draw n depends on n alone)"""
    main: Cursor = field(default_factory=Cursor)
    text: Cursor = field(default_factory=Cursor)
    drawn: int = 0


class ShardDataset(IterableDataset):
    """Streams samples {key, rows: token rows {question, ids, mask}, frames [T,3,S,S]} from tar
    shards, plain files or annotation files (shared out by blocks of annotation_block rows).
    Split: each epoch the shards are shuffled by (seed, epoch); shard i goes to reader i % readers,
    reader = rank * num_workers + worker. Text mixing: each draw is the next text record with
    probability text_ratio (all text shards for every reader if fewer than the readers).
    Resume: a reader re-reads its epoch's records up to its ReaderState and drops them undecoded."""

    def __init__(self, globs, tok, stage, image_size=224, max_frames=64, replicate_image_frames=1,
                 text_ratio=0.0, seed=0, rank=0, world_size=1, text_globs=None, loop=True,
                 shuffle_buffer=1000, fps=None, max_len=None, prompts=None, layout="frames_first",
                 media_root="", annotation_block=1):
        self.skipped = Counter()  # this process's: every batch carries them to the main process
        self.media_root, self.annotation_block = media_root, annotation_block
        self.shards = self.units(expand_globs(globs))
        self.text_shards = self.units(expand_globs(text_globs)) if text_globs else []
        self.tok, self.stage, self.max_len = tok, stage, max_len or MAX_LEN[stage]
        self.image_size, self.max_frames, self.fps = image_size, max_frames, fps
        self.replicate, self.text_ratio, self.seed = replicate_image_frames, text_ratio, seed
        self.rank, self.world_size = rank, world_size
        self.loop, self.shuffle_buffer = loop, shuffle_buffer
        self.question_first = layout == "question_first"  # the model's layout decides the text rows
        self.prompts = SOURCE_PROMPTS | {"": FALLBACK_PROMPT} | (prompts or {})
        self.batch_size, self.max_batch_frames = None, None
        self.resume, self.next_reader = {}, 0  # set by Loader.load_state_dict

    def units(self, paths):
        """What the readers share out: shards, plain files, an annotation file's row blocks"""
        return [u for p in paths for u in (llava.units(p, self.annotation_block, self.skipped)
                                           if llava.is_annotation(p) else [p])]

    def read_unit(self, unit):
        if isinstance(unit, tuple):
            return llava.read_unit(unit, self.annotation_block)
        return read_source(unit, self.skipped)

    def epoch_units(self, units, reader, readers, epoch, is_text):
        """A reader's units of an epoch: one (seed, epoch) shuffle for all readers, dealt out"""
        order = list(units)
        seeded(self.seed, "shards", is_text, epoch).shuffle(order)
        return order if is_text and len(order) < readers else order[reader::readers]

    def records(self, shards, reader, readers, cursor, is_text):
        """One reader's undecoded records, advancing `cursor`; those it had consumed are dropped"""
        while True:
            mine = self.epoch_units(shards, reader, readers, cursor.epoch, is_text)
            stream = (rec for unit in mine for rec in self.read_unit(unit))
            rng, seen = seeded(self.seed, "buffer", is_text, cursor.epoch, reader), 0
            for seen, rec in enumerate(shuffled(stream, rng, self.shuffle_buffer), 1):
                if seen > cursor.consumed:
                    cursor.consumed += 1
                    yield rec
            if not self.loop or seen == 0:
                return  # seen == 0: nothing readable, stop instead of spinning forever
            cursor.epoch, cursor.consumed = cursor.epoch + 1, 0

    def samples(self, reader, readers):
        """(decoded sample, reader state after it) of one reader; bad records counted, skipped.
        Raises once every main unit was read in vain since the last usable one: no endless skips"""
        state = self.resume.get(reader, ReaderState())
        main = self.records(self.shards, reader, readers, state.main, False)
        # a generator: the text shards are read only if mixing draws from them
        text = self.records(self.text_shards, reader, readers, state.text, True)
        mixing = self.text_shards and self.text_ratio > 0
        # main units read in vain since the last usable main sample; unread: the next epoch to add
        barren, unread = set(), state.main.epoch + 1
        n_units = len(set(self.shards))
        while True:
            take_text = mixing and (seeded(self.seed, "mix", reader, state.drawn).random()
                                    < self.text_ratio)
            rec = next(text, None) if take_text else None
            if from_main := rec is None:  # a main draw, or the text shards have run out
                rec = next(main, None)
            if rec is None:
                return
            state.drawn += 1
            try:
                yield self.to_sample(rec), asdict(state)
                if from_main:
                    barren, unread = set(), state.main.epoch + 1
            except SkipSample as e:
                count_skip(self.skipped, e.reason, str(e))
            except Exception as e:
                # a sample no rule foresaw still never kills the run: named and counted
                count_skip(self.skipped, "bad_sample",
                           f"{rec['shard']}:{rec['key']}: {type(e).__name__}: {e}")
            for epoch in range(unread, state.main.epoch):  # finished
                barren.update(self.epoch_units(self.shards, reader, readers, epoch, False))
            unread = max(unread, state.main.epoch)
            if len(barren) == n_units:
                raise ValueError(f"data.py: reader {reader} read every shard of the training data "
                                 f"in full and none gave a usable sample (skipped: "
                                 f"{dict(self.skipped)}); the skips above say why: fix the data "
                                 f"or the config")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # worker 0 runs the reader whose turn was next: a resumed DataLoader's round-robin goes on
        reader = self.rank * workers + (worker + self.next_reader) % workers
        samples = self.samples(reader, self.world_size * workers)
        return (s for s, _ in samples) if self.batch_size is None else self.batches(samples, reader)

    def batches(self, samples, reader):
        """Collated batches, each with the reader's state after its last sample and its skip counts
        (a batch closes when the next sample arrives, so they include the skips after it)."""
        batch, state = [], None
        for sample, next_state in chain(samples, [(None, None)]):
            frames = sum(len(s["frames"]) for s in batch) + (len(sample["frames"]) if sample else 0)
            full = (len(batch) == self.batch_size
                    or (self.max_batch_frames and frames > self.max_batch_frames))
            if batch and (sample is None or full):
                progress = {"reader": reader, "state": state, "skipped": dict(self.skipped)}
                yield collate(batch) | {"progress": progress}
                batch = []
            if sample is not None:
                batch.append(sample)
            state = next_state

    def to_sample(self, rec):
        if "row" in rec:  # an annotation row: its json and media now
            rec = llava.to_record(rec, self.media_root, self.max_frames, self.skipped)
        where = f"{rec['shard']}:{rec['key']}"
        meta, txt = record_text(rec)
        has_media = any(e not in ("json", "txt") for e in rec["files"])
        rows = self.text_rows(meta, txt, has_media, where)  # text first: cheap to reject
        return {"key": rec["key"], "rows": rows, "frames": self.frames(rec["files"], meta, where)}

    def question_for(self, meta):
        """the question of a sample with no `user`, by its source"""
        return self.prompts.get(str(meta.get("source", "")).lower(), self.prompts[""])

    def chat_row(self, users, answers, where):
        """user / assistant lists -> one row {question (what goes before the frames), ids, mask}"""
        chat = [{"role": r, "content": c} for u, a in zip(users, answers)
                for r, c in (("user", u), ("assistant", a))]
        ids, mask, truncated, split = encode_chat(self.tok, chat, self.stage, self.max_len)
        if truncated:
            self.skipped["truncated (kept)"] += 1
        split = split if self.question_first else 0  # how many tokens go before the frames
        if not any(mask[split:]):
            raise SkipSample("no_targets", f"{where}: no target tokens left after truncation to "
                                           f"{self.max_len}")
        return {"question": ids[:split], "ids": ids[split:], "mask": mask[split:]}

    def text_rows(self, meta, txt, has_media, where):
        """The text rows of a record's json (section 3's layout): one, or question first one per
        question (each steers its own glimpses); stage 3: the chosen row, then the rejected one."""
        if self.stage == 3:
            if need := [f for f in ("chosen_assistant", "rejected_assistant") if not meta.get(f)]:
                raise SkipSample("missing_field", f"{where}.json: DPO sample misses {need}")
            user = meta.get("user") or (self.question_for(meta) if has_media else None)
            return [self.chat_row(*turns(user, meta[f"{k}_assistant"], where), where)
                    for k in ("chosen", "rejected")]
        if "token_ids" in meta:
            return [pretokenized.row(meta, self, where)]
        # stage 1 prefers the caption, stage 2 the assistant answer, either falls back to the other.
        # `user` belongs to `assistant`: a caption next to one gets the source's question
        caption, assistant = meta.get("caption") or txt, meta.get("assistant")
        if assistant and not (self.stage == 1 and caption):
            answer, user = assistant, meta.get("user")
        else:
            answer, user = caption, None if assistant else meta.get("user")
        if not answer:
            raise SkipSample("missing_field", f"{where}.json: needs 'assistant' (or 'caption')")
        users, answers = turns(user, answer, where)
        if has_media:  # a sample with media and an answer is never dropped for lack of a question
            users = [u or self.question_for(meta) for u in users]
        if not all(users):
            raise SkipSample("missing_field",
                             f"{where}.json: a text-only sample needs a 'user' question")
        if self.question_first:
            return [self.chat_row([u], [a], where) for u, a in zip(users, answers)]
        return [self.chat_row(users, answers, where)]

    def frames(self, files, meta, where):
        """A record's frames [T,3,S,S]: its frame images, video, image (replicated), or none"""
        S = self.image_size
        if names := frame_files(files):
            if isinstance(meta.get("frame_count"), int) and len(names) < meta["frame_count"]:
                raise SkipSample("short_video", f"{where}: {len(names)} frame files but "
                                                f"frame_count {meta['frame_count']}")
            picked = [names[i] for i in uniform_indices(len(names), self.max_frames)]
            return record_frames(files, picked, S, where)
        for e in VIDEO_EXTS:
            if e in files:
                return load_video(io.BytesIO(files[e]), S, self.max_frames, self.fps,
                                  name=f"{where}.{e}")
        for e in IMAGE_EXTS:
            if e in files:
                return load_image(io.BytesIO(files[e]), S, self.replicate, name=f"{where}.{e}")
        return torch.zeros(0, 3, S, S)


def collate(samples):
    """Samples -> a batch: frames [B,T,3,H,W] zero-padded, with frame_mask [B,T]; every sample's
    text rows, owner [R] (each row's sample), input_ids / loss_mask [R,S] right-padded with PAD_ID
    (loss 0), and question first question_ids / question_valid [R,Pq], left-padded."""
    frames = pad_sequence([s["frames"] for s in samples], batch_first=True)
    lengths = torch.tensor([len(s["frames"]) for s in samples])
    rows = [(i, row) for i, s in enumerate(samples) for row in s["rows"]]
    S, Pq = max(len(r["ids"]) for _, r in rows), max(len(r["question"]) for _, r in rows)
    out = {"frames": frames, "frame_mask": torch.arange(frames.shape[1]) < lengths[:, None],
           "keys": [s["key"] for s in samples], "owner": torch.tensor([i for i, _ in rows]),
           "input_ids": torch.full((len(rows), S), PAD_ID),
           "loss_mask": torch.zeros(len(rows), S, dtype=torch.long)}
    if Pq:
        out["question_ids"] = torch.full((len(rows), Pq), PAD_ID)
        out["question_valid"] = torch.zeros(len(rows), Pq, dtype=torch.bool)
    for j, (_, r) in enumerate(rows):
        out["input_ids"][j, :len(r["ids"])] = torch.tensor(r["ids"])
        out["loss_mask"][j, :len(r["mask"])] = torch.tensor(r["mask"])
        if Pq and r["question"]:
            out["question_ids"][j, Pq - len(r["question"]):] = torch.tensor(r["question"])
            out["question_valid"][j, Pq - len(r["question"]):] = True
    return out


def row_keywords(batch):
    """The forward's keywords that say whose each text row is, and question_first's questions."""
    return {k: batch.get(k) for k in ("owner", "question_ids", "question_valid")}


class Loader(DataLoader):
    """A DataLoader that remembers how far the consumer got per reader, to resume at the next one"""

    def __init__(self, dataset, num_workers, **kw):
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         persistent_workers=False, **kw)
        # this rank's readers: one per worker process (or the main process), taken in turn
        self.n_readers, self.states, self.skip_counts = max(1, num_workers), {}, {}
        self.next_reader = 0  # which of this rank's readers (0 .. n_readers-1) gives the next batch

    def __iter__(self):
        self.next_reader = self.dataset.next_reader
        for batch in super().__iter__():
            progress = batch.pop("progress")
            reader = progress["reader"]  # global id: rank * n_readers + this rank's reader
            self.states[reader], self.skip_counts[reader] = progress["state"], progress["skipped"]
            self.next_reader = (reader + 1) % self.n_readers
            yield batch

    def skipped(self):
        """skip reasons summed over this rank's readers (log this)"""
        return sum((Counter(s) for s in self.skip_counts.values()), Counter())

    def state_dict(self):
        """Keyed by global reader id, so train.py may merge all ranks' dicts into one."""
        return {"readers": dict(self.states), "next_reader": {self.dataset.rank: self.next_reader},
                "num_workers": self.n_readers, "world_size": self.dataset.world_size}

    def load_state_dict(self, sd):
        # which reader reads which shard depends on both: another split re-reads or skips samples
        saved = (sd.get("num_workers"), sd.get("world_size"))
        now = (self.n_readers, self.dataset.world_size)
        if saved != now:
            raise ValueError(f"data.py: the checkpoint's data position was saved with "
                             f"num_workers={saved[0]} x world_size={saved[1]}, this run has "
                             f"{now[0]} x {now[1]}: resume with the same --num_workers and number "
                             f"of ranks (or start a new run from it with --init_from=DIR)")
        # checkpoints saved before 2026-12-06 name them "workers" and "next_worker"
        readers = sd["readers"] if "readers" in sd else sd["workers"]
        next_reader = sd["next_reader"] if "next_reader" in sd else sd["next_worker"]
        self.states = {int(r): s for r, s in readers.items()}
        self.dataset.resume = {r: ReaderState(Cursor(**s["main"]), Cursor(**s["text"]), s["drawn"])
                               for r, s in self.states.items()}
        next_reader_by_rank = {int(rank): r for rank, r in next_reader.items()}
        self.dataset.next_reader = next_reader_by_rank.get(self.dataset.rank, 0)


def make_loader(dataset, batch_size, num_workers=0, max_batch_frames=None, **kw):
    """Batches are built in the readers, to cap their frames. Log .skipped(); save .state_dict()"""
    readers = dataset.world_size * max(1, num_workers)
    if dataset.loop and len(dataset.shards) < readers:  # said here, in the main process
        n = len(dataset.shards) // dataset.world_size
        raise ValueError(f"data.py: {len(dataset.shards)} shards for {readers} readers (world_size "
                         f"x num_workers): every reader needs a shard of its own: use more shards, "
                         f"or {f'--num_workers={n}' if n else 'fewer ranks'}")
    dataset.batch_size, dataset.max_batch_frames = batch_size, max_batch_frames
    return Loader(dataset, num_workers, **kw)
