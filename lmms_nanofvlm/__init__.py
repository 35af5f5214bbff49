"""nanofVLM as an lmms-eval model, registered through lmms-eval's plugin variable (no patching):

    LMMS_EVAL_PLUGINS=lmms_nanofvlm python -m lmms_eval --model nanofvlm \\
        --model_args init_from=out/stage3_135m,mode=autoregressive --tasks mvbench

lmms-eval imports lmms_nanofvlm.models and reads its AVAILABLE_MODELS (run from the repo root)."""
