# The embedded default: a tiny fVLM (4-layer DINOv2, 4-layer SmolLM2 architecture, both from scratch) trained
# on the synthetic shapes task on CPU. These are train.py's own defaults, so `python train.py` runs exactly this;
# copy this file to experiment, e.g. `python train.py config/shapes.py --max_iters=3000`.
out_dir = 'out/shapes'
shapes_dir = 'data/shapes'
train_data = 'data/shapes/train-*.tar'
val_data = 'data/shapes/val-*.tar'
text_data = 'data/shapes/text-*.tar'
mcq_data = 'data/shapes/mcq_val.json'
stage = 2
image_size = 64
