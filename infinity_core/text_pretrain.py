"""Caption-parsing pretraining of the tiny T5: the bundled model's stand-in for flan-t5's language
pretraining.

The released Infinity reads flan-t5-xl features that already "understand" a sentence: which colour
word belongs to the object and which to the background. A T5 trained from scratch only through the
image loss learns that slowly (the first bundled model, trained jointly from random weights, mixed
up object and background colours even on training prompts). So before the transformer trains, the
tiny T5 learns to parse the shapes captions, on text alone (no pictures):

    caption --T5--> features [B, L, d] --masked mean--> pooled [B, d] --linear heads--> scene fields
    (background colour; number of objects; per object slot: colour, shape, size, position)
    features --attention read by one learned query per position--> [B, 5, d] --linear heads-->
    colour, shape and size of the object at that position (or "no object there")

The second read is what the transformer's cross-attention must do: a token of the picture that lies
at the top has to find the colour and shape of the object "at the top" among the caption's tokens.
The mean alone can be decoded without the tokens of an object phrase saying where that object is
(the first bundled models painted both objects of "a green star at the top and a white square at
the bottom" in one colour); the position-keyed read teaches each phrase's tokens to carry it. It
helped the bundle's colour, position and counting (MODEL_CARD.md, README), but the transformer
trained on it still gives both objects one colour in most two-colour scenes: the T5 now offers the
binding, the transformer has yet to learn to use it at this budget.

It trains on the captions of the *training* split only (held-out combinations stay unseen, text
included) and reports its parsing accuracy on held-out captions, i.e. whether it generalises to the
combinations the evaluation asks for. The T5 keeps its architecture and file format; only its weights
change, and the heads are thrown away.
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D

# label fields: (name, number of classes); object slots use one extra class "no object"
FIELDS = [("background", len(D.COLOUR_NAMES)), ("count", 2)] + [
    (f"{attr}{slot}", n + 1) for slot in (0, 1)
    for attr, n in (("colour", len(D.COLOUR_NAMES)), ("shape", len(D.SHAPES)), ("size", len(D.SIZES)),
                    ("position", len(D.POSITIONS)))]


def scene_labels(scene: D.Scene) -> list[int]:
    """The class index of every FIELDS entry for one scene (objects in caption order)."""
    out = [D.COLOUR_NAMES.index(scene.background), len(scene.objects) - 1]
    for slot in (0, 1):
        if slot < len(scene.objects):
            o = scene.objects[slot]
            out += [D.COLOUR_NAMES.index(o.colour), D.SHAPES.index(o.shape), D.SIZES.index(o.size),
                    D.POSITIONS.index(o.position)]
        else:
            out += [len(D.COLOUR_NAMES), len(D.SHAPES), len(D.SIZES), len(D.POSITIONS)]
    return out


# per position (in D.POSITIONS order): the object there; one extra class "no object there"
AT_FIELDS = [(f"{attr}@{pos}", n + 1) for pos in D.POSITIONS
             for attr, n in (("colour", len(D.COLOUR_NAMES)), ("shape", len(D.SHAPES)), ("size", len(D.SIZES)))]


def position_labels(scene: D.Scene) -> list[int]:
    """The class index of every AT_FIELDS entry for one scene."""
    at = {o.position: o for o in scene.objects}
    out = []
    for pos in D.POSITIONS:
        o = at.get(pos)
        out += ([D.COLOUR_NAMES.index(o.colour), D.SHAPES.index(o.shape), D.SIZES.index(o.size)] if o else
                [len(D.COLOUR_NAMES), len(D.SHAPES), len(D.SIZES)])
    return out


class ParseHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.sizes = [n for _, n in FIELDS]
        self.proj = nn.Linear(width, sum(self.sizes))
        self.queries = nn.Parameter(torch.randn(len(D.POSITIONS), width) * width ** -0.5)  # [P, d]
        self.key, self.value = nn.Linear(width, width), nn.Linear(width, width)
        self.at_sizes = [n for _, n in AT_FIELDS[:len(AT_FIELDS) // len(D.POSITIONS)]]
        self.at_proj = nn.Linear(width, sum(self.at_sizes))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        m = mask.unsqueeze(-1).to(feats.dtype)                            # [B, L, 1]
        pooled = (feats * m).sum(1) / m.sum(1).clamp_min(1)               # [B, d]
        fields = list(self.proj(pooled).split(self.sizes, dim=-1))        # per field [B, n]
        scores = torch.einsum("pd,bld->bpl", self.queries, self.key(feats)) * feats.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        read = torch.einsum("bpl,bld->bpd", scores.softmax(-1), self.value(feats))   # [B, P, d]
        at = self.at_proj(read).split(self.at_sizes, dim=-1)             # per attribute [B, P, n]
        return fields + [at[a][:, p] for p in range(len(D.POSITIONS)) for a in range(len(at))]


def _parse(model, heads, enc, scenes, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Captions of `scenes` -> (per field logits [B, n], labels [B, F])."""
    ids, mask, _ = enc.tokenize([s.caption() for s in scenes])
    ids, mask = ids.to(device), mask.to(device)
    labels = torch.tensor([scene_labels(s) + position_labels(s) for s in scenes], dtype=torch.long,
                          device=device)                                                      # [B, F]
    feats = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()              # [B, L, d]
    return heads(feats, mask), labels


def parse_accuracy(model, heads, enc, scenes, device) -> float:
    """Fraction of captions whose every field is read right."""
    model.eval()
    with torch.no_grad():
        logits, labels = _parse(model, heads, enc, scenes, device)
        pred = torch.stack([lg.argmax(-1) for lg in logits], dim=1)  # [B, F]
    model.train()
    return float((pred == labels).all(dim=1).float().mean())


def pretrain_caption_parsing(enc, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                             data_seed: int = 0, log=print) -> dict:
    """Train `enc.model` (a T5TextEncoder's encoder, in place) to parse training-split captions.
    Returns {'steps', 'seconds', 'first_loss', 'loss', 'train_parse_acc', 'heldout_parse_acc'}."""
    device = enc.device
    model = enc.model
    model.requires_grad_(True).train()
    torch.manual_seed(seed)
    heads = ParseHeads(enc.width).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.97), weight_decay=0.0)
    rng = random.Random(f"caption-parsing/{data_seed}")
    heldout_rng = random.Random(f"caption-parsing-heldout/{data_seed}")
    heldout = [D.sample_scene(heldout_rng, "heldout") for _ in range(512)]
    t0 = time.time()
    loss, first_loss = torch.zeros(()), None
    for step in range(steps):
        scenes = [D.sample_scene(rng, "train") for _ in range(batch_size)]
        logits, labels = _parse(model, heads, enc, scenes, device)
        loss = sum(F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits))
        cur = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        for g in opt.param_groups:
            g["lr"] = cur
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        first_loss = loss.item() if first_loss is None else first_loss
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"  caption parsing step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    train_check = [D.sample_scene(rng, "train") for _ in range(512)]
    out = {"steps": steps, "seconds": time.time() - t0, "first_loss": first_loss, "loss": loss.item(),
           "position_read": True,  # the per-position attention read (AT_FIELDS) was trained and is scored
           "train_parse_acc": parse_accuracy(model, heads, enc, train_check, device),
           "heldout_parse_acc": parse_accuracy(model, heads, enc, heldout, device)}
    model.requires_grad_(False).eval()
    return out
