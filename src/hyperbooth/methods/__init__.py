"""Personalization methods behind one interface (:class:`~hyperbooth.methods.base.Personalizer`) and their registry.

    personalizer = hyperbooth.methods.load("runs/e2e_world/hypernet")   # the class its config names
    weights = personalizer.personalize(references, backbone)            # LoRAWeights, one subject per row

Registered here: ``e2e`` (:mod:`~hyperbooth.methods.e2e`), ``hyperdreambooth``
(:mod:`~hyperbooth.methods.hyperdreambooth`), ``hyperlora`` (:mod:`~hyperbooth.methods.hyperlora`), ``hyperlora-released`` (the released HyperLoRA SDXL models,
imported by :mod:`~hyperbooth.methods.hyperlora_import`) and ``dreambooth-lora`` (:mod:`~hyperbooth.methods.dreambooth_lora`, the
per-subject fine-tune baseline). A new method is one module whose
class is decorated with :func:`~hyperbooth.methods.base.register`; importing it registers it.
"""

from hyperbooth.methods.base import CONFIG_NAME, METHODS, WEIGHTS_NAME, Personalizer, TrainBatch, get, load, read_config, register
from hyperbooth.methods.dreambooth_lora import DreamBoothLoRA, FinetuneConfig
from hyperbooth.methods.e2e import SHIPPED_E2E, E2EConfig, E2EHyperNetwork
from hyperbooth.methods.hyperdreambooth import SHIPPED_HYPERDREAMBOOTH, HyperDreamBooth, HyperDreamBoothConfig
from hyperbooth.methods.hyperlora import SHIPPED_HYPERLORA, HyperLoRA, HyperLoRAConfig
from hyperbooth.methods.hyperlora_import import ReleasedHyperLoRA, ReleasedHyperLoRAConfig, import_released_hyperlora

__all__ = ["CONFIG_NAME", "METHODS", "SHIPPED_E2E", "SHIPPED_HYPERDREAMBOOTH", "SHIPPED_HYPERLORA", "WEIGHTS_NAME", "DreamBoothLoRA", "E2EConfig", "E2EHyperNetwork",
           "FinetuneConfig", "HyperDreamBooth", "HyperDreamBoothConfig", "HyperLoRA", "HyperLoRAConfig", "Personalizer",
           "ReleasedHyperLoRA", "ReleasedHyperLoRAConfig", "import_released_hyperlora", "TrainBatch", "get", "load", "read_config", "register"]
