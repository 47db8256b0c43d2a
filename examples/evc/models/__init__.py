"""EVC models: layers, the architectures and their registry, the entropy bottleneck, building and checkpoint
loading."""
