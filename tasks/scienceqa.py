"""
ScienceQA's image questions (the official release's problems.json + images/, or tables).

    python bench.py --task=scienceqa --data_dir=ScienceQA --split=test
"""
import glob
import os

from tasks.common import mcq_record, media_finder, read_rows, table_files


def read(data_dir, split="test"):
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

