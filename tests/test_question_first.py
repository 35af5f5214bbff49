"""The question-first layout, [system + user][frames][answer]: the invariants of the frames-first layout hold
(autoregressive == a naive loop, padding changes nothing, cached MCQ scores == full recomputation, cached
decode == full forwards), one encode serves many questions, and the question really moves the glimpse."""
import pytest
import torch

from bench import option_answers, score_options
from conftest import steered
from data import encode_question, encode_reply_start, format_mcq
from tasks.shapes import train_tokenizer
from model import MODES, DinoConfig, DINOv2, FoveatedVLM, LLMConfig, SmolLM2, generate, left_pad, sample_next

SIZE = 28


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["which ball is red? the blue ball, a dog or a cat. yes no"] * 20, vocab_size=300)


def tiny(tok, layout="question_first", seed=0):
    torch.manual_seed(seed)
    llm = SmolLM2(LLMConfig(vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, hidden_dim=128, max_seq_len=512))
    dino = DINOv2(DinoConfig(image_size=56, patch_size=14, dim=48, n_layers=2, n_heads=3))
    return steered(FoveatedVLM(llm, dino, layout=layout).eval())


@pytest.fixture(scope="module")
def vlm(tok):
    return tiny(tok)


def clip(T=3, seed=0):
    return torch.randn(1, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def ids(tok, text):
    return torch.tensor([tok.encode(text).ids])


@torch.no_grad()
def naive_logits(vlm, frames, question, text):
    """[question][visual][text] recomputed from scratch at every frame: no cache, no batching, no sharing."""
    kv = vlm.encode(frames)
    T = frames.shape[1]
    prefix = vlm.llm.embed_tokens(question)  # [1,P,L]
    query = vlm.llm_to_query(vlm.llm(embeds=prefix, hidden_only=True)[:, -1])
    for t in range(T):
        g, _ = vlm.glimpse(query[:, None], [(k[t:t + 1], v[t:t + 1]) for k, v in kv])  # [1,1,D]
        prefix = torch.cat((prefix, vlm.dino_to_llm(g) * vlm.visual_scale), 1)
        query = vlm.llm_to_query(vlm.llm(embeds=prefix, hidden_only=True)[:, -1])
    return vlm.llm(embeds=torch.cat((prefix, vlm.llm.embed_tokens(text)), 1))[:, -text.shape[1]:]


def test_autoregressive_equals_naive(vlm, tok):
    frames, question, text = clip(), ids(tok, "which ball is red?"), ids(tok, "the blue ball")
    with torch.no_grad():
        logits, _ = vlm(frames, text, mode="autoregressive", question_ids=question)
    assert (logits - naive_logits(vlm, frames, question, text)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_padding_and_sharing_change_nothing(vlm, tok, mode):
    """Three questions about two clips (2 + 1, one encode), questions left-padded, texts right-padded,
    frames padded with junk: every row equals its question asked alone."""
    short, long = clip(T=2, seed=1), clip(T=4, seed=2)
    frames = torch.cat((torch.cat((short, torch.randn(1, 2, 3, SIZE, SIZE) * 100), 1), long))
    frame_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    questions = [tok.encode(q).ids for q in ("which ball is red?", "a dog?", "which ball is red? a cat or a dog")]
    texts = [tok.encode(t).ids for t in ("the blue ball", "yes", "a cat")]
    owner = torch.tensor([0, 0, 1])  # the sample of each text row
    question, valid = left_pad(questions, "cpu")
    text = torch.tensor([t + [2] * (4 - len(t)) for t in texts])
    with torch.no_grad():
        batch, _ = vlm(frames, text, frame_mask=frame_mask, mode=mode, owner=owner, question_ids=question,
                       question_valid=valid)
        for r, (f, q, t) in enumerate(zip((short, short, long), questions, texts)):
            alone, _ = vlm(f, torch.tensor([t]), mode=mode, question_ids=torch.tensor([q]))
            assert (batch[r, :len(t)] - alone[0]).abs().max() <= 1e-5, (mode, r)


@pytest.mark.parametrize("layout", ["question_first", "frames_first"])
@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_coarse_pass_answers_as_coarse_only(tok, layout, mode):
    """coarse_loss_weight: the static glimpses answer too (coarse_fine: its coarse pass reads the text; autoregressive:
    one more pass), and that loss is exactly coarse_only's (three rows on two padded clips)."""
    vlm = tiny(tok, layout)
    frames = torch.cat((clip(T=4, seed=1), clip(T=4, seed=2)))
    frame_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    text = torch.tensor([t + [2] * (5 - len(t)) for t in
                         (tok.encode(x).ids for x in ("the blue ball", "yes", "a cat or a dog"))])
    loss_mask = (text != 2).long()
    rows = dict(frame_mask=frame_mask, owner=torch.tensor([0, 0, 1]))
    if layout == "question_first":
        question, valid = left_pad([tok.encode(q).ids for q in ("which ball is red?", "a dog?", "a cat?")], "cpu")
        rows |= dict(question_ids=question, question_valid=valid)
    with torch.no_grad():
        fine = vlm(frames, text, loss_mask, mode=mode, **rows)[1]
        coarse = vlm(frames, text, loss_mask, mode="coarse_only", **rows)[1]
        both = vlm(frames, text, loss_mask, mode=mode, coarse_loss_weight=0.5, **rows)[1]
    assert abs(both - (fine + 0.5 * coarse)) <= 1e-5 and abs(coarse - fine) > 1e-4


def test_one_encode_for_many_questions(vlm, tok):
    calls = []
    hook = vlm.dino.patch_embed.register_forward_hook(lambda *a: calls.append(1))  # once per DINOv2 pass
    question, valid = left_pad([tok.encode(q).ids for q in ("which ball is red?", "a dog?", "a cat?", "yes")], "cpu")
    try:
        with torch.no_grad():
            vlm(clip(), ids(tok, "yes").repeat(4, 1), owner=torch.zeros(4, dtype=torch.long),
                question_ids=question, question_valid=valid)
    finally:
        hook.remove()
    assert len(calls) == 1  # four questions, four glimpse walks, one DINOv2 pass


@pytest.mark.parametrize("mode", ["coarse_fine", "autoregressive"])
def test_the_question_moves_the_glimpse(tok, mode):
    """question first: another question, another query for frame 0; frames first: the glimpses come before
    any text and cannot depend on it."""
    frames = clip()
    for layout, differs in (("question_first", True), ("frames_first", False)):
        vlm = tiny(tok, layout)
        kv = vlm.encode(frames)
        mask = torch.ones(1, 3, dtype=torch.bool)
        maps = []
        for q in ("which ball is red?", "a dog or a cat?"):
            question = (ids(tok, q), None) if layout == "question_first" else None
            with torch.no_grad():
                maps.append(vlm.prefill(kv, mask, torch.tensor([encode_reply_start(tok)]), mode,
                                        question=question)[2])
        assert ((maps[0] - maps[1]).abs().max() > 1e-4) == differs, layout


def test_cached_scores_equal_full_recomputation(vlm, tok):
    frames = clip(T=3, seed=4)[0]
    options = ["a dog", "the blue ball is red", "a cat"]
    user = format_mcq("which ball is red?", options)
    question, reply = encode_question(tok, user), encode_reply_start(tok)
    mask = torch.ones(1, 3, dtype=torch.bool)
    kv = vlm.encode(frames[None], mask)
    for mode in MODES:
        fast = score_options(vlm, tok, kv, mask, [user], [option_answers(tok, options)], mode)[0]
        for k, answer in enumerate(option_answers(tok, options)):
            text = torch.tensor([reply + answer])
            loss_mask = torch.tensor([[0] * len(reply) + [1] * len(answer)])
            with torch.no_grad():
                _, loss = vlm(frames[None], text, loss_mask, mode=mode, question_ids=torch.tensor([question]))
            assert abs(fast[k].item() - loss.item()) <= 1e-4, (mode, k)


@pytest.mark.parametrize("mode", MODES)
def test_cached_decode_equals_full_forwards(vlm, tok, mode):
    frames, question = clip(seed=5), ids(tok, "which ball is red?")
    reply = torch.tensor([encode_reply_start(tok)])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        cache, last, _ = vlm.prefill(vlm.encode(frames), mask, reply, mode, extra=12, question=(question, None))
        sampler = torch.Generator().manual_seed(0)  # sampled, not greedy: a random model repeats one token
        fast = [t.item() for t in generate(vlm.llm, cache, last, 12, temperature=1.0, stop_id=-1, generator=sampler)]
        text, sampler = reply, torch.Generator().manual_seed(0)
        for _ in range(12):  # the oracle: the whole sequence again for every new token
            logits, _ = vlm(frames, text, mode=mode, question_ids=question)
            text = torch.cat((text, sample_next(logits[:, -1], 1.0, generator=sampler)[:, None]), 1)
    assert fast == text[0, reply.shape[1]:].tolist()
    assert len(set(fast)) > 2  # a meaningful comparison
