"""
MCQs in tar shards of the research layout (data.py section 3): a `user` that ends with option lines
"X. ...", an `assistant` that starts with the letter.

    python bench.py --task=shards --data_dir=data/val
"""
import glob
import os
import re
from functools import partial

from data import IMAGE_FRAMES, ShardDataset, SkipSample, read_tar, record_text
from tasks.common import LETTERS


def read(data_dir, tok, max_frames=64, image_size=224):
    """MCQs from tar shards (a dir of *.tar*, or a glob): `user` ends with option lines "X. ...",
    `assistant` starts with the letter. Other records are left out."""
    pattern = os.path.join(data_dir, "*.tar*") if os.path.isdir(data_dir) else data_dir
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"tasks/shards.py: no *.tar shards in {data_dir}")
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

