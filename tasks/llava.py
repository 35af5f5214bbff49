"""
LLaVA-style annotation files as published: a .json list or a .jsonl of rows {"id", "video" |
"image", "conversations": [{"from": "human", "value": "<video>\n..."}, {"from": "gpt", ...}]}
(DPO: "prompt" or a human turn, "chosen", "rejected"), media relative to media_root (default: the
file's folder).
data.ShardDataset reads them through units / read_unit / to_record: a row becomes the record a tar
shard would give. A row's media is read only when decoded: a resumed reader passes rows untouched.
"""
import json
import os
import re
from functools import lru_cache

import data

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"\s*<(?:image|video)>\s*")
MEDIA_KEY = re.compile(r"image|video|frame|picture|photo", re.IGNORECASE)  # keys that name media


def is_annotation(path):
    """A .jsonl, or a .json list (a .json object is a plain file's sidecar)."""
    if path.endswith(".jsonl"):
        return True
    if not path.endswith(".json"):
        return False
    with open(path, "rb") as fh:
        return fh.read(4096).lstrip()[:1] == b"["


@lru_cache(maxsize=None)  # parsed once per process
def rows(path):
    """An annotation file's rows; a jsonl line that is not json stays text (skipped on decode)."""
    if not path.endswith(".jsonl"):
        loaded = json.load(open(path, encoding="utf-8"))
        return loaded if isinstance(loaded, list) else []
    out = []
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(line.strip())
    return out


def units(path, block, counter):
    """What the readers share out: (path, first row) of blocks of `block` rows. With block = the
    shard writer's shard_size, the same units, hence the same order, as the shards it wrote."""
    try:
        n = len(rows(path))
    except (ValueError, OSError) as e:
        data.count_skip(counter, "bad_json",
                        f"{path}: unreadable annotation file ({type(e).__name__}: {e})")
        return []
    return [(path, start) for start in range(0, n, block)]


def read_unit(unit, block):
    """One unit's rows as records {key, shard, row}: key '{row number}_{id}' (unique, no dots)."""
    path, start = unit
    all_rows = rows(path)
    for i in range(start, min(start + block, len(all_rows))):
        rid = all_rows[i].get("id") if isinstance(all_rows[i], dict) else None
        tail = ""
        if rid not in (None, ""):
            tail = "_" + re.sub(r"[^A-Za-z0-9_-]+", "_", str(rid))[:60]
        yield {"key": f"{i:07d}{tail}", "shard": path, "row": all_rows[i]}


def clean_turn(value):
    return PLACEHOLDER.sub(" ", value).strip()


def reply_text(reply):
    """A DPO reply: a string, or a chat list whose last turn holds the text."""
    if isinstance(reply, list) and reply and isinstance(reply[-1], dict):
        reply = reply[-1].get("value", reply[-1].get("content"))
    return clean_turn(reply) if isinstance(reply, str) else None


def conversation_turns(conv, where, counter):
    """LLaVA turns -> (users, answers): a role's turns in a row joined, a system turn dropped (our
    system prompt is fixed), a first model turn given an empty question (the source's fills it)."""
    merged = []  # [role, text]
    for j, turn in enumerate(conv):
        turn = turn if isinstance(turn, dict) else {}
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise data.SkipSample("bad_field",
                             f"{where}: turn {j} needs 'from' (human / gpt / system) and a string "
                             f"'value' (got {str(turn)[:80]})")
        if role == "system":
            counter["system_turn (dropped)"] += 1
        elif merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + clean_turn(value)
        else:
            merged.append([role, clean_turn(value)])
    if merged and merged[0][0] == "assistant":
        merged.insert(0, ["user", ""])
    users = [t for r, t in merged if r == "user"]
    answers = [t for r, t in merged if r == "assistant"]
    return users, answers


def annotation_meta(row, where, counter):
    """A row's text as the research layout's json."""
    meta = {"source": str(row.get("source") or row.get("data_source") or "")}
    conv = row.get("conversations")
    if "chosen" in row or "rejected" in row:
        users, _ = conversation_turns(conv, where, counter) if isinstance(conv, list) else ([], [])
        prompt = row.get("prompt", row.get("question"))
        user = clean_turn(prompt) if isinstance(prompt, str) else (users[0] if users else "")
        return meta | {"user": user, "chosen_assistant": reply_text(row.get("chosen")),
                       "rejected_assistant": reply_text(row.get("rejected"))}
    if not isinstance(conv, list):
        raise data.SkipSample("missing_field",
                         f"{where}: needs 'conversations' (a list of {{from, value}} turns)")
    users, answers = conversation_turns(conv, where, counter)
    if not answers:
        raise data.SkipSample("missing_field",
                         f"{where}: 'conversations' holds no answer (a 'gpt' turn)")
    # an unanswered last question: dropped
    return meta | {"user": users[:len(answers)], "assistant": answers}


def is_path(value):
    """A file name or a list of them (not an id, a count or a flag)"""
    values = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, str) and re.search(r"[./\\]", v) for v in values)


def annotation_media(row, root, max_frames, where):
    """A row's media as record files: {ext: bytes} of a video or image, or frames {NNN.ext: bytes}
    (at most max_frames) of a folder or list of images; {} = text-only."""
    media = row.get("video", row.get("image"))
    if media in (None, "", []):
        # media under a key this reader does not take would silently train a text-only sample
        if other := next((k for k, v in row.items() if MEDIA_KEY.search(k) and is_path(v)), None):
            raise data.SkipSample("unread_media",
                                  f"{where}: media under '{other}', which this reader does not "
                                  f"take: name it 'video' or 'image'")
        return {}
    paths = media if isinstance(media, list) else [media]
    if not all(isinstance(p, str) and p for p in paths):
        raise data.SkipSample("bad_field",
                         f"{where}: 'video' / 'image' must be a path or a list of paths")
    paths = [os.path.join(root, p) for p in paths]  # an absolute path stays as it is
    if missing := [p for p in paths if not os.path.exists(p)]:
        raise data.SkipSample("missing_media",
                         f"{where}: {missing[0]} not found (check media_root={root!r})")
    if len(paths) == 1 and os.path.isdir(paths[0]):  # a folder of frames is a video
        folder = paths[0]
        paths = [os.path.join(folder, n) for n in data.image_files(folder)]
        if not paths:
            raise data.SkipSample("missing_media", f"{where}: {folder} holds no frame images")
    exts = [p.rsplit(".", 1)[-1].lower() for p in paths]
    if len(paths) == 1:
        if exts[0] not in data.VIDEO_EXTS + data.IMAGE_EXTS:
            raise data.SkipSample("bad_field",
                             f"{where}: {paths[0]}: not a video ({data.VIDEO_EXTS}) or image")
        return {exts[0]: open(paths[0], "rb").read()}
    picked = data.uniform_indices(len(paths), max_frames)
    return {f"{t:03d}.{exts[i]}": open(paths[i], "rb").read() for t, i in enumerate(picked)}


def to_record(rec, media_root, max_frames, counter):
    """A row record (read_unit) -> the record a tar would yield (data.read_tar)."""
    row, where = rec["row"], f"{rec['shard']}:{rec['key']}"
    if not isinstance(row, dict):
        raise data.SkipSample("bad_json",
                         f"{where}: a row must be a json object (got {str(row)[:80]!r})")
    meta = annotation_meta(row, where, counter)
    root = media_root or os.path.dirname(rec["shard"])
    files = {"json": json.dumps(meta).encode()} | annotation_media(row, root, max_frames, where)
    return {"key": rec["key"], "shard": rec["shard"], "files": files}
