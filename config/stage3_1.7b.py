# Stage 3 (DPO) for SmolLM2-1.7b: the 135M recipe with its sizes; LRs scaled by 0.28, gradient
# checkpointing, and the reference precomputed so that only one 1.7B model sits in GPU memory.
exec(open('config/stage3_135m.py').read())
out_dir = 'out/stage3_1.7b'
init_from = 'out/stage2_1.7b'
lr_connector = lr_steer = lr_dino = lr_dino_qk = lr_llm = 1e-6 * 0.28
gradient_checkpointing = True
precompute_ref = True
