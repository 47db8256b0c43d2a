"""``evc rrl --teacher LL.pt --base SS.pt --out DIR``: a scalable encoder by residual representation learning.

Our reading of the paper's RRL (the exact training is not published; see docs/evc_training.md):

* the **base** is a single-encoder student with an S encoder (``EVC_SS`` or ``EVC_SL`` from ``evc decay``): it gives
  encoder 0, the shared decoder, the entropy model and the q_scale anchors of ``Scale_EVC_SS`` / ``Scale_EVC_SL``;
* for k = 1, 2, 3, encoder k is obtained by **decaying the large teacher encoder again** (mask decay to the S widths)
  while the model is trained on candidate k = (y_0 + ... + y_{k-1} + y_k) / (k+1) with encoders 0..k-1 frozen
  (their outputs carry no gradient, as in the official candidate formula), so encoder k learns the residual that
  the earlier encoders leave; the decoder side stays frozen, so the earlier levels keep their rate-distortion;
* after export + fine-tuning, encoder k's weights go to ``encs.k`` of the scalable model, whose state dict loads
  strictly into our ``ScalableEVC`` (the official ``Scale_EVC_*`` layout): ``OUT/scalable.pt``.

Each level runs ``decay.steps`` decay steps and ``decay.finetune_steps`` fine-tuning steps (same loss: RD +
output distillation from the teacher). Levels are written to ``OUT/level{k}/``; ``--resume`` skips finished levels
and resumes a decay phase exactly (an interrupted fine-tuning restarts from the level's exported encoder).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

import maskdecay as md

from ..models.architectures import EVC, WIDTHS, ScalableEVC
from ..models.zoo import build_model, load_model, save_model
from .config import Config
from .decay import DistillObjective, attach_masks, decay_and_export, frozen, make_optimizer, prepare_run, stage_plan
from .train import load_resume_checkpoint, run_training

__all__ = ["scalable_name", "ResidualCandidate", "run_rrl"]


def scalable_name(base: EVC) -> str:
    """``[mini_]Scale_EVC_SS`` or ``[mini_]Scale_EVC_SL`` for a base student with an S encoder."""
    div = {192: 1, 48: 4}.get(base.N)
    if div is None:
        raise ValueError(f"base latent width N={base.N} is neither the full (192) nor the mini (48) scale")
    size = {tuple(w // div for w in WIDTHS[k]): k for k in ("S", "M", "L")}
    if size.get(tuple(base.enc_widths)) != "S":
        raise ValueError(f"the base must have an S encoder (an EVC_SS or EVC_SL student), got encoder widths "
                         f"{list(base.enc_widths)}")
    dec = size.get(tuple(base.dec_widths))
    if dec not in ("S", "L"):
        raise ValueError(f"the base decoder must be S or L (Scale_EVC_SS / Scale_EVC_SL), got {list(base.dec_widths)}")
    return ("mini_" if div == 4 else "") + f"Scale_EVC_S{dec}"


class ResidualCandidate:
    """Forward hook for the trainable encoder k: its output y_k becomes (y_0 + ... + y_{k-1} + y_k) / (k+1), the
    earlier (frozen) encoders run without gradient."""

    def __init__(self, previous: list[nn.Module]) -> None:
        self.previous = previous

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            acc = sum(enc(inputs[0]) for enc in self.previous)
        return (acc + out) / (len(self.previous) + 1)


def _composite(enc_widths: tuple[int, ...], base: EVC, enc_state: dict[str, torch.Tensor]) -> EVC:
    """An EVC with the given encoder weights and the base's decoder side, only the encoder trainable."""
    comp = EVC(enc_widths, base.dec_widths, N=base.N, anchor_num=base.anchor_num)
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith("enc.")}
    sd.update({f"enc.{k}": v for k, v in enc_state.items()})
    comp.load_state_dict(sd, strict=True)
    for name, p in comp.named_parameters():
        p.requires_grad_(name.startswith("enc."))
    return comp.to(next(base.parameters()).device).train()


def run_rrl(cfg: Config, base_path: str, out_dir: str, resume: bool = False, stop_after: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Build the scalable model level by level (see the module docstring); returns a summary."""
    dc, d, teacher = prepare_run(cfg, "rrl")
    base = frozen(load_model(base_path, device=d.device))
    name = scalable_name(base)
    if base.N != teacher.N or any(b > t for b, t in zip(base.enc_widths, teacher.enc_widths)):
        raise ValueError(f"base {list(base.enc_widths)} (N={base.N}) does not fit under the teacher's encoder "
                         f"{list(teacher.enc_widths)} (N={teacher.N})")
    scal = build_model(name, anchor_num=base.anchor_num)
    assert isinstance(scal, ScalableEVC)
    scal.load_state_dict(base.state_dict(), strict=True)  # enc.* fills every encs.i (official rule)
    scal.to(d.device)
    teacher_enc = {k[len("enc."):]: v for k, v in teacher.state_dict().items() if k.startswith("enc.")}
    summary: dict[str, Any] = {"arch": name, "levels": {}, "done": False}
    for k in range(1, scal.enc_num):
        level_dir = os.path.join(out_dir, f"level{k}")
        enc_path = os.path.join(level_dir, "encoder.pt")
        if resume and os.path.exists(enc_path):
            scal.encs[k].load_state_dict(load_resume_checkpoint(enc_path), strict=True)
            continue
        previous = [frozen(copy.deepcopy(scal.encs[j])) for j in range(k)]
        exported = os.path.join(level_dir, "exported.pt")
        torch.manual_seed(cfg.train.seed + 1000 * k + 7919 * d.rank)
        if resume and os.path.exists(exported):
            ck = load_resume_checkpoint(exported)
            comp = _composite(base.enc_widths, base, ck["encoder"])
            comp.enc.register_forward_hook(ResidualCandidate(previous))
            opt = make_optimizer(comp, cfg, ck["optimizer"])
        else:
            comp = _composite(teacher.enc_widths, base, teacher_enc)
            comp.enc.register_forward_hook(ResidualCandidate(previous))
            masks = attach_masks(comp, reduce_enc=True, reduce_dec=False)
            plan = stage_plan(masks, comp, base.enc_widths, comp.dec_widths, dc.importance)
            res = decay_and_export(cfg, comp, teacher, masks, plan, os.path.join(level_dir, "decay"), d, resume,
                                   stop_after, progress)
            if res is None:
                return summary
            opt, decay, _ = res
            if d.main:
                md.atomic_save({"encoder": comp.enc.state_dict(), "optimizer": opt.state_dict()}, exported)
                with open(os.path.join(level_dir, "history.json"), "w") as f:
                    json.dump(decay.history, f)
        if dc.finetune_steps:
            objective = DistillObjective(comp, teacher, cfg.train.lambdas, cfg.train.quant, dc.distill_output, 0.0)
            ft = run_training(cfg, objective, os.path.join(level_dir, "finetune"), d, steps=dc.finetune_steps,
                              optimizer=opt, desc=f"level {k} finetune", progress=progress, save_final=False)
            summary["levels"][k] = {"val": ft["val"], "seconds": ft["seconds"]}
        scal.encs[k].load_state_dict(comp.enc.state_dict(), strict=True)  # S-encoder layout, exactly
        if d.main:
            md.atomic_save(comp.enc.state_dict(), enc_path)
        d.barrier()
    final = os.path.join(out_dir, "scalable.pt")
    if d.main:
        save_model(scal.cpu().eval(), final)
    d.barrier()
    summary.update(done=True, path=final)
    return summary
