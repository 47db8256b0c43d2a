"""The fast engine: fused channels-last float transforms (:mod:`.fused`) and the bit-identical channels-last exact
twin (:mod:`.fast_exact`) behind the :class:`~.base.Engine` interface.

Two kinds of networks run in a codec, with different rules: the float transforms (analysis ``enc``, ``hyper_enc``,
and the synthesis ``dec`` when ``--fast-synthesis`` is asked for) feed nothing that the decoder must recompute, so
any precision and kernel order is allowed; the entropy-parameter networks (``hyper_dec``, ``y_prior_fusion``,
``y_spatial_prior``) and the default exact synthesis must give the encoder's numbers bit for bit, and run as exact
float64 twins.

:class:`FastEngine` serves :func:`~..coding.codec.compress` / :func:`~..coding.codec.decompress` /
:func:`~..coding.codec.reconstruct` (``engine=`` argument). Bitstreams from a FastEngine decode with the reference
engine and vice versa; the entropy parameters are identical. The float analysis differs from the eager float32
analysis by float noise, so a rounding of y may occasionally flip: the stream is then a different (equally valid)
stream; ``impl="eager"`` keeps the model's own modules for the float transforms and gives byte-identical streams.

GPU options: ``dtype`` float16/bfloat16 for the float transforms, ``cuda_graphs=True`` (one captured graph per input
shape for each float transform and each exact network), ``compile=True`` (``torch.compile`` of the float
transforms). The exact networks always run in float64 on integers.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .base import state_key
from .fast_exact import FastExactNet
from .fused import EagerTransform, FastTransform, Runner
from .kernels import native_bf16, native_fp16
from .nhwc import to_nchw, to_nhwc

__all__ = ["FastEngine", "DTYPES", "resolve_impl"]

#: names accepted for the float-transform precision
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The float-transform implementation that ``impl="auto"`` stands for, the faster one on the device:

    * ``"eager"`` (cuDNN's NCHW kernels) for float32 on CUDA, where cuDNN beats the fused executor for most models
      and sizes;
    * ``"fused"`` everywhere else: on the CPU it is the fast path, and on CUDA with fp16/bf16 and CUDA graphs it
      beats eager.

    Explicit ``"fused"`` / ``"eager"`` pass through."""
    if impl not in ("auto", "fused", "eager"):
        raise ValueError(f"impl must be 'auto', 'fused' or 'eager', got {impl!r}")
    if impl != "auto":
        return impl
    return "eager" if device.type == "cuda" and dtype == torch.float32 else "fused"


class FastEngine:
    """The networks a codec run uses, in their fast form (see the module docstring). Interface of
    :class:`~.reference.ReferenceEngine` (:class:`~.base.Engine`).

    Args:
        model: an EVC model in eval mode (weights are snapshotted; rebuild the engine after changing them).
        dtype: precision of the float transforms (analysis, hyper_enc, float synthesis): ``torch.float32``
            (default), ``float16`` or ``bfloat16``. The exact networks always run in float64 on integers.
        impl: ``"fused"`` (:class:`FastTransform`, channels-last by construction), ``"eager"``
            (:class:`EagerTransform`: the model's own modules; with float32 and no other option the streams are
            byte-identical to the reference engine's), or ``"auto"`` (default): the faster of the two for the
            device and dtype, see :func:`resolve_impl`.
        channels_last: ``impl="eager"`` only: channels-last memory format.
        compile, kernels: see :class:`FastTransform` (float transforms only).
        cuda_graphs: on CUDA, replay captured graphs for the float transforms and for the exact networks (per input
            shape; the exact networks give the same numbers either way).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, impl: str = "auto",
                 channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False,
                 kernels: bool = True) -> None:
        dev = next(model.parameters()).device
        if dev.type == "cpu" and ((dtype == torch.bfloat16 and not native_bf16())
                                  or (dtype == torch.float16 and not native_fp16())):
            log.warning("%s on this CPU is emulated (no %s instructions): several times slower than float32; use "
                        "float32 here", dtype,
                        "AVX512_BF16/AMX-BF16" if dtype == torch.bfloat16 else "AVX512_FP16/AMX-FP16")
        self.impl = resolve_impl(impl, dev, dtype)
        self.model = model
        self.key = state_key(model)
        self.dtype = dtype
        self.device = dev

        self._opts = dict(compile=compile, cuda_graphs=cuda_graphs)
        self.channels_last = channels_last
        self.kernels = kernels
        self.scalable = bool(getattr(model, "scalable", False))
        self._encs = [self.transform(e) for e in (model.encs if self.scalable else [model.enc])]
        self._hyper_enc = self.transform(model.hyper_enc)
        self._dec = self.transform(model.dec)
        self.hyper_dec = FastExactNet(model.hyper_dec, dev, cuda_graphs=cuda_graphs)
        self.fusion = FastExactNet(model.y_prior_fusion, dev, cuda_graphs=cuda_graphs)
        self.spatial_net = FastExactNet(model.y_spatial_prior, dev, cuda_graphs=cuda_graphs)
        self.synthesis_net = FastExactNet(model.dec, dev, cuda_graphs=cuda_graphs)

    def transform(self, module: nn.Module) -> Runner:
        """A float runner of ``module`` with this engine's options (any EVC transform or prior network)."""
        if self.impl == "fused":
            return FastTransform(module, self.dtype, self.device, kernels=self.kernels, **self._opts)
        return EagerTransform(module, self.dtype, self.device, channels_last=self.channels_last, **self._opts)

    # -- the Engine interface ----------------------------------------------------------------------------------
    def latents(self, xp: torch.Tensor, enc_id: int | None) -> torch.Tensor:
        """Candidate latents (K,B,N,h,w) like ``ReferenceEngine.latents``."""
        if not self.scalable:
            return self._encs[0](xp).unsqueeze(0)
        last = len(self._encs) - 1 if enc_id is None else int(enc_id)
        if not 0 <= last < len(self._encs):
            raise ValueError(f"enc_id must be in 0..{len(self._encs) - 1}, got {enc_id}")
        outs, acc = [], None
        for i in range(last + 1):
            yi = self._encs[i](xp)
            acc = yi if acc is None else acc + yi
            outs.append(acc / (i + 1))
        return outs[-1].unsqueeze(0) if enc_id is not None else torch.stack(outs, 0)

    def hyper_enc(self, y: torch.Tensor) -> torch.Tensor:
        """hyper_enc of y / curr_q, before rounding."""
        return self._hyper_enc(y)

    def prior(self, z_hat64: torch.Tensor) -> torch.Tensor:
        """Exact fusion(hyper_dec(z)) in float64, NCHW (channels-last strides)."""
        return to_nchw(self.fusion.nhwc(self.hyper_dec.nhwc(to_nhwc(z_hat64))))

    def spatial(self, inp: torch.Tensor) -> torch.Tensor:
        """Exact y_spatial_prior in float64."""
        return self.spatial_net(inp)

    def synthesis(self, y64: torch.Tensor, exact: bool) -> torch.Tensor:
        """Image (before clamping) from the dequantised latent: exact twin, or the float transform."""
        if exact:
            return self.synthesis_net(y64)
        return self._dec(y64)
