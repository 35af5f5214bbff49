# Stage 3 (DPO) for SmolLM2-360m: the 135M recipe with its sizes.
exec(open('config/stage3_135m.py').read())
out_dir = 'out/stage3_360m'
init_from = 'out/stage2_360m'
