"""``python -m hyperbooth ...`` under accelerate's FSDP2 on CPU processes (gloo), for the tests. accelerate turns FSDP on
for GPU launches only, so this driver flips each process's CPU ``Accelerator`` to FSDP with a
``FullyShardedDataParallelPlugin(fsdp_version=2)`` as the engine creates it; from there on everything is accelerate's
and torch's own FSDP2 code (``fully_shard`` on a gloo device mesh). Run it with two processes:
``python -m torch.distributed.run --nproc_per_node 2 tests/train/fsdp_on_cpu.py train ...``."""

import sys

import accelerate
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import hyperbooth.train.engine as engine
from hyperbooth.cli import main


class FSDPOnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.num_processes > 1, "run this driver with torch.distributed.run --nproc_per_node 2"
        PartialState().distributed_type = DistributedType.FSDP  # both shared states (accelerate reads either)
        self.state.distributed_type = DistributedType.FSDP
        # the config's policy (what configs/accelerate/fsdp.yaml gives); the engine replaces it with the root-only wrap
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                                auto_wrap_policy="size_based_wrap", min_num_params=1000)
        if self.state.mixed_precision != "no":  # as accelerate's own FSDP set-up does (the engine replaces the policy)
            plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.fsdp_plugin = plugin

    def prepare(self, *args):
        prepared = super().prepare(*args)
        from torch.distributed.tensor import DTensor

        module = next(p for p in prepared if isinstance(p, torch.nn.Module))
        trained = [p for p in module.parameters() if p.requires_grad]
        assert trained and all(isinstance(p, DTensor) for p in trained), "FSDP2 did not shard the prepared module"
        print("fsdp-check: every trained parameter is a DTensor shard", file=sys.stderr)
        return prepared


engine.Accelerator = FSDPOnCPU
sys.exit(main(sys.argv[1:]))
