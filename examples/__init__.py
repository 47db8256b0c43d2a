"""maskdecay_examples: the example applications of :mod:`maskdecay`, installed as one package.

* :mod:`.evc` -- the EVC neural image codec (train, mask decay, RRL, real bitstreams, fast inference).
* :mod:`.resnet` -- CIFAR ResNet pruning: mask decay against Torch-Pruning baselines.
* :mod:`.quickstart` -- the small quick-start demo.
* :mod:`.cifar` -- CIFAR-10 loading shared by the two CIFAR examples; :mod:`.hostinfo` -- host probes for
  benchmark records.
"""
