"""The real SmolLM2-135M-Instruct (built offline by shared/fixtures/smollm2_from_gguf.py; NANOFVLM_SMOLLM2)."""
import torch
from tokenizers import Tokenizer

from conftest import generate_texts as generate
from model import SmolLM2

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
