"""Datamodules (uint8 images + labels) and on-device transforms."""
