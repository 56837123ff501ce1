"""Training: the engine that trains any registered method on any backbone (``engine``: ``hyperbooth train``), its
data (``data``: the world's pairs, photo folders), the world's base-model trainer (``base``: ``hyperbooth
train-base``), and the pieces they share — the optimizer and lr schedule (``optim``), EMA (``ema``), atomic
checkpoints (``state``) and LoRA-aware gradient checkpointing of the UNet (``grad_checkpoint``)."""
