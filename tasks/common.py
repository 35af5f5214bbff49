"""
What the benchmark readers share: MCQ records from tables as benchmarks publish them. A record is
{question, options [str], answer (index), category, id} + its media (see bench.evaluate_mcq); a
missing video or image is recorded as an error (counted wrong), never dropped.
"""
import glob
import io
import json
import os
import re

import torch

from data import (IMAGE_EXTS, IMAGE_FRAMES, VIDEO_EXTS, image_files, load_image, load_video,
                  uniform_indices)

LETTERS = "ABCDEFGH"


def media_finder(root):
    """locate(rec, "video" | "image", path, rel) -> rec with rec[key] = path if it exists, else a
    file named like `rel` (or its stem + a media extension) anywhere under root, as datasets get
    unpacked in many ways; else rec['error']."""
    by_name = {}  # a file or folder name, and its stem + ".*" -> the paths under root

    def locate(rec, key, path, rel):
        exts = VIDEO_EXTS if key == "video" else IMAGE_EXTS
        if not os.path.exists(path):
            if not by_name:
                for folder, dirs, files in os.walk(root, followlinks=True):
                    for name in files + dirs:
                        for k in (name, os.path.splitext(name)[0] + ".*"):
                            by_name.setdefault(k, []).append(os.path.join(folder, name))
            rel = rel.replace("\\", "/")
            base = os.path.basename(rel.rstrip("/"))
            same_stem = by_name.get(os.path.splitext(base)[0] + ".*", [])
            hits = by_name.get(base, []) + [p for p in same_stem
                                            if p.lower().rsplit(".", 1)[-1] in exts]
            hits.sort(key=lambda p: (not p.replace("\\", "/").endswith(rel), p))
            if not hits:
                rec["error"] = f"missing file: {rel} (not at {path}, nor anywhere under {root})"
            path = hits[0] if hits else path
        rec[key] = path
        return rec
    return locate


def read_rows(path):
    """Rows (dicts) of a .json (a list, {id: row}, or one row), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: only needed for parquet input
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:  # JSON lines: .jsonl, and POPE's .json files
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    # {id: row} as ScienceQA's problems.json, or one row (JSON lines of one line)
    if isinstance(rows, dict):
        nested = rows and all(isinstance(v, dict) for v in rows.values())
        rows = [dict(v, _key=k) for k, v in rows.items()] if nested else [rows]
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def table_files(data_dir, need):
    """(path, rows) of each table under data_dir whose rows have the fields `need` (a|b: either)."""
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "**", "*"), recursive=True)
                   if p.endswith((".json", ".jsonl", ".parquet")))
    out = []
    for path in paths:
        try:
            rows = read_rows(path)
        except (ValueError, OSError, ImportError):  # ImportError: parquet without pyarrow
            continue
        if rows and all(any(k in rows[0] for k in alt.split("|")) for alt in need):
            out.append((path, rows))
    if not out:
        hint = ""
        if any(p.endswith(".parquet") for p in paths):
            hint = " (parquet needs pyarrow: pip install pyarrow, or convert it to json)"
        raise FileNotFoundError(f"tasks/common.py: no json/jsonl under {data_dir} with fields "
                                f"{need}{hint}; check data_dir")
    return out


def extract_choice(text, options):
    """Generated text -> option index, or None: an explicit letter, then option text, then a lone
    capital letter (lmms-eval's first capital misreads "A man is ..." as option A)."""
    letters = LETTERS[:len(options)]
    prefix = r"(?i)^\s*(the )?(best |correct )?(answer|option)( is)?\s*[:\-]?\s*"
    s = re.sub(prefix, "", text.strip()).strip()
    # "B", "(B)", "B.", "B) cat", "(b)"
    m = (re.fullmatch(rf"\(?([{letters}])\)?[.):]?", s)
         or re.match(rf"\(?([{letters}])[.):]", s)
         or re.match(rf"\(([{letters.lower()}])\)", s))
    if m:
        return LETTERS.index(m.group(1).upper())

    def norm(x):  # lower case, punctuation and repeated spaces out
        return " ".join(re.sub(r"[^\w\s]", " ", x.lower()).split())
    found = [i for i, o in enumerate(options)
             if norm(o) and re.search(rf"\b{re.escape(norm(o))}\b", norm(s))]
    if found:  # the longest mention wins ("dark red" over "red")
        return max(found, key=lambda i: len(norm(options[i])))
    for m in re.finditer(rf"\b([{letters}])\b", s):
        is_article = m.group(1) == "A" and re.match(r"\s+[a-z]", s[m.end():])  # "A dog ..."
        if not is_article:
            return LETTERS.index(m.group(1))
    return None


def answer_index(answer, options):
    """An answer as benchmarks write it (index, option text, letter or "B. text") -> its index.
    The text first: MVBench answers with the option text; Character Order's options are letters."""
    if isinstance(answer, int):
        return answer
    answer = str(answer).strip()
    if answer in options:
        return options.index(answer)
    if len(answer) == 1 and answer.upper() in LETTERS[:len(options)]:
        return LETTERS.index(answer.upper())
    return options.index(re.sub(r"^[A-H]\.\s*", "", answer))


def image_or_path(rec, image, locate, root):
    """rec with its image: the bytes of a table's image struct ({bytes, path}, as Hugging Face
    parquet releases hold it), else the file `image` names under root (media_finder's locate)."""
    if isinstance(image, dict) and image.get("bytes"):
        return rec | {"image_bytes": image["bytes"]}
    if isinstance(image, dict):
        image = image.get("path") or ""
    if not isinstance(image, str) or not image:
        return rec | {"error": f"{rec['id']}: no image (got {str(image)[:60]!r})"}
    return locate(rec, "image", os.path.join(root, image), image)


def mcq_record(row, where, category="all"):
    """An MCQ row {question, options | candidates, answer} -> a record without its media."""
    options = [re.sub(r"^[A-H]\.\s*", "", o) for o in row.get("options") or row["candidates"]]
    rec = {"question": row["question"], "options": options,
           "category": row.get("category", category)}
    try:
        rec["answer"] = answer_index(row["answer"], options)
    except ValueError:
        rec["error"] = f"{where}: answer {row['answer']!r} is not among the options"
        rec["answer"] = -1
    return rec


def load_frame_dir(path, size, n, start=None, end=None, folder_fps=3):
    """A folder of frame images at folder_fps (MVBench's tvqa) -> [n,3,S,S] within [start,end] s."""
    files = image_files(path)
    if not files:
        raise ValueError(f"{path}: frame folder holds no images")
    i0 = min(len(files) - 1, max(0, round(start * folder_fps))) if start is not None else 0
    i1 = max(i0 + 1, min(len(files), round(end * folder_fps))) if end is not None else len(files)
    picked = [files[i0 + i] for i in uniform_indices(i1 - i0, n)]
    return torch.cat([load_image(os.path.join(path, f), size) for f in picked])


def load_frames(rec, max_frames=16, image_size=224, fps=None):
    """A record's frames [T,3,S,S], or ValueError/OSError with the reason."""
    if "error" in rec:
        raise ValueError(rec["error"])
    if "frames" in rec:
        return rec["frames"]
    if "load" in rec:
        return rec["load"]()
    if "image_bytes" in rec:  # an image inside the table (Hugging Face parquet releases)
        return load_image(io.BytesIO(rec["image_bytes"]), image_size, IMAGE_FRAMES, rec["id"])
    path = rec.get("video") or rec.get("image")
    if not os.path.exists(path):
        raise ValueError(f"missing file: {path}")
    if os.path.isdir(path):
        return load_frame_dir(path, image_size, max_frames, rec.get("start"), rec.get("end"))
    if path.lower().rsplit(".", 1)[-1] in IMAGE_EXTS:
        return load_image(path, image_size, replicate=IMAGE_FRAMES)
    return load_video(path, image_size, max_frames, fps, start=rec.get("start"), end=rec.get("end"))
