"""
ScienceQA's image questions, in either release: the official one (problems.json + images/<split>/
<pid>/image.png) or Hugging Face's (derek-thomas/ScienceQA: parquet tables per split, each image a
struct holding its bytes).

    python bench.py --task=scienceqa --data_dir=ScienceQA --split=test
"""
import glob
import os

from tasks.common import image_or_path, mcq_record, media_finder, read_rows, table_files

# the official release names its splits train / val / test (and mini*); Hugging Face's validation
ALIASES = {"val": "validation", "validation": "val", "minival": "validation"}
SPLITS = {"train", "val", "validation", "test", "minitrain", "minival", "minitest"}


def table_split(path, row):
    """The split a row belongs to: its `split` field, else its table's file name (test-0000.parquet,
    validation.json), else None (not said)."""
    if row.get("split"):
        return row["split"]
    stem = os.path.basename(path).split(".")[0].split("-")[0].lower()
    return stem if stem in SPLITS else None


def read(data_dir, split="test"):
    """The image questions of `split` ({question, choices, answer (index), hint, image, subject});
    category = the subject. A split that matches no question is an error, never a score of 0."""
    official = glob.glob(os.path.join(data_dir, "**", "problems.json"), recursive=True)
    sources = [(p, read_rows(p)) for p in official]
    sources = sources or table_files(data_dir, ["question", "choices", "answer"])
    wanted = {split, ALIASES.get(split, split)}
    locate, records, seen = media_finder(data_dir), [], set()
    for path, rows in sources:
        root, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
        for j, row in enumerate(rows):
            found = table_split(path, row)
            seen.add(found)
            if not row.get("image") or found not in wanted | {None}:
                continue
            key = row["_key"] if official else f"{stem}/{row.get('id', j)}"  # unique over tables
            hint = (row.get("hint") or "").strip()
            question = (f"Context: {hint}\n" if hint else "") + row["question"]
            mcq = {"question": question, "options": list(row["choices"]), "answer": row["answer"]}
            rec = mcq_record(mcq, f"{path}: {key}", row.get("subject", "all")) | {"id": key}
            image = f"images/{found}/{key}/{row['image']}" if official else row["image"]
            records.append(image_or_path(rec, image, locate, root))
    if not records:
        raise ValueError(f"tasks/scienceqa.py: no image question of split {split!r} under "
                         f"{data_dir} (splits there: {sorted(s for s in seen if s)}): set --split")
    return records
