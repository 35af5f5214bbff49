# Stage 3 (DPO) on the synthetic shapes task, on CPU in a few minutes: starts from the embedded default's
# checkpoint (run `python train.py` first) and prefers the right answer to a question about a clip over a
# wrong option (tasks.shapes.shapes_sample, split 'dpo'). Watch rewards/accuracies climb from 0; the held-out MCQ
# accuracy is printed at the end (compare with the stage-2 run's final_eval.json). DPO sharpens what the
# stage-2 model can already see; the SFT term on the chosen answer and a gentle LR keep its QA skills
# (docs/LOG.md).
out_dir = 'out/shapes_dpo'
init_from = 'out/shapes'  # a run dir: its latest ckpt/step-* is the policy's start and the frozen reference
train_data = 'data/shapes/dpo-*.tar'
val_data = ''
text_data = ''
stage = 3
max_iters = 120
warmup_iters = 12
lr_connector = lr_steer = lr_dino = lr_dino_qk = lr_llm = 5e-5
sft_weight = 1.0
eval_interval = 60
ckpt_interval = 120
