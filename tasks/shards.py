"""
MCQs in tar shards of the research layout (data.py section 3), tools/write_shards.py's too: each
turn whose `user` ends with option lines "X. ..." and whose `assistant` starts with the letter.

    python bench.py --task=shards --data_dir=data/val
"""
import glob
import os
import re
from functools import partial

from data import IMAGE_FRAMES, ShardDataset, SkipSample, read_tar, record_text, turns
from tasks.common import LETTERS


def read(data_dir, tok, max_frames=64, image_size=224):
    """MCQs from tar shards (a dir of *.tar*, or a glob), a record per lettered turn (lettered);
    other turns are left out."""
    pattern = os.path.join(data_dir, "*.tar*") if os.path.isdir(data_dir) else data_dir
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"tasks/shards.py: no *.tar shards in {data_dir}")
    ds = ShardDataset(shards, tok, stage=2, image_size=image_size, max_frames=max_frames,
                      replicate_image_frames=IMAGE_FRAMES, loop=False)
    records = []
    for shard in shards:
        for clip in read_tar(shard):
            where = f"{shard}:{clip['key']}"
            try:
                meta, _ = record_text(clip)
                users, answers = turns(meta.get("user"), meta.get("assistant"), where)
            except SkipSample:
                continue  # not a question with an answer
            category = meta.get("category", meta.get("source", "all"))
            frames = partial(ds.frames, clip["files"], meta, where)
            for i, (user, reply) in enumerate(zip(users, answers)):  # a turn: one MCQ or none
                mcq = lettered(user or "", reply)
                if mcq:
                    qid = where if len(users) == 1 else f"{where}#{i}"
                    records.append(dict(mcq, id=qid, category=category, load=frames))
    return records


def lettered(user, reply):
    """{question, options, answer} of a turn whose user text ends with option lines "A. ..." (or
    "(A) ...") and whose reply is the letter or starts with it; None for any other turn."""
    lines = user.split("\n")
    k = len(lines)  # lines[k:]: the options
    while k > 0 and re.match(r"^\(?[A-H][.)] ", lines[k - 1]):
        k -= 1
    options = [re.sub(r"^\(?[A-H][.)] ", "", line) for line in lines[k:]]
    m = re.match(r"^\(?([A-H])(?:[.):]|$)", reply.strip())  # "B", "B. cat", "(B)"
    answer = LETTERS.index(m.group(1)) if m else None
    if len(options) < 2 or answer is None or answer >= len(options):
        return None
    return {"question": "\n".join(lines[:k]), "options": options, "answer": answer}
