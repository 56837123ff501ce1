"""Training: the shared pieces (EMA, schedules, atomic checkpoints) and the trainers built on them."""
