"""The quick-start demo of docs/quickstart.md: ``python -m maskdecay_examples.quickstart.demo``."""
