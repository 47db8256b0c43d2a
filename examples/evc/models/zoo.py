"""The architecture registry's loader: build a registered variant, save a model, and load any EVC checkpoint
(official or ours) as a state dict with ``weights_only=True``, inferring the variant from the tensor shapes."""
from __future__ import annotations

import io
import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..fileio import atomic_write_bytes
from .architectures import ARCHS, EVC, WIDTHS, ScalableEVC, name_for

log = logging.getLogger(__name__)

__all__ = ["build_model", "CheckpointError", "extract_state_dict", "infer_config", "load_model", "save_model"]


def build_model(arch: str, **kwargs: Any) -> EVC:
    """Build a registered architecture with random weights, e.g. ``build_model("EVC_SS")``.

    Extra keyword arguments (``N``, ``anchor_num``, ``enc_num``) are passed to the constructor. ``arch`` may also be
    ``"mini_<name>"``: the same variant with every width (and N) divided by 4, for fast experiments.
    """
    div = 1
    base = arch
    if arch.startswith("mini_"):
        div, base = 4, arch[len("mini_"):]
    if base not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)} (optionally 'mini_' prefixed)")
    e, d, scalable = ARCHS[base]
    enc = [w // div for w in WIDTHS[e]]
    dec = [w // div for w in WIDTHS[d]]
    N = kwargs.pop("N", 192 // div)
    name = arch
    cls = ScalableEVC if scalable else EVC
    return cls(enc, dec, N=N, name=name, **kwargs)



class CheckpointError(ValueError):
    """A file or dict that is not a usable EVC checkpoint."""


def extract_state_dict(obj: Any, prefer: str = "student") -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``net`` containers, strip ``module.`` and pick ``student.``/``teacher.`` sub-dicts.

    Args:
        obj: a loaded checkpoint object.
        prefer: which sub-model to use when both ``student.*`` and ``teacher.*`` keys are present.
    """
    for _ in range(3):
        if isinstance(obj, Mapping) and not _looks_like_sd(obj):
            for key in ("state_dict", "net", "model", "model_state_dict", "network"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError("checkpoint does not contain a state dict")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    prefixes = {p for p in ("student.", "teacher.") if any(k.startswith(p) for k in sd)}
    if prefixes:
        pick = f"{prefer}." if f"{prefer}." in prefixes else sorted(prefixes)[0]
        sub = {k[len(pick):]: v for k, v in sd.items() if k.startswith(pick)}
        # keys without a prefix (e.g. a shared q_scale) are kept unless the sub-dict has them
        for k, v in sd.items():
            if not k.startswith(("student.", "teacher.")):
                sub.setdefault(k, v)
        sd = sub
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors")
    return sd


def _looks_like_sd(d: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}")
    return tuple(sd[key].shape)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer constructor arguments (widths, N, anchors, scalable, enc_num) from tensor shapes."""
    N = _shape(sd, "q_basic")[1]
    anchor_num = _shape(sd, "q_scale")[0]
    scalable = any(k.startswith("encs.") for k in sd)
    if scalable:
        enc_num = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("encs."))
        ep = "encs.0."
    else:
        enc_num = 0
        ep = "enc."
    enc = (
        _shape(sd, ep + "0.conv1.weight")[0],
        _shape(sd, ep + "2.conv1.weight")[0],
        _shape(sd, ep + "4.conv1.weight")[0],
        _shape(sd, ep + "6.weight")[0],
    )
    dec = (
        _shape(sd, "dec.5.conv.weight")[0],
        _shape(sd, "dec.3.conv.weight")[0],
        _shape(sd, "dec.1.conv.weight")[0],
        _shape(sd, "dec.0.block.0.conv1.0.weight")[0],
    )
    cfg: dict[str, Any] = {"enc_widths": enc, "dec_widths": dec, "N": N, "anchor_num": anchor_num,
                           "scalable": scalable}
    if scalable:
        cfg["enc_num"] = enc_num
    cfg["name"] = name_for(enc, dec, N, scalable)
    return cfg


def _build_from_config(cfg: Mapping[str, Any]) -> EVC:
    kw = dict(enc_widths=cfg["enc_widths"], dec_widths=cfg["dec_widths"], N=cfg["N"],
              anchor_num=cfg["anchor_num"], name=cfg.get("name"))
    if cfg.get("scalable"):
        return ScalableEVC(enc_num=cfg.get("enc_num", 4), **kw)
    return EVC(**kw)


def load_model(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    arch: str | None = None,
    device: str | torch.device = "cpu",
    prefer: str = "student",
) -> EVC:
    """Load an EVC checkpoint (official or ours) and return the model in eval mode.

    Args:
        path_or_state_dict: a checkpoint path (loaded with ``weights_only=True``) or an already-loaded object.
        arch: a registered architecture name; None infers the variant from the tensor shapes.
        device: where to put the model.
        prefer: ``"student"`` or ``"teacher"`` for checkpoints holding both.

    Raises:
        ValueError (:class:`CheckpointError`): one clear message if the input is not a loadable EVC checkpoint.
    """
    src = "state dict"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        src = os.fspath(path_or_state_dict)
        if not os.path.isfile(src):
            raise CheckpointError(f"{src}: no such checkpoint file")
        try:
            obj = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{src}: not an EVC checkpoint ({msg[:200]})") from None
    else:
        obj = path_or_state_dict
    try:
        sd = extract_state_dict(obj, prefer=prefer)
        cfg = infer_config(sd) if arch is None else None
    except CheckpointError as e:
        raise CheckpointError(f"{src}: not an EVC checkpoint ({e})") from None
    dropped = [k for k in sd if _ignorable(k)]
    if dropped:
        log.warning("ignoring %d entropy-coder buffers in the checkpoint (e.g. %s); tables are rebuilt from the "
                    "weights", len(dropped), dropped[0])
        sd = {k: v for k, v in sd.items() if k not in dropped}
    if arch is None:
        model = _build_from_config(cfg)  # type: ignore[arg-type]
    else:
        model = build_model(arch, anchor_num=_shape(sd, "q_scale")[0] if "q_scale" in sd else 4)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing, unexpected, mism = _diff(model, sd)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mism:
            parts.append(f"{len(mism)} shape mismatches (e.g. {mism[0]})")
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise CheckpointError(f"{src}: does not match architecture {model.name}: {detail}") from None
    model.to(device).eval()
    log.info("loaded %s (%s) from %s", model.name, "x".join(map(str, model.enc_widths)), src)
    return model


_IGNORABLE_PREFIXES = ("gaussian_encoder.", "entropy_coder.")
_IGNORABLE_SUFFIXES = ("_quantized_cdf", "_cdf_length", "_offset", "scale_table", "quantized_cdf", "cdf_length")


def _ignorable(key: str) -> bool:
    """Derived entropy-coder state (CDF tables, offsets, scale tables) that some checkpoints carry as buffers; we
    rebuild all of it from the weights, so such keys are not an architecture mismatch."""
    return key.startswith(_IGNORABLE_PREFIXES) or key.rsplit(".", 1)[-1].endswith(_IGNORABLE_SUFFIXES)


def _diff(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    if isinstance(model, ScalableEVC) and any(k.startswith("enc.") for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("enc.")}
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mism = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mism


def save_model(model: EVC, path: str | os.PathLike[str]) -> None:
    """Save ``{"state_dict": ..., "config": ...}`` atomically (loadable by :func:`load_model` and by the
    official ``get_state_dict`` convention)."""
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "config": model.config}, buf)
    atomic_write_bytes(path, buf.getvalue())
