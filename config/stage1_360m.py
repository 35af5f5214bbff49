# Stage 1 for SmolLM2-360M: the 135M recipe with its sizes.
exec(open('config/stage1_135m.py').read())
out_dir = 'out/stage1_360m'
llm_dir = 'checkpoints/SmolLM2-360M-Instruct'
