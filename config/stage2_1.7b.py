# Stage 2 for SmolLM2-1.7b: the 135M recipe with its sizes; LRs scaled by 0.28, batch 32 = 4 x 8, gradient checkpointing.
exec(open('config/stage2_135m.py').read())
out_dir = 'out/stage2_1.7b'
init_from = 'out/stage1_1.7b'
batch_size = 4
gradient_accumulation_steps = 8
lr_connector = lr_steer = lr_dino = lr_dino_qk = lr_llm = 3e-5 * 0.28
gradient_checkpointing = True
