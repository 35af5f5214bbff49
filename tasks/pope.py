"""
POPE (object hallucination: "Is there a <object> in the image?", yes or no), in either release: the
official files (coco_pope_random.json, ...: JSON lines {question_id, image, text, label}) with the
COCO val2014 images, or lmms-lab/POPE's parquet (the image's bytes, `category`). Scored as the POPE
paper reports it: accuracy, precision, recall, F1 and the share of "yes" answers, per category.

    python bench.py --task=pope --data_dir=POPE --image_root=coco/val2014
"""
import os

from tasks.common import image_or_path, media_finder, table_files

ANSWERS = {"yes": 0, "no": 1}  # option A. yes, B. no


def read(data_dir, image_root=""):
    """The questions; images under image_root (default: found under data_dir)."""
    locate, records = media_finder(image_root or data_dir), []
    for path, rows in table_files(data_dir, ["text|question", "label|answer", "image"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        for j, row in enumerate(rows):
            rec = {"id": f"{stem}/{row.get('question_id', j)}",
                   "question": row.get("text") or row["question"],
                   "options": ["yes", "no"],
                   "category": row.get("category") or stem.replace("_pope", "")}
            label = str(row.get("label", row.get("answer"))).strip().lower()
            rec["answer"] = ANSWERS.get(label, -1)
            if label not in ANSWERS:  # counted wrong with its reason, never scored as "no"
                rec["error"] = f"{path}: {rec['id']}: label {label!r} is neither yes nor no"
            root = image_root or os.path.dirname(path)
            records.append(image_or_path(rec, row["image"], locate, root))
    return records


def metrics(items, modes):
    """{mode: {category (and "all"): accuracy, precision, recall, f1, yes_ratio, count}} of
    evaluate_mcq's items, "yes" the positive class; questions without usable media are left out."""
    out = {}
    for mode in modes:
        groups = {}
        for item in items:
            if "error" not in item:
                for key in (item["category"], "all"):
                    groups.setdefault(key, []).append((item["pred"].get(mode), item["answer"]))
        out[mode] = {key: scores(pairs) for key, pairs in sorted(groups.items())}
    return out


def scores(pairs):
    """(prediction, answer) pairs, 0 = yes -> the POPE table's numbers"""
    tp = sum(p == 0 and a == 0 for p, a in pairs)
    fp = sum(p == 0 and a == 1 for p, a in pairs)
    fn = sum(p != 0 and a == 0 for p, a in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == a for p, a in pairs) / len(pairs), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
            "yes_ratio": sum(p == 0 for p, _ in pairs) / len(pairs), "count": len(pairs)}


def table(pope_metrics):
    """The POPE paper's table per mode: a row per category."""
    lines = []
    for mode, by_category in pope_metrics.items():
        heads = " ".join(f"{h:>6}" for h in ("acc", "prec", "rec", "f1", "yes", "n"))
        lines.append(f"POPE, {mode}: {'category':<24} {heads}")
        for key, m in by_category.items():
            cells = [100 * m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
            numbers = " ".join(f"{c:>6.1f}" for c in cells) + f" {m['count']:>6}"
            lines.append(" " * (len(mode) + 7) + f"{key:<24} {numbers}")
    return "\n".join(lines)
