"""``evc decay --teacher CKPT --student EVC_SS --regularizer sparsity --out DIR``: teacher -> student with mask decay.

1. The teacher (any single-encoder EVC checkpoint, e.g. the output of ``evc train``) is loaded twice: a frozen copy
   for distillation and a trainable copy that gets :class:`maskdecay.ChannelMasks` on its analysis/synthesis
   transforms. The latent width (the encoder's last conv, the decoder's first block, the last sub-pixel conv) and
   the whole entropy model (hyper encoder/decoder, prior fusion, spatial prior, z model) are never pruned.
2. The plan keeps, in every channel group of stage i, ``size * C_i(student) / C_i(teacher)`` units (the student's
   widths: M = [128,128,192,192], S = [64,64,128,192]; ``mini_`` = widths / 4), most important first.
3. ``decay.steps`` steps of RD training + distillation + the regularizer's penalty; the masks of removed channels
   reach exactly 0; ``maskdecay.export`` removes them (optimizer state remapped) and the state dict is loaded
   **strictly** into a plain ``EVC_<student>`` (the official small-model layout).
4. ``decay.finetune_steps`` steps of fine-tuning of that plain student; ``OUT/student.pt`` is the result
   (``evc.load_model`` / ``evc encode --model OUT/student.pt``).

Encoder-only (ML, SL), decoder-only (LM, LS) and both (MM, SS) students. Phases write to ``OUT/decay`` and
``OUT/finetune``; ``--resume`` continues either phase exactly.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import torch
from torch import nn

import maskdecay as md

from ..models.architectures import ARCHS, EVC, WIDTHS
from ..models.zoo import build_model, load_model, save_model
from .config import Config
from .train import Dist, Hooks, RDObjective, load_resume_checkpoint, param_groups, run_training, setup_distributed

log = logging.getLogger(__name__)

__all__ = ["student_spec", "attach_masks", "stage_plan", "DistillObjective", "prepare_run", "make_optimizer",
           "frozen", "decay_and_export", "run_decay"]

#: module index inside ``enc``/``dec`` -> stage (0 = C1 ... 2 = C3); the last stage (C4 = latent) is never pruned
_STAGE = {"enc": {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}, "dec": {1: 2, 2: 2, 3: 1, 4: 1, 5: 0, 6: 0}}


def student_spec(teacher: EVC, student: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(architecture name, encoder widths, decoder widths) of ``student`` at the teacher's scale.

    ``EVC_SS`` under a mini teacher (N = 48) means ``mini_EVC_SS``. Raises ``ValueError`` if the student is not
    narrower than the teacher or the teacher's scale is neither full nor mini."""
    base = student[len("mini_"):] if student.startswith("mini_") else student
    if base not in ARCHS or ARCHS[base][2]:
        raise ValueError(f"unknown student {student!r}")
    div = {192: 1, 48: 4}.get(teacher.N)
    if div is None:
        raise ValueError(f"teacher latent width N={teacher.N} is neither the full (192) nor the mini (48) scale")
    if student.startswith("mini_") and div != 4:
        raise ValueError(f"student {student} is a mini model but the teacher is full-size")
    e, dsz, _ = ARCHS[base]
    enc = tuple(w // div for w in WIDTHS[e])
    dec = tuple(w // div for w in WIDTHS[dsz])
    for part, s, t in (("encoder", enc, teacher.enc_widths), ("decoder", dec, teacher.dec_widths)):
        if any(a > b for a, b in zip(s, t)):
            raise ValueError(f"student {base} {part} widths {list(s)} exceed the teacher's {list(t)}")
    if enc == tuple(teacher.enc_widths) and dec == tuple(teacher.dec_widths):
        raise ValueError(f"student {base} has the teacher's widths: nothing to decay")
    return ("mini_" if div == 4 else "") + base, enc, dec


def attach_masks(model: EVC, reduce_enc: bool, reduce_dec: bool, side: int = 64) -> Any:
    """ChannelMasks on the analysis/synthesis transforms only (the entropy model is not traced, hence not masked)."""
    ignored: list[nn.Module] = [model.enc[6], model.dec[0], model.dec[7]]
    if not reduce_enc:
        ignored.append(model.enc)
    if not reduce_dec:
        ignored.append(model.dec)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    return md.ChannelMasks(model, (x,), ignored_layers=ignored, forward_fn=lambda m, inp: m.dec(m.enc(inp[0])))


def _stage(layer: str) -> tuple[str, int]:
    part, idx = layer.split(".")[:2]
    if part not in _STAGE or int(idx) not in _STAGE[part]:
        raise ValueError(f"layer {layer!r} is outside the prunable stages")
    return part, _STAGE[part][int(idx)]


def stage_plan(masks: Any, teacher: EVC, enc: tuple[int, ...], dec: tuple[int, ...], importance: str = "l1") -> Any:
    """A width plan from per-stage widths: every group of stage i keeps ``size * student_i / teacher_i`` units.

    The group of a stage is found from the layers that *produce* its channels (all in one stage; checked)."""
    widths = {}
    for g in masks.groups:
        stages = {_stage(m.name) for m in g.members if m.role == "out"}
        if len(stages) != 1:
            raise ValueError(f"group {g.name!r} spans stages {sorted(stages)}; cannot map it to one student width")
        part, i = stages.pop()
        s, t = (enc[i], teacher.enc_widths[i]) if part == "enc" else (dec[i], teacher.dec_widths[i])
        if (g.size * s) % t:
            raise ValueError(f"group {g.name!r}: {g.size} units cannot be scaled by {s}/{t}")
        widths[g.name] = g.size * s // t
    return md.plan(masks, widths=widths, importance=importance)


class DistillObjective(RDObjective):
    """RD loss of the student plus distillation from a frozen teacher at the same rate index.

    ``distill_output``: ``w * lambda * 255^2 * MSE(x_hat_student, x_hat_teacher)`` (teacher with hard rounding);
    ``distill_latent``: ``w * mean(((y_student - y_teacher) / q_teacher)^2)``, the analysis outputs compared in
    units of the teacher's quantisation step (meaningful when the encoder is reduced).
    """

    def __init__(self, codec: EVC, teacher: EVC, lambdas: list[float], quant: str, distill_output: float,
                 distill_latent: float) -> None:
        super().__init__(codec, lambdas, quant)
        self.teacher = teacher
        self.w_out, self.w_lat = float(distill_output), float(distill_latent)
        self._y: dict[str, torch.Tensor] = {}
        if self.w_lat:
            codec.enc.register_forward_hook(lambda m, i, o: self._y.__setitem__("s", o))
            teacher.enc.register_forward_hook(lambda m, i, o: self._y.__setitem__("t", o))

    def train(self, mode: bool = True) -> "DistillObjective":
        """Train mode for the student only; the frozen teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor, rate: int) -> dict[str, torch.Tensor]:
        out = self.rd_terms(x, rate)
        if not (self.w_out or self.w_lat):
            return out
        with torch.no_grad():
            qt = self.teacher.q_scale[rate].view(1, 1, 1, 1)
            t_hat = self.teacher(x, qt, quant="round")["x_hat"]
        extra = out["x_hat"].new_zeros((), dtype=torch.float32)
        if self.w_out:
            extra = extra + self.w_out * self.lambdas[rate] * 255.0 ** 2 * (out["x_hat"].float() - t_hat.float()
                                                                              ).square().mean()
        if self.w_lat:
            step = self.teacher.curr_q(qt).detach()
            extra = extra + self.w_lat * ((self._y["s"].float() - self._y["t"].float()) / step).square().mean()
        out["loss"] = out["loss"] + extra
        return out


def _regularizer(dc: Any) -> Any:
    if not dc.strength or dc.regularizer == "hard":
        return dc.regularizer
    return md.regularizers.REGULARIZERS[dc.regularizer](strength=dc.strength)


def frozen(m: EVC) -> EVC:
    """``m`` in eval mode with every parameter frozen (a teacher, or a finished level of a scalable encoder)."""
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def prepare_run(cfg: Config, command: str) -> tuple[Any, Dist, EVC]:
    """The common start of ``evc decay`` and ``evc rrl``: checks that a teacher is configured, sets up the
    (distributed) device and the thread count, loads the frozen teacher. Returns (``cfg.decay``, Dist, teacher)."""
    if cfg.decay is None or not cfg.decay.teacher:
        raise ValueError(f"evc {command} needs a teacher checkpoint (--teacher or decay.teacher)")
    d = setup_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return cfg.decay, d, frozen(load_model(cfg.decay.teacher, device=d.device))


def make_optimizer(model: nn.Module, cfg: Config, state: dict[str, Any] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with the config's settings, optionally restored from
    ``state`` (an exported optimizer state)."""
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas))  # type: ignore[arg-type]
    if state is not None:
        opt.load_state_dict(state)
    return opt


def decay_and_export(cfg: Config, model: EVC, teacher: EVC, masks: Any, plan: Any, phase_dir: str, d: Dist,
                     resume: bool, stop_after: int | None, progress: bool) -> tuple[Any, Any, dict] | None:
    """Run the decay phase on ``model`` (masked by ``masks``; only its trainable parameters are optimised), then
    ``md.export`` it in place. Returns (optimizer with remapped state, MaskDecay, run summary), or None if stopped
    before the masks reached 0."""
    dc = cfg.decay
    decay = md.MaskDecay(masks, plan, steps=dc.steps, schedule=dc.schedule, regularizer=_regularizer(dc),
                         mask_lr=dc.mask_lr, mask_grad_clip=dc.mask_grad_clip or None)
    hooks = Hooks(penalty=decay.penalty, after_step=decay.step, state=decay.state_dict,
                  load_state=decay.load_state_dict,
                  log_extra=lambda: {"ceiling": decay.ceiling, "removed_max": decay.history["removed_max"][-1],
                                     "kept_min": decay.history["kept_min"][-1]})
    opt = make_optimizer(model, cfg)
    objective = DistillObjective(model, teacher, cfg.train.lambdas, cfg.train.quant, dc.distill_output,
                                 dc.distill_latent)
    summary = run_training(cfg, objective, phase_dir, d, steps=dc.steps, resume=resume, stop_after=stop_after,
                           hooks=hooks, optimizer=opt, desc=f"decay {dc.regularizer}", progress=progress,
                           save_final=False)
    if not decay.done:
        return None
    md.export(model, masks, optimizer=opt)
    return opt, decay, summary


def _decay_phase(cfg: Config, teacher: EVC, name: str, enc: tuple[int, ...], dec: tuple[int, ...], out_dir: str,
                 d: Dist, resume: bool, stop_after: int | None, progress: bool) -> dict[str, Any] | None:
    """Mask decay, export, strict load into the plain student; returns the exported checkpoint dict (also written
    to ``OUT/exported.pt``), or None if stopped early."""
    torch.manual_seed(cfg.train.seed)
    model = copy.deepcopy(teacher).train()
    for p in model.parameters():
        p.requires_grad_(True)
    masks = attach_masks(model, enc != tuple(teacher.enc_widths), dec != tuple(teacher.dec_widths))
    plan = stage_plan(masks, teacher, enc, dec, cfg.decay.importance)
    torch.manual_seed(cfg.train.seed + 7919 * d.rank)
    res = decay_and_export(cfg, model, teacher, masks, plan, os.path.join(out_dir, "decay"), d, resume,
                           stop_after, progress)
    if res is None:
        return None
    opt, decay, summary = res
    student = build_model(name, anchor_num=teacher.anchor_num)
    student.load_state_dict(model.state_dict(), strict=True)  # the official small-model layout, exactly
    ck = {"state_dict": student.state_dict(), "config": student.config, "optimizer": opt.state_dict(),
          "plan": plan.to_dict(), "decay_summary": {k: v for k, v in summary.items() if k != "val"}}
    if d.main:
        md.atomic_save(ck, os.path.join(out_dir, "exported.pt"))
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(decay.history, f)
        with open(os.path.join(out_dir, "plan.json"), "w") as f:
            json.dump(plan.to_dict(), f)
    d.barrier()
    return ck


def run_decay(cfg: Config, out_dir: str, resume: bool = False, stop_after: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """The whole ``evc decay`` pipeline (see the module docstring); returns a summary."""
    dc, d, teacher = prepare_run(cfg, "decay")
    name, enc, dec = student_spec(teacher, dc.student)
    exported_path = os.path.join(out_dir, "exported.pt")
    if resume and os.path.exists(exported_path):
        ck = load_resume_checkpoint(exported_path)
    else:
        ck = _decay_phase(cfg, teacher, name, enc, dec, out_dir, d, resume, stop_after, progress)
        if ck is None:
            return {"student": name, "done": False}
    student = build_model(name, anchor_num=teacher.anchor_num)
    student.load_state_dict(ck["state_dict"], strict=True)
    final = os.path.join(out_dir, "student.pt")
    summary: dict[str, Any] = {"student": name, "done": True, "plan_ratio": ck["plan"]["macs"] / ck["plan"]["teacher_macs"]}
    if dc.finetune_steps:
        student.to(d.device).train()
        opt = make_optimizer(student, cfg, ck["optimizer"])
        torch.manual_seed(cfg.train.seed + 1 + 7919 * d.rank)
        objective = DistillObjective(student, teacher, cfg.train.lambdas, cfg.train.quant, dc.distill_output,
                                     dc.distill_latent)
        remaining = None if stop_after is None else max(1, stop_after - dc.steps)
        ft = run_training(cfg, objective, os.path.join(out_dir, "finetune"), d, steps=dc.finetune_steps,
                          resume=resume, stop_after=remaining, optimizer=opt, desc="finetune", progress=progress)
        summary["finetune"] = ft
        if ft["step"] < dc.finetune_steps:
            summary["done"] = False
            return summary
    if d.main:
        save_model(student.cpu().eval(), final)
    d.barrier()
    summary["path"] = final
    return summary
