"""
Caption or answer about a video or an image with nanofVLM, streaming the text, and draw where each
frame's glimpse looked.

    python sample.py --mode=autoregressive --attention_out=glimpses.png   # a held-out shapes clip
    python sample.py --video=clip.mp4 --prompt="What happens here?" --attention_out=glimpses.gif
    python sample.py --image=cat.jpg --llm_dir=DIR --dino_dir=DIR \
        --init_from=fVLM-135M/model.safetensors
    python sample.py --video=hour.mp4 --fps=1 --max_frames=0 --attention_out=sheet.png  # 3,600
    python sample.py --prompt="what colour is the spot on the red ball?" \
        --second_prompt="what colour is the spot on the blue ball?" --attention_out=two.png

In autoregressive mode a video streams (model.FoveatedVLM.stream), so memory does not grow with
it (the LLM cache aside); a video longer than the LLM's context is refused with how many frames fit.

The picture: one column per frame (.png) or one animation frame per video frame (.gif); rows: the
frame, the coarse glimpse (q_static), and each prompt's glimpse in --mode (unless coarse_only). A
heatmap is the glimpse query's attention over the patch grid (the weights model.glimpse used),
averaged over heads and the last `attention_layers` DINOv2 layers, each map divided by its peak.
The generated text goes to stdout; everything else to stderr.
"""
import os
import sys
import time

import torch

import data
import model
from perf.platform import tune, warn_slow_bf16
from tasks import shapes
from tools.picture import ContactSheet, Picture, draw_picture

# -----------------------------------------------------------------------------
video = ''  # a video file PyAV reads (mp4, webm, gif, mkv, ...)
image = ''  # an image file, replicated to replicate_image_frames frames as in training
prompt = ''  # the user turn; '': a shapes clip's own, else "Describe this video." (or image)
# another question about the frames, answered after the first, drawn as its own glimpse row
second_prompt = ''
init_from = 'out/shapes'  # our checkpoint (a run dir: its newest) | .safetensors over llm_dir
llm_dir = ''  # a Hugging Face SmolLM2 dir (for a weights file, or init_from='scratch')
dino_dir = ''  # a Hugging Face DINOv2 dir
shapes_dir = 'data/shapes'  # with neither --video nor --image: clip number `clip` of its val split
clip = 0
mode = 'autoregressive'  # coarse_only | coarse_fine | autoregressive
max_new_tokens = 100
temperature = 0.0  # 0 = greedy
top_k = 0  # 0 = no top-k filter
num_samples = 1
seed = 1337
device = 'cpu'
dtype = 'float32'  # the weights' dtype: float32 | bfloat16 | float16 (train/bench.py: autocast)
image_size = 0  # frame side; 0 = min(224, DINOv2's image_size), a shapes clip as stored
max_frames = 8  # frames sampled uniformly over a video; with fps > 0 the cap (0 = none)
fps = 0.0  # > 0: a video's frames at this rate (1.0: an hour is 3,600 frames), up to max_frames
stream_chunk = 8  # a streamed video's frames decoded, encoded and walked at once, then freed
max_held_frames = 256  # coarse modes hold every frame's K/V (~9.5 MB a frame at 224px fp32)
sheet_frames = 12  # a video of more frames is drawn as a contact sheet of this many, evenly spaced
replicate_image_frames = data.IMAGE_FRAMES  # an image becomes this many frames
attention_out = ''  # .png (all frames side by side) or .gif (an animation)
attention_layers = 4  # the late layers decide what a glimpse carries; early ones are positional
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def fail(msg):
    sys.exit(f"sample.py: {msg}")  # one line, exit code 1, no traceback


def stream_video(ids, question):
    """autoregressive over --video, a chunk at a time -> (cache, logits, the Picture of the frames
    a contact sheet shows; None without --attention_out)."""
    sheet = ContactSheet(n_frames, sheet_frames, seconds)
    chunks = data.video_chunks(video, side, cap, fps or None, chunk=stream_chunk, device=device,
                               progress=True)
    cache, logits = vlm.stream(chunks, n_frames, ids, max_new_tokens, question=question,
                               on_frames=sheet.keep if attention_out else None)
    return cache, logits, sheet.picture(device, ptdtype)


def respond(user):
    """Answer one user turn about the frames: prefill (or stream the video), then generate
    num_samples answers, printed as they come -> (the first answer, its Picture or None)."""
    print(f"prompt: {user}", file=sys.stderr)
    question_tokens, prompt_tokens = data.prompt_parts(tok, user, vlm.layout)
    # question first: (ids [1,Pq], valid None), what model.FoveatedVLM takes as `question`
    question = None
    if question_tokens:
        question = (torch.tensor([question_tokens], device=device), None)
    ids = torch.tensor([prompt_tokens], device=device)  # [1,S]
    if streaming:
        try:
            cache, logits, picture = stream_video(ids, question)
        except ValueError as e:  # a file that breaks mid-way: data.py's message names it
            fail(e)
    else:
        cache, logits, attn = vlm.prefill(kv, frame_mask, ids, mode, max_new_tokens,
                                          question=question)
        picture = Picture(frames, attn[0], None)  # every frame
    generator = torch.Generator(device=device).manual_seed(seed)
    answers = []
    for s in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {s + 1}/{num_samples}", file=sys.stderr)
        out, printed, t0 = [], "", time.time()
        # each sample continues from the prompt: a fresh copy of the prefilled cache
        first_row = cache.copy_rows(torch.zeros(1, dtype=torch.long, device=device))
        tokens = model.generate(vlm.llm, first_row, logits, max_new_tokens, temperature,
                                top_k or None, data.PAD_ID, generator)
        for token in tokens:
            if token.item() == data.PAD_ID:
                break
            out.append(token.item())
            text = tok.decode(out)  # the whole answer: a byte-level token can be half a character
            if not text.endswith("\ufffd"):  # wait until the character is complete
                print(text[len(printed):], end="", flush=True)
                printed = text
        answers.append(tok.decode(out))
        print(answers[-1][len(printed):], flush=True)
        print(f"({len(out)} tokens, {len(out) / (time.time() - t0):.1f} tokens/s)", file=sys.stderr)
    return answers[0], picture


# -----------------------------------------------------------------------------
if mode not in model.MODES:
    fail(f"--mode must be one of {', '.join(model.MODES)}, got {mode!r}")
if video and image:
    fail("pass --video or --image, not both")
if attention_out and not attention_out.lower().endswith((".png", ".gif")):
    fail(f"--attention_out={attention_out}: must end in .png or .gif")
for path in (video, image):
    if path and not os.path.isfile(path):
        fail(f"{path}: file not found")
torch.manual_seed(seed)
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
warn_slow_bf16(device, dtype, "sample.py")
try:
    vlm, tok_path = model.load_model(init_from, llm_dir, dino_dir, ptdtype)
    tok = data.load_tokenizer(tok_path)
except (FileNotFoundError, ValueError) as e:
    fail(e)
weights = init_from  # what the header line says was loaded
if os.path.isdir(init_from):
    weights = os.path.dirname(tok_path)  # the checkpoint really used (a run dir: its newest)
if init_from == 'scratch':
    weights = f"{llm_dir} + {dino_dir} with an UNTRAINED connector"
tune(vlm.to(device).eval())

reference, clip_question = None, None  # a shapes clip's own question and answer
side = image_size or min(224, vlm.dino.cfg.image_size)
streaming = bool(video) and mode == "autoregressive"  # any length: frames are never all held
cap = max_frames  # the most frames to read
if max_frames == 0:  # no cap: every frame at --fps
    if video and fps <= 0:
        fail("--max_frames=0 (no cap) needs --fps, the rate to read the video at")
    cap = 10 ** 9
seconds = None  # the video time the frames span (for the context check's message)
try:
    if video:  # from the headers: a streamed video is sized before anything is decoded
        n_frames, seconds = data.video_length(video, cap, fps or None)
    if video and not streaming:
        frames = data.load_video(video, side, cap, fps or None)
    elif image:
        frames = data.load_image(image, side, replicate_image_frames)
    elif not video:
        frames, clip_question, reference = shapes.val_clip(shapes_dir, clip, image_size)
except ValueError as e:  # data.py's messages already name the file and what is wrong with it
    fail(e)
if not streaming:
    n_frames = frames.shape[0]  # a time picked twice gives its frame once
    seconds = seconds or float(n_frames)  # an image or a stored clip: a frame a second
if not streaming and n_frames > max_held_frames:
    fail(f"--mode={mode} holds the K/V of all {n_frames} frames at once "
         f"(--max_held_frames={max_held_frames}): "
         f"use --mode=autoregressive, which streams a video of any length, or fewer frames")
prompt = prompt or clip_question or (data.DEFAULT_USER if not image else "Describe this image.")
prompts = [p for p in (prompt, second_prompt) if p]
what = f"{video or image or 'the clip'} with --max_new_tokens={max_new_tokens}"
for p in prompts:
    # token lists: the question before the frames (question first; else empty), the prompt after
    question_tokens, prompt_tokens = data.prompt_parts(tok, p, vlm.layout)
    text_tokens = len(question_tokens) + len(prompt_tokens) + max_new_tokens
    too_long = data.context_error(n_frames, seconds, text_tokens, vlm.llm.cfg.max_seq_len, what)
    if too_long:
        fail(too_long)
print(f"weights: {weights}", file=sys.stderr)
print(f"{n_frames} frames of {side if streaming else frames.shape[-1]}px, mode {mode}",
      file=sys.stderr)
if reference:
    print(f"reference: {reference}", file=sys.stderr)

with torch.no_grad():
    if not streaming:  # one DINOv2 pass serves every prompt
        frames = frames.to(device, ptdtype)  # [T,3,S,S]
        frame_mask = torch.ones(1, len(frames), dtype=torch.bool, device=device)
        kv = vlm.encode(frames[None], frame_mask)
    replies = [(p, *respond(p)) for p in prompts]  # (prompt, answer, Picture)
    if attention_out:
        shown = replies[0][2]
        frame_mask = torch.ones(1, len(shown.frames), dtype=torch.bool, device=device)
        if streaming:  # the shown frames again, for their coarse row: a dozen frames, not the video
            kv = vlm.encode(shown.frames[None], frame_mask)
        _, static_attn = vlm.static_tokens(kv, frame_mask)  # [1,T,layers,H,1+P]
        rows = [("coarse: q_static", static_attn[0])]
        if mode != "coarse_only":
            for i, (_, _, picture) in enumerate(replies):
                label = f"prompt {i + 1}: {mode}" if len(replies) > 1 else f"{mode} glimpse"
                rows.append((label, picture.attn))
        texts = [(p, answer) for p, answer, _ in replies]
        draw_picture(attention_out, shown.frames, rows, vlm.dino.cfg.patch_size, texts,
                     shown.times, attention_layers)
        print(f"wrote {attention_out}", file=sys.stderr)
