"""The evaluation harness: DreamBench's protocol and metrics, on real models or the embedded DreamBench-World, for
any registered method (through the Personalizer interface) on any backbone (sampled by ``hyperbooth.generate``).

- :mod:`~hyperbooth.evaluation.dreambench`: the prompts file and the subject folders.
- :mod:`~hyperbooth.evaluation.metrics`: DINO, CLIP-I, CLIP-T, dlib face identity, the world's oracles (their figures
  from :mod:`hyperbooth.world.fidelity`, the world table's code path).
- :mod:`~hyperbooth.evaluation.backends`: the backbone that is sampled (world base model, diffusers pipeline), its
  subjects and prompts.
- :mod:`~hyperbooth.evaluation.methods`: what is evaluated (the floor, any personalizer, a LoRA file per subject).
- :mod:`~hyperbooth.evaluation.protocol`: the run (``hyperbooth eval``); :mod:`~hyperbooth.evaluation.report` its files.

The world's own table (``hyperbooth world eval-personalization``) is :mod:`hyperbooth.world.personalization`.
"""

from hyperbooth.evaluation.dreambench import EvalPrompt, PromptSet, Subject, load_subject, load_subjects, parse_prompts_file
from hyperbooth.evaluation.metrics import Metric, build_metrics

__all__ = ["EvalPrompt", "Metric", "PromptSet", "Subject", "build_metrics", "load_subject", "load_subjects", "parse_prompts_file"]
