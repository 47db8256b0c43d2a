"""``evc train --config CFG.yaml --out DIR``: variable-rate rate-distortion training of an EVC model.

Our recipe (the official one is not published; see docs/evc_training.md): loss ``lambda_k * 255^2 * MSE + bpp`` with
one rate index k per step (per DDP rank) drawn uniformly from the 4 anchors, lambda = (0.0022, 0.0050, 0.012, 0.027);
the q_scale anchors and q_basic are learned with the rest. Quantisation proxy ``mixed`` (noise for the rates,
straight-through rounding for the reconstruction). AdamW, warm-up + cosine LR, gradient clipping, optional AMP,
non-finite steps skipped and counted, JSONL log, periodic validation on a few centre-cropped Kodak images,
atomic checkpoints with everything needed for an exact resume (``--resume``), DDP under ``torchrun``.

The loop (:func:`run_training`) is shared with ``evc decay``, which adds a penalty, a post-step hook and extra
checkpoint state through :class:`Hooks`.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import maskdecay as md

from ..models.architectures import EVC
from ..models.zoo import build_model, save_model
from .config import Config
from .data import RandomCropBatches, StepSampler, list_images, load_val_images

log = logging.getLogger(__name__)

__all__ = ["RDObjective", "Hooks", "Dist", "setup_distributed", "close_distributed", "run_training", "load_resume_checkpoint",
           "validate",
           "train", "param_groups"]

#: checkpoint format version (bumped when the layout changes)
CKPT_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------------------------------------------
class RDObjective(nn.Module):
    """``lambda[rate] * 255^2 * MSE + bpp`` of ``codec`` at its q_scale anchor ``rate``.

    The anchor is indexed inside ``forward`` so that DDP sees every parameter used in the forward pass.
    Returns a dict with ``loss``, ``mse``, ``bpp`` (0-dim tensors) and ``x_hat``.
    """

    def __init__(self, codec: EVC, lambdas: list[float], quant: str = "mixed") -> None:
        super().__init__()
        self.codec = codec
        self.lambdas = [float(v) for v in lambdas]
        self.quant = quant

    def rd_terms(self, x: torch.Tensor, rate: int) -> dict[str, torch.Tensor]:
        """Forward pass and the RD terms (used by subclasses that add distillation)."""
        q = self.codec.q_scale[rate].view(1, 1, 1, 1)
        out = self.codec(x, q, quant=self.quant)
        x_hat = out["x_hat"]
        mse = (x_hat.float() - x.float()).square().mean()
        bpp = (out["bits_y"] + out["bits_z"]).sum() / (x.shape[0] * x.shape[-2] * x.shape[-1])
        return {"loss": self.lambdas[rate] * 255.0 ** 2 * mse + bpp, "mse": mse, "bpp": bpp, "x_hat": x_hat}

    def forward(self, x: torch.Tensor, rate: int) -> dict[str, torch.Tensor]:
        return self.rd_terms(x, rate)


@dataclass
class Hooks:
    """Extension points of :func:`run_training` (used by ``evc decay``).

    penalty: extra loss term added before backward (e.g. ``MaskDecay.penalty``).
    after_step: called after every optimizer step (also after a skipped one), e.g. ``MaskDecay.step``.
    state / load_state: extra checkpoint state (saved under ``"extra"``) and how to restore it.
    log_extra: extra fields for the JSONL log records.
    """

    penalty: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    log_extra: Callable[[], dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """Process placement: rank, world size and device (world 1 = no DDP)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device} but CUDA is not available")
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def close_distributed() -> None:
    """Leave the process group, if this process joined one. DDP's reducer lives in a reference cycle, so it can
    outlive the training function; a gloo worker thread that still holds its Python objects when the interpreter
    shuts down can abort the process ("terminate called without an active exception"). Collecting the garbage first
    frees the reducer while the interpreter is whole."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(codec: EVC, images: torch.Tensor) -> dict[str, list[float]]:
    """Estimated bpp and PSNR (x_hat clamped to [0,1], mean of per-image PSNR) at every q_scale anchor, with hard
    rounding (the model's own quantised forward pass, no entropy coding)."""
    was = codec.training
    codec.eval()
    dev = next(codec.parameters()).device
    res: dict[str, list[float]] = {"bpp": [], "psnr": []}
    for i in range(codec.q_scale.shape[0]):
        bits, psnrs = 0.0, []
        for x in images:
            x = x.unsqueeze(0).to(dev)
            out = codec(x, codec.q_scale[i].view(1, 1, 1, 1), quant="round")
            mse = (out["x_hat"].clamp(0, 1) - x).square().mean()
            psnrs.append(float(-10 * torch.log10(mse.clamp_min(1e-10))))
            bits += float((out["bits_y"] + out["bits_z"]).sum())
        res["bpp"].append(bits / (images.shape[0] * images.shape[-2] * images.shape[-1]))
        res["psnr"].append(sum(psnrs) / len(psnrs))
    codec.train(was)
    return res


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
_NO_DECAY = ("q_scale", "q_basic", "bit_estimator_z.")


def param_groups(codec: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv weights only (not biases, rate parameters or the z entropy model)."""
    dec, no = [], []
    for name, p in codec.named_parameters():
        if not p.requires_grad:
            continue
        (no if p.dim() <= 1 or name.startswith(_NO_DECAY) else dec).append(p)
    return [{"params": dec, "weight_decay": weight_decay}, {"params": no, "weight_decay": 0.0}]


def _lr_lambda(cfg: Config, steps: int) -> Callable[[int], float]:
    o = cfg.optim

    def f(t: int) -> float:
        if o.warmup and t < o.warmup:
            return (t + 1) / o.warmup
        if o.schedule == "constant":
            return 1.0
        p = min(1.0, (t - o.warmup) / max(1, steps - o.warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _gather_rng(d: Dist) -> list[dict[str, torch.Tensor]]:
    mine = {k: v.cpu() for k, v in _rng_state(d.device).items()}
    if d.world == 1:
        return [mine]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def _truncate_log(path: str, step: int) -> None:
    """Drop log records written after ``step`` (a run killed after its last checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step:
                keep.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def _autocast(d: Dist, amp: str) -> Any:
    if amp == "none":
        return torch.autocast(d.device.type, enabled=False)
    if amp == "fp16" and d.device.type != "cuda":
        raise ValueError("train.amp=fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(d.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def load_resume_checkpoint(path: str) -> Any:
    """``torch.load`` of a checkpoint to resume from (``weights_only``); a damaged file gives one clear
    ``ValueError`` naming it instead of the unpickler's message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot resume, the checkpoint is damaged or not one of ours ({first}); "
                         "delete it to start over") from None


def run_training(cfg: Config, objective: RDObjective, out_dir: str, d: Dist, steps: int | None = None,
                 resume: bool = False, stop_after: int | None = None, hooks: Hooks | None = None,
                 optimizer: torch.optim.Optimizer | None = None, desc: str = "train",
                 progress: bool = True, save_init: bool = False, save_final: bool = True) -> dict[str, Any]:
    """Train ``objective.codec`` for ``steps`` optimizer steps (default ``cfg.train.steps``); returns a summary.

    Writes into ``out_dir``: ``log.jsonl`` (one record per ``log_every`` steps, validation records, events),
    ``last.pt`` (checkpoint every ``ckpt_every`` steps and at the end; loadable by ``evc.load_model``) and
    ``model.pt`` (the final weights, ``evc.save_model`` format). With ``resume`` and an existing ``last.pt`` the run
    continues from it exactly (weights, optimizer, LR schedule, GradScaler, RNG of every rank, step, extra state).
    ``stop_after`` ends the run after that step without a final checkpoint (a simulated kill, for tests).
    ``optimizer`` replaces the default AdamW (it must hold the codec's parameters). ``save_init`` also writes the
    untrained weights to ``init.pt`` (the untrained baseline a result can be compared with); ``save_final=False`` skips
    ``model.pt`` (used when the weights are meaningless without extra state, e.g. masks).
    """
    hooks = hooks or Hooks()
    t_cfg = cfg.train
    steps = steps or t_cfg.steps
    codec = objective.codec
    objective.to(d.device)
    opt = optimizer or torch.optim.AdamW(param_groups(codec, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                         betas=tuple(cfg.optim.betas))  # type: ignore[arg-type]
    for g in opt.param_groups:
        g.setdefault("initial_lr", cfg.optim.lr)
        g["lr"] = cfg.optim.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    scaler = torch.amp.GradScaler(d.device.type, enabled=t_cfg.amp == "fp16")
    ckpt_path = os.path.join(out_dir, "last.pt")
    log_path = os.path.join(out_dir, "log.jsonl")
    start, skipped = 0, 0
    list_images(cfg.data.train)  # a missing data folder fails here, before any output exists
    if cfg.val.images:
        list_images(cfg.val.data)
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
    d.barrier()
    if resume and os.path.exists(ckpt_path):
        ck = load_resume_checkpoint(ckpt_path)
        if ck.get("format") != CKPT_FORMAT or ck.get("steps") != steps:
            raise ValueError(f"{ckpt_path}: checkpoint of another run (format {ck.get('format')}, "
                             f"{ck.get('steps')} steps; this run has {steps})")
        codec.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start, skipped = int(ck["step"]), int(ck["skipped"])
        if len(ck["rng"]) == d.world:
            _set_rng_state(ck["rng"][d.rank], d.device)
        else:
            log.warning("checkpoint written by %d ranks, resuming on %d: noise RNG reseeded", len(ck["rng"]), d.world)
            torch.manual_seed(t_cfg.seed + 7919 * d.rank + start)
        if hooks.load_state is not None:
            hooks.load_state(ck.get("extra", {}))
        if d.main:
            _truncate_log(log_path, start)
        log.info("resumed from %s at step %d", ckpt_path, start)
    elif d.main:
        if os.path.exists(log_path):
            os.remove(log_path)
        if save_init:
            save_model(codec, os.path.join(out_dir, "init.pt"))
    d.barrier()
    if d.main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    model: nn.Module = objective
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    per_rank = cfg.data.batch // d.world
    if per_rank < 1 or cfg.data.batch % d.world:
        raise ValueError(f"data.batch={cfg.data.batch} must be a multiple of the world size {d.world}")
    ds = RandomCropBatches(cfg.data.train, cfg.data.crop, per_rank, t_cfg.seed, d.rank, cfg.data.small,
                           cfg.data.hflip, rates=len(t_cfg.lambdas))
    # a private generator: creating the loader's iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=StepSampler(start, steps),
                                         num_workers=cfg.data.workers, pin_memory=d.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(t_cfg.seed))
    val_images = None
    if d.main and cfg.val.images:
        val_images = load_val_images(cfg.val.data, cfg.val.images, cfg.val.crop)

    params = [p for g in opt.param_groups for p in g["params"]]
    bar = None
    if d.main and progress:
        bar = tqdm(total=steps, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True)
    logf = open(log_path, "a") if d.main else None
    if logf is not None and start:
        logf.write(json.dumps({"event": "resume", "step": start}) + "\n")
    t0, step, last_val = time.time(), start, None
    objective.train()
    try:
        for step0, (x, rate) in zip(range(start, steps), loader):
            step = step0 + 1
            x = x.to(d.device, non_blocking=True)
            with _autocast(d, t_cfg.amp):
                out = model(x, rate)
                loss = out["loss"]
                if hooks.penalty is not None:
                    loss = loss + hooks.penalty()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            stats = torch.stack([out["loss"].detach().float(), out["mse"].detach().float(),
                                 out["bpp"].detach().float(), loss.detach().float()]).cpu()
            bad = torch.tensor([float(not (torch.isfinite(gn) and torch.isfinite(stats).all()))])
            if d.world > 1:
                both = torch.cat([stats, bad])
                dist.all_reduce(both)
                stats, bad = both[:4] / d.world, both[4:]
            if bool(bad.item() > 0):
                skipped += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", step, skipped)
                opt.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
            else:
                scaler.step(opt)
                scaler.update()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            if hooks.after_step is not None:
                hooks.after_step()
            with torch.no_grad():
                codec.q_scale.clamp_(min=t_cfg.q_scale_min)
            if d.main and step % t_cfg.log_every == 0:
                mse = float(stats[1])
                rec = {"step": step, "loss": float(stats[0]), "mse": mse, "bpp": float(stats[2]),
                       "psnr": -10 * math.log10(max(mse, 1e-10)), "total": float(stats[3]), "rate": rate,
                       "lr": lr, "grad_norm": float(gn), "skipped": skipped,
                       "time": round(time.time() - t0, 3)}
                if hooks.log_extra is not None:
                    rec.update(hooks.log_extra())
                logf.write(json.dumps(rec) + "\n")  # type: ignore[union-attr]
                logf.flush()  # type: ignore[union-attr]
            if bar is not None:
                bar.set_postfix_str(f"r{rate} loss={float(stats[0]):.3f} bpp={float(stats[2]):.3f} "
                                    f"psnr={-10 * math.log10(max(float(stats[1]), 1e-10)):.2f}", refresh=False)
                bar.update(1)
            if val_images is not None and ((t_cfg.val_every and step % t_cfg.val_every == 0) or step == steps):
                last_val = validate(codec, val_images)
                logf.write(json.dumps({"step": step, "val": last_val}) + "\n")  # type: ignore[union-attr]
                logf.flush()  # type: ignore[union-attr]
            d.barrier()
            if step % t_cfg.ckpt_every == 0 or step == steps:
                _save_checkpoint(ckpt_path, cfg, codec, opt, sched, scaler, step, steps, skipped, d, hooks)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
        if logf is not None:
            logf.close()
    if d.main and step == steps and save_final:
        save_model(codec, os.path.join(out_dir, "model.pt"))
    d.barrier()
    return {"step": step, "steps": steps, "skipped": skipped, "val": last_val, "seconds": time.time() - t0}


def _save_checkpoint(path: str, cfg: Config, codec: EVC, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
                     step: int, steps: int, skipped: int, d: Dist, hooks: Hooks) -> None:
    rng = _gather_rng(d)
    if not d.main:
        d.barrier()
        return
    ck = {"format": CKPT_FORMAT, "state_dict": codec.state_dict(), "config": codec.config,
          "train_config": cfg.to_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "scaler": scaler.state_dict(), "rng": rng, "step": step, "steps": steps, "skipped": skipped,
          "world_size": d.world, "extra": hooks.state() if hooks.state is not None else {}}
    md.atomic_save(ck, path)
    d.barrier()


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def train(cfg: Config, out_dir: str, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> tuple[EVC, dict[str, Any]]:
    """Build ``cfg.model.arch`` (seeded) and train it; returns (model in eval mode, summary)."""
    d = setup_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    codec = build_model(cfg.model.arch)
    torch.manual_seed(cfg.train.seed + 7919 * d.rank)  # per-rank noise stream
    summary = run_training(cfg, RDObjective(codec, cfg.train.lambdas, cfg.train.quant), out_dir, d,
                           resume=resume, stop_after=stop_after, progress=progress, save_init=True)
    return codec.eval(), summary
