"""
POPE (object hallucination: yes/no questions about COCO images), the official files.

    python bench.py --task=pope --data_dir=POPE
"""
import os

from tasks.common import image_or_path, media_finder, table_files


def read(data_dir):
    """POPE: the official files (coco_pope_random.json, ...: JSON lines {question_id, image, text,
    label yes|no}) + the COCO images. A. yes / B. no; category = the file (coco_random, ...)."""
    locate, records = media_finder(data_dir), []
    for path, rows in table_files(data_dir, ["text|question", "label|answer", "image"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        for j, row in enumerate(rows):
            label = str(row.get("label", row.get("answer"))).strip().lower()
            rec = {"id": f"{stem}/{row.get('question_id', j)}",
                   "question": row.get("text") or row["question"],
                   "options": ["yes", "no"], "answer": 0 if label == "yes" else 1,
                   "category": row.get("category") or stem.replace("_pope", "")}
            records.append(image_or_path(rec, row["image"], locate, os.path.dirname(path)))
    return records

