# Stage 2, vision-language SFT: CE on the assistant answer only, 1M samples, batch 32,
# cosine at 3e-5 for every group, images replicated to 8 frames. Starts from stage 1's latest checkpoint.
exec(open('config/stage1_135m.py').read())
out_dir = 'out/stage2_135m'
init_from = 'out/stage1_135m'  # a run dir: its latest ckpt/step-* is used
train_data = 'data/stage2/*.tar'
stage = 2
replicate_image_frames = 8
lr_connector = lr_steer = lr_dino = lr_dino_qk = lr_llm = 3e-5
schedule = 'cosine'
