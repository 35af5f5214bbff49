"""
LLaVA-style annotations (or a folder of videos with {stem}.txt captions) -> research-layout tar shards that
train.py reads unchanged: {key}.000.jpg ... (frames at `fps`, image_size px, at most max_frames) or {key}.jpg
(an image) + {key}.json (user / assistant lists or DPO fields, source, frame_count).

    python -m tools.write_shards --annotations='llava/*.json' --media_root=llava --out_dir=shards --num_proc=8
    python -m tools.write_shards --videos=clips --source=openvid --out_dir=shards

Shard j holds the rows of unit j (tasks.llava.units with block = shard_size), so training on the shards with
seed s gives the samples, in the order, of training on the annotations with --annotation_block=shard_size.
Each shard is written under a temporary name and renamed when complete: a killed run restarted with the same
arguments skips the finished shards and redoes the rest. Bad rows are named, counted and left out.
"""
import io
import json
import os
import sys
from collections import Counter
from multiprocessing import Pool

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from tasks import llava  # noqa: E402

annotations = ''  # LLaVA-style .json / .jsonl globs, comma-separated
videos = ''  # or: a folder of videos (nested folders too), each with an optional {stem}.txt caption
source = ''  # the json 'source' of caption videos: picks their question (data.SOURCE_PROMPTS)
media_root = ''  # where the annotations' media paths start ('': each file's folder)
out_dir = 'shards'
prefix = 'train'  # shard names: {prefix}-000000.tar, ...
shard_size = 1000  # rows per shard
num_proc = 1
fps = 1.0  # video frames per second, as the research shards
max_frames = 64
image_size = 224
quality = 90  # jpg
if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(data.__file__), 'configurator.py')).read())


def caption_annotations(folder, src):
    """A folder of videos -> the annotation rows of its captions (a caption answers the source's prompt)."""
    rows = []
    for base, _, names in sorted(os.walk(folder)):
        for name in sorted(names, key=data.natural_key):
            stem, ext = os.path.splitext(name)
            if ext[1:].lower() in data.VIDEO_EXTS:
                txt = os.path.join(base, stem + ".txt")
                caption = open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else ""
                rows.append({"id": stem, "video": os.path.relpath(os.path.join(base, name), folder),
                             "source": src, "conversations": [{"from": "gpt", "value": caption}]})
    return rows


def jpg(frame):
    """uint8 [S,S,3] -> jpg bytes"""
    out = io.BytesIO()
    Image.fromarray(frame).save(out, "JPEG", quality=quality)
    return out.getvalue()


def shard_sample(rec, root, counter):
    """An annotation record -> (key, {ext: payload}) in the research layout; raises data.SkipSample."""
    rec = llava.to_record(rec, root, max_frames, counter)
    files, where = rec["files"], f"{rec['shard']}:{rec['key']}"
    meta = json.loads(files.pop("json"))
    if names := data.frame_files(files):  # frames (a folder or a list of images)
        frames = [data.read_image(io.BytesIO(files[e]), image_size, f"{where}.{e}") for e in names]
    elif video := next((e for e in data.VIDEO_EXTS if e in files), None):
        frames = list(data.video_frames(io.BytesIO(files[video]), image_size, max_frames, fps, name=where))
    elif image := next((e for e in data.IMAGE_EXTS if e in files), None):
        return rec["key"], {"jpg": jpg(data.read_image(io.BytesIO(files[image]), image_size, where)),
                            "json": meta}
    else:
        return rec["key"], {"json": meta}  # text-only
    out = {f"{t:03d}.jpg": jpg(f) for t, f in enumerate(frames)}
    return rec["key"], out | {"json": meta | {"frame_count": len(frames)}}


def write_shard(job):
    """Shard `index` from `unit`, unless it is already there; -> (index, skip counts)."""
    index, unit, root = job
    path = os.path.join(out_dir, f"{prefix}-{index:06d}.tar")
    counter = Counter()
    if os.path.exists(path):
        return index, counter
    samples = []
    for rec in llava.read_unit(unit, shard_size):
        try:
            samples.append(shard_sample(rec, root, counter))
        except data.SkipSample as e:
            data.count_skip(counter, e.reason, str(e))
        except Exception as e:  # a row no rule foresaw is named and counted too, never the end of the run
            data.count_skip(counter, "bad_sample", f"{rec['shard']}:{rec['key']}: {type(e).__name__}: {e}")
    data.write_tar(path + ".tmp", samples)
    os.replace(path + ".tmp", path)  # atomic: a shard under its final name is complete
    return index, counter


def main():
    os.makedirs(out_dir, exist_ok=True)
    if videos:  # the captions as an annotation file next to the shards, then the one path below
        files, root = [os.path.join(out_dir, f"{prefix}-captions.jsonl")], videos
        with open(files[0], "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in caption_annotations(videos, source))
    elif annotations:
        files, root = data.expand_globs(annotations.split(",")), media_root
    else:
        sys.exit("tools/write_shards.py: set --annotations=GLOBS or --videos=FOLDER")
    skips = Counter()
    units = [u for f in files for u in llava.units(f, shard_size, skips)]
    jobs = [(i, u, root or os.path.dirname(u[0])) for i, u in enumerate(units)]
    settings = {k: globals()[k] for k in ("out_dir", "prefix", "shard_size", "fps", "max_frames", "image_size",
                                          "quality")}  # this run's keys, for processes that start afresh
    with Pool(num_proc, _configure, (settings,)) if num_proc > 1 else _Inline() as pool:
        for _, counter in tqdm(pool.imap_unordered(write_shard, jobs), total=len(jobs), desc="shards"):
            skips += counter
    print(f"write_shards: {len(jobs)} shards in {out_dir}; rows skipped: {dict(skips) or 'none'}")
    return skips


def _configure(settings):
    globals().update(settings)


class _Inline:
    """num_proc=1: the same loop in this process"""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)


if __name__ == '__main__':
    main()
