"""Weights in and out: maelab checkpoints written atomically and checked before a resume
(``checkpoints``), checkpoints users already have (``pretrained``: maelab .ckpt, official MAE
.pth), and the timm layout (``timm``)."""
