"""The real SmolLM2-135M-Instruct (built offline by shared/fixtures/smollm2_from_gguf.py; NANOFVLM_SMOLLM2)."""
import time

import torch
from tokenizers import Tokenizer

from model import SmolLM2, decode, generate

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_real_logits_and_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json")
    ids = tok.encode(CHAT).ids
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single special tokens
    ours = SmolLM2.from_pretrained(smollm2_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - ref(x).logits).abs().max().item()
    print(f"\nmax |logit diff| vs transformers: {diff:.2e}")
    assert diff <= 1e-3
    answer = tok.decode(generate(ours, [ids], max_new_tokens=24)[0])
    print("answer:", answer)
    assert "Paris" in answer


def test_real_bf16_long_prompt(smollm2_dir):
    """bf16 weights on a 700-token prompt: the same next tokens as transformers' bf16 model at every position."""
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json")
    readme = open(__file__.rsplit("/tests/", 1)[0] + "/README.md").read()
    x = torch.tensor([tok.encode(readme).ids[:700]])
    with torch.no_grad():
        ours = SmolLM2.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()(x)[0].argmax(-1)
        fp32 = SmolLM2.from_pretrained(smollm2_dir).eval()(x)[0].argmax(-1)
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()(x).logits[0].argmax(-1)
    assert x.shape[1] == 700 and (ours == ref).float().mean() >= 0.99  # 1.0 measured; 0.75 with bf16 angles
    assert (ours[256:] == fp32[256:]).float().mean() >= 0.9  # as close to fp32 as transformers' bf16 (0.97)


def test_real_decode_speed(smollm2_dir):
    """Prints batch-1 decode tokens/s, ours vs transformers' generate, 128 new tokens, fp32 and bf16 weights."""
    from transformers import AutoModelForCausalLM
    ids = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json").encode(CHAT).ids
    n = 128
    for dtype in (torch.float32, torch.bfloat16):
        ours = SmolLM2.from_pretrained(smollm2_dir, dtype=dtype).eval()
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=dtype).eval()
        x = torch.tensor([ids])
        with torch.no_grad():
            cache = ours.new_cache(1, len(ids) + n)
            logits = ours.lm_head(ours(x, cache=cache, hidden_only=True)[:, -1])
            t0 = time.perf_counter()
            steps = list(decode(ours, cache, logits, n, stop_id=-1))
            ours_tps = len(steps) / (time.perf_counter() - t0)
            ref.generate(x, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            out = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            ref_tps = (out.shape[1] - len(ids)) / (time.perf_counter() - t0)
        print(f"\n{dtype}: ours {ours_tps:.1f} tok/s, transformers {ref_tps:.1f} tok/s, ratio {ours_tps / ref_tps:.2f}")
        assert len(steps) == n
