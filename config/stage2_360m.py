# Stage 2 for SmolLM2-360M: the 135M recipe with its sizes.
exec(open('config/stage2_135m.py').read())
out_dir = 'out/stage2_360m'
init_from = 'out/stage1_360m'
