"""The engine interface and the per-model caches: both engines implement :class:`Engine`, the codec refuses anything
else, and the coding context lives in a cache beside the model (not on it) that neither keeps the model alive nor
serves stale weights."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from maskdecay_examples import evc
from maskdecay_examples.evc.coding.codec import coding_context
from maskdecay_examples.evc.engines.base import Engine, ModelCache, state_key
from maskdecay_examples.evc.engines.fast import FastEngine
from maskdecay_examples.evc.engines.reference import ReferenceEngine


@pytest.fixture
def mini():
    torch.manual_seed(0)
    return evc.build_model("mini_EVC_SS").eval()


def test_both_engines_implement_the_interface(mini):
    for eng in (ReferenceEngine(mini), FastEngine(mini)):
        assert isinstance(eng, Engine) and eng.model is mini and eng.key == state_key(mini)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match="Engine interface"):
        evc.compress(mini, x, evc.select_rate(mini), engine=object())  # type: ignore[arg-type]


def test_coding_context_is_cached_beside_the_model(mini):
    ctx = coding_context(mini)
    assert coding_context(mini) is ctx
    assert not any("ctx" in k for k in vars(mini))  # nothing hidden on the model
    with torch.no_grad():
        mini.bit_estimator_z.f1.h.add_(0.1)  # new weights: new tables and hash
    assert coding_context(mini).weights_hash != ctx.weights_hash


def test_model_cache_holds_models_weakly():
    built = []
    cache: ModelCache[int] = ModelCache(lambda m: built.append(m) or len(built))
    m = torch.nn.Linear(2, 2)
    assert cache.get(m) == cache.get(m) == 1
    ref = weakref.ref(m)
    del m
    built.clear()
    gc.collect()
    assert ref() is None
