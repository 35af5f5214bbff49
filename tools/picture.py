"""
sample.py's picture of where the glimpses looked: one column per frame (.png) or one animation
frame per video frame (.gif); rows: the frame, then a heatmap row per glimpse kind.
"""
import math
import textwrap
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data import MEAN, STD, uniform_indices

Picture = namedtuple("Picture", "frames attn times")  # frames [K,3,S,S], attn [K,layers,H,1+P]


class ContactSheet:
    """model.stream's on_frames: keeps the frames (and their glimpses' attention) a picture shows,
    all of a short video, `sheet_frames` evenly spaced of a long one, labelled with their mm:ss."""

    def __init__(self, n_frames, sheet_frames, seconds):
        self.n_frames, self.seconds, self.kept, self.seen = n_frames, seconds, [], 0
        self.long = n_frames > sheet_frames
        count = sheet_frames if self.long else n_frames
        self.shown_at = set(uniform_indices(n_frames, count))

    def keep(self, pixels, attn):  # pixels [n,3,S,S], attn [1,n,layers,H,1+P]: one walker
        for i in range(pixels.shape[0]):
            if self.seen + i in self.shown_at:
                self.kept.append((self.seen + i, pixels[i], attn[0, i]))
        self.seen += pixels.shape[0]

    def picture(self, device, dtype):
        if not self.kept:
            return None
        seconds = [int(i * self.seconds / self.n_frames) for i, _, _ in self.kept]
        times = [f"{t // 60}:{t % 60:02d}" for t in seconds] if self.long else None
        frames = torch.stack([f for _, f, _ in self.kept]).to(device, dtype)
        return Picture(frames, torch.stack([a for _, _, a in self.kept]), times)

INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                   dtype=np.float32)


def colormap(h):
    """h [...] in [0,1] -> uint8 [...,3], piecewise linear through the five stops"""
    x = np.clip(h, 0, 1) * (len(INFERNO) - 1)
    i = np.minimum(x.astype(int), len(INFERNO) - 2)
    f = (x - i)[..., None]
    return (INFERNO[i] * (1 - f) + INFERNO[i + 1] * f).astype(np.uint8)


def heatmaps(attn, grid, cell, layers):
    """attn [T,layers,heads,1+P] from the glimpse -> [T,cell,cell] in [0,1]: the mean over heads
    and the last `layers` layers, each map divided by its peak"""
    a = attn[:, -layers:].float().mean((1, 2))  # [T,1+P]
    a = a[:, 1:].reshape(-1, 1, *grid)  # CLS dropped: [T,1,gh,gw]
    a = a / a.amax((2, 3), keepdim=True).clamp(min=1e-12)
    a = F.interpolate(a, size=(cell, cell), mode="bilinear", align_corners=False)
    return a[:, 0].cpu().numpy()


def draw_picture(path, frames, rows, patch_size, texts, times=None, layers=4):
    """frames [T,3,S,S] normalised; rows: [(label, attn [T,layers,heads,1+P])]; texts: [(prompt,
    answer)], written under the images. Writes a .png or .gif. times: each frame's label (a contact
    sheet's mm:ss) instead of its number; layers: the late DINOv2 layers the heatmaps average."""
    T, _, S, _ = frames.shape
    cell = S * math.ceil(160 / S)  # 64px synthetic frames become 192px: legible
    grid = (S // patch_size, S // patch_size)
    rgb = (frames.float().cpu() * STD + MEAN).clamp(0, 1)  # undo ImageNet normalisation
    rgb = F.interpolate(rgb, size=(cell, cell), mode="bilinear", align_corners=False)
    rgb = rgb.permute(0, 2, 3, 1).numpy() * 255  # [T,cell,cell,3] in 0..255
    cells = [[Image.fromarray(f.astype(np.uint8)) for f in rgb]]  # row 0: the frames themselves
    for _, attn in rows:
        blended = [0.45 * f + 0.55 * colormap(h) for f, h in zip(rgb, heatmaps(attn, grid, cell, layers))]
        cells.append([Image.fromarray(b.astype(np.uint8)) for b in blended])
    labels = ["frame"] + [label for label, _ in rows]
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font has no size
        font = ImageFont.load_default()

    def tag(img, xy, text):  # white text on a black box, readable on any frame
        if not text:
            return
        d = ImageDraw.Draw(img)
        d.rectangle(d.textbbox(xy, text, font=font), fill=(0, 0, 0))
        d.text(xy, text, fill=(255, 255, 255), font=font)

    def canvas(w, h_images):  # white sheet with the prompts and answers wrapped under the images
        numbered = len(texts) > 1
        paragraphs = [line for i, (prompt_text, answer) in enumerate(texts)
                      for line in (f"prompt{f' {i + 1}' if numbered else ''}: {prompt_text}\n"
                                   f"answer: {answer}").split("\n")]
        lines = [line for para in paragraphs for line in textwrap.wrap(para, w // 7) or [""]]
        img = Image.new("RGB", (w, h_images + 8 + 17 * len(lines)), (255, 255, 255))
        for i, line in enumerate(lines):
            ImageDraw.Draw(img).text((6, h_images + 4 + 17 * i), line, fill=(0, 0, 0), font=font)
        return img

    if path.lower().endswith(".gif"):  # an animation frame per video frame: [frame | coarse | mode]
        sheets = []
        for t in range(T):
            sheet = canvas(cell * len(cells), cell)
            for r, row in enumerate(cells):
                sheet.paste(row[t], (r * cell, 0))
                when = times[t] if times else f"{t + 1}/{T}"
                tag(sheet, (r * cell + 3, 3), labels[r] + (f" {when}" if r == 0 else ""))
            sheets.append(sheet)
        sheets[0].save(path, save_all=True, append_images=sheets[1:], duration=600, loop=0)
    else:  # one column per frame, one row per glimpse kind
        sheet = canvas(cell * T, cell * len(cells))
        for r, row in enumerate(cells):
            for t, img in enumerate(row):
                sheet.paste(img, (t * cell, r * cell))
                number = times[t] if times else f"{t + 1}"
                # the row's label in column 0, except a contact sheet's row 0, which shows times
                label = labels[r] if t == 0 and not (times and r == 0) else ""
                tag(sheet, (t * cell + 3, r * cell + 3), label or (number if r == 0 else ""))
        sheet.save(path)
