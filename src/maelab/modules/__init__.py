"""LightningModules: the training tasks."""
