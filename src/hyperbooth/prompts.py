"""DreamBooth's prompts (Ruiz et al., "DreamBooth", 2023): a rare token names the subject, its class word keeps the
class prior. Shared by the fine-tune baseline, the training data and the world's prompts."""

from __future__ import annotations

#: The rare token that names a personalized subject in prompts ("a sks dog").
RARE_TOKEN = "sks"


def instance_prompt(class_name: str, token: str = RARE_TOKEN) -> str:
    """The subject images' caption: ``"a sks toy"``."""
    return f"a {token} {class_name}"


def class_prompt(class_name: str) -> str:
    """The class images' caption: ``"a toy"``."""
    return f"a {class_name}"
