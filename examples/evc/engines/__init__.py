"""Inference engines: the :class:`~.base.Engine` interface, the reference engine (eager float32 modules, exact
float64 twins), the fast engine (fused channels-last float transforms, the channels-last exact twin) and the CPU
kernels they use."""
