"""EVC neural image codec (ICLR 2023 "EVC: Towards Real-Time Neural Image Compression with Mask Decay").

Our own implementation, state-dict compatible with the official inference code. Quick use::

    from maskdecay_examples import evc
    model = evc.load_model("EVC_SS_MD.pth.tar")          # or evc.build_model("EVC_SS") for random weights
    x, _, _ = evc.load_image("kodim01.png")
    res = evc.compress(model, x, evc.select_rate(model, q=0.5))
    out = evc.decompress(model, res.data).x_hat

Sub-packages (imports flow downwards only): :mod:`.cli` (the ``evc`` command and its tools) -> :mod:`.training`
and :mod:`.coding` -> :mod:`.engines` -> :mod:`.models`. See ARCHITECTURE.md.
"""
from .cli.imageio import load_image, save_image
from .coding.bitstream import BitstreamError, Header
from .coding.codec import (MAX_DECODE_MEMORY, MAX_DECODE_PIXELS, DecodeResult, EncodeResult, compress, decompress,
                           reconstruct, weights_hash)
from .coding.rate import RateSpec, select_rate
from .models.architectures import ARCHS, EVC, WIDTHS, ScalableEVC
from .models.zoo import CheckpointError, build_model, infer_config, load_model, save_model

__all__ = [
    "ARCHS",
    "WIDTHS",
    "EVC",
    "ScalableEVC",
    "build_model",
    "load_model",
    "save_model",
    "infer_config",
    "CheckpointError",
    "BitstreamError",
    "Header",
    "RateSpec",
    "select_rate",
    "compress",
    "decompress",
    "MAX_DECODE_PIXELS",
    "MAX_DECODE_MEMORY",
    "reconstruct",
    "EncodeResult",
    "DecodeResult",
    "load_image",
    "save_image",
    "weights_hash",
]
