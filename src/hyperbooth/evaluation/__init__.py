"""The evaluation harness: DreamBench's protocol and metrics, on real models or the embedded DreamBench-World.

- :mod:`~hyperbooth.evaluation.dreambench`: the prompts file and the subject folders.
- :mod:`~hyperbooth.evaluation.metrics`: DINO, CLIP-I, CLIP-T, dlib face identity, the world's oracles.
- :mod:`~hyperbooth.evaluation.backends`: the model that is sampled (world base model, diffusers pipeline).
- :mod:`~hyperbooth.evaluation.methods`: what is evaluated (the floor, a hypernetwork, a LoRA per subject).
- :mod:`~hyperbooth.evaluation.protocol`: the run (``hyperbooth eval``); :mod:`~hyperbooth.evaluation.report` its files.
"""

from hyperbooth.evaluation.dreambench import EvalPrompt, PromptSet, Subject, load_subject, load_subjects, parse_prompts_file
from hyperbooth.evaluation.metrics import Metric, build_metrics

__all__ = ["EvalPrompt", "Metric", "PromptSet", "Subject", "build_metrics", "load_subject", "load_subjects", "parse_prompts_file"]
