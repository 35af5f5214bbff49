# Stage 3, DPO on image/video preference pairs: 83K pairs (RLAIF-V), one epoch at batch 32
# (4 x 8 accum), LR 1e-6 for every group, cosine with 10% warmup, beta 0.1. The frozen reference is the
# stage-2 model this run starts from. Shards: {key}.jpg/.mp4/frames + {key}.json with user, chosen_assistant,
# rejected_assistant.
exec(open('config/stage2_135m.py').read())
out_dir = 'out/stage3_135m'
init_from = 'out/stage2_135m'  # a run dir: its latest ckpt/step-* is used (the policy's start and the reference)
train_data = 'data/stage3/*.tar'
val_data = ''  # the DPO batch has no single target text; progress shows in rewards/* and the MCQs
text_data = ''
stage = 3
batch_size = 4
gradient_accumulation_steps = 8
max_iters = 2600  # 83K pairs / 32
warmup_iters = 260
lr_connector = lr_steer = lr_dino = lr_dino_qk = lr_llm = 1e-6
# precompute_ref = True: the reference's log-probs in one pass first, then one model in memory
eval_interval = 500
ckpt_interval = 500
