"""
The lmms-eval adapter: lmms-eval's requests -> bench.py's scoring (prefill_users, generate_answers,
score_options), so a task scored here and the same questions scored by bench.py --scoring=generate agree.
Requests (lmms-eval's documented Instance.args):
  generate_until  (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> the answer text
  loglikelihood   (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
                  -> (log P(continuation | context, frames), whether greedy decoding gives it)
The doc is self.task_dict[task][split][doc_id], as lmms-eval fills it; its visuals are paths (a video, a
folder of frames, an image) or PIL images.
"""
import io
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import tasks.llava  # noqa: E402
from bench import generate_answers, score_options  # noqa: E402
from tasks.common import load_frames  # noqa: E402
from model import load_model  # noqa: E402

try:
    from lmms_eval.api.model import lmms as Base
except ImportError:  # the adapter still works on requests shaped as lmms-eval's (tests without lmms-eval)
    Base = object


class NanoFVLM(Base):
    def __init__(self, init_from="", llm_dir="", dino_dir="", mode="autoregressive", max_frames=16, image_size=224,
                 fps=0.0, max_new_tokens=16, device="cpu", model=None, tokenizer=None, **unused):
        """The same keys as bench.py (--model_args init_from=...,mode=...); model/tokenizer: already loaded."""
        super().__init__()
        if model is None:
            model, tok_path = load_model(init_from, llm_dir, dino_dir)
            tokenizer = data.load_tokenizer(tok_path)
        self.model, self.tok, self.mode, self.device = model.to(device).eval(), tokenizer, mode, device
        self.max_frames, self.image_size, self.fps = int(max_frames), int(image_size), float(fps) or None
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})

    def video(self, visuals):
        """A doc's visuals -> frames [T,3,S,S], as bench.py loads them (one image is replicated)."""
        visuals = visuals if isinstance(visuals, list) else [visuals]
        if len(visuals) == 1 and isinstance(visuals[0], str):
            return load_frames({"video": visuals[0]}, self.max_frames, self.image_size, self.fps)
        images = []
        for v in visuals:  # PIL images (several: the frames of one clip)
            buf = io.BytesIO()
            v.convert("RGB").save(buf, "PNG")
            images.append(data.load_image(buf, self.image_size))
        frames = torch.cat(images)
        return frames.expand(data.IMAGE_FRAMES, -1, -1, -1) if len(frames) == 1 else frames

    @torch.no_grad()
    def encoded(self, request):
        """(K/V cache of the doc's frames, frame_mask [1,T], the user text, the doc) of one request."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        dtype = self.model.dino.patch_embed.weight.dtype
        frames = self.video(doc_to_visual(doc))[None].to(self.device, dtype)  # [1,T,3,S,S]
        frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=self.device)  # [1,T]
        return self.model.encode(frames, frame_mask), frame_mask, tasks.llava.clean_turn(context), doc

    def generate_until(self, requests):
        out = []
        for request in requests:
            kv, frame_mask, user, _ = self.encoded(request)
            gen_kwargs = request.args[1] or {}
            n = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            text = generate_answers(self.model, self.tok, kv, frame_mask, [user], self.mode, n)[0]
            for stop in gen_kwargs.get("until") or []:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out

    def loglikelihood(self, requests):
        out = []
        for request in requests:
            kv, frame_mask, user, doc = self.encoded(request)
            continuation = request.args[1](doc) if callable(request.args[1]) else request.args[1]
            ids = self.tok.encode(continuation, add_special_tokens=False).ids
            (ce,) = score_options(self.model, self.tok, kv, frame_mask, [user], [[ids]], self.mode, "sum")
            greedy = generate_answers(self.model, self.tok, kv, frame_mask, [user], self.mode, len(ids))[0]
            out.append((-float(ce[0]), greedy.strip() == self.tok.decode(ids).strip()))
        return out

    def generate_until_multi_round(self, requests):
        return self.generate_until(requests)
