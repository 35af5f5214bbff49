# Stage 1, visual alignment: CE on every text token, 1M samples, batch 32 = 8 x 4 accumulation, the
# "converging" schedule (connector 1e-3 and backbones 1e-5 all meet at 3e-5), 14% text-only samples.
# The optimizer and the fresh connector are the original recipe's (the shapes task's choices are train.py's
# defaults; none of them has been measured on this recipe).
# Set the paths: SmolLM2 and DINOv2 as Hugging Face dirs, data as tar shards in the layout of data.py.
out_dir = 'out/stage1_135m'
llm_dir = 'checkpoints/SmolLM2-135M-Instruct'
dino_dir = 'checkpoints/dinov2-small'
train_data = 'data/stage1/*.tar'
val_data = 'data/val/*.tar'
text_data = 'data/text/*.tar'
mcq_data = ''
stage = 1
image_size = 224
max_frames = 64
fps = 1.0  # videos at 1 frame per second (up to 64), as the research shards and the original loader
replicate_image_frames = 1
text_ratio = 0.14
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 31250  # 1M samples / 32
warmup_iters = 938  # 3%
lr_connector = lr_steer = 1e-3
lr_dino = lr_dino_qk = 1e-5
lr_llm = 1e-5
schedule = 'converging'
target_lr = 3e-5
weight_decay_params = 'all'
beta2 = 0.999
output_proj_group = 'dino'
q_init_copies_static = False
llm_to_query_zero_init = False
layout = 'frames_first'  # the released fVLM-135M's: [frames][chat]
train_mode = 'coarse_fine'
coarse_loss_weight = 0.0
dtype = 'bfloat16'
compile = True
num_workers = 4
eval_interval = 1000
ckpt_interval = 1000
eval_modes = 'coarse_only,coarse_fine'
