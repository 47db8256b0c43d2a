"""ResNet/CIFAR-10 example: mask decay (sparsity loss, L1, L2, BN-L1, group lasso, hard) against Torch-Pruning's
pruners at equal MAC budgets, steps and seeds. Run ``python -m maskdecay_examples.resnet --help``; see
docs/resnet_results.md."""
