AVAILABLE_MODELS = {"nanofvlm": "NanoFVLM"}  # lmms-eval's plugin contract: name -> class in models/{name}.py
