"""
Pre-tokenized samples of the research layout: a json with `token_ids` (and `loss_mask`) instead of
text, taken as stored (frames first). data.ShardDataset's text_rows hands such a json here.
"""
import data


def row(meta, dataset, where):
    """token_ids + loss_mask as stored -> a text row {question, ids, mask} of `dataset` (a
    data.ShardDataset); no mask: every token a target, in stage 1 only"""
    if dataset.question_first:  # the ids hold no mark of where the question ends
        raise data.SkipSample("frames_first_only",
                              f"{where}.json: token_ids can only train a frames-first model; "
                              f"store the text instead, or pass --layout=frames_first")
    tok, stage, max_len = dataset.tok, dataset.stage, dataset.max_len
    ids, mask = meta["token_ids"], meta.get("loss_mask", "all" if stage == 1 else None)
    if mask == "all" and isinstance(ids, list):
        mask = [1] * len(ids)
    vocab = tok.get_vocab_size()
    if not (isinstance(ids, list) and all(type(i) is int and 0 <= i < vocab for i in ids)):
        raise data.SkipSample("bad_field",
                              f"{where}.json: token_ids must be a list of ids in [0, {vocab})")
    if not (isinstance(mask, list) and len(mask) == len(ids) and all(m in (0, 1) for m in mask)):
        raise data.SkipSample("bad_field",
                              f"{where}.json: token_ids without a matching loss_mask of 0/1")
    if len(ids) > max_len:
        dataset.skipped["truncated (kept)"] += 1
    return {"question": [], "ids": ids[:max_len], "mask": mask[:max_len]}
