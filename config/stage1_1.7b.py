# Stage 1 for SmolLM2-1.7b: the 135M recipe with its sizes; LRs scaled by 0.28 as the original scaled them for 1.7B, batch 32 = 4 x 8, gradient checkpointing.
exec(open('config/stage1_135m.py').read())
out_dir = 'out/stage1_1.7b'
llm_dir = 'checkpoints/SmolLM2-1.7B-Instruct'
batch_size = 4
gradient_accumulation_steps = 8
lr_connector = lr_steer = 1e-3 * 0.28
lr_dino = lr_dino_qk = 1e-5 * 0.28
lr_llm = 1e-5 * 0.28
target_lr = 3e-5 * 0.28
gradient_checkpointing = True
