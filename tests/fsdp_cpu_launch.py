"""`python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml
tests/fsdp_cpu_launch.py train ...`: mogrpo under accelerate's FSDP2 on CPU processes (gloo).

Test-only. accelerate takes its FSDP path only on accelerator devices and runs CPU
processes as plain DDP, while torch's FSDP2 itself shards on CPU with gloo. This launcher
switches accelerate's state to FSDP (with the plugin the config file describes, read from
the variables `accelerate launch` sets) right after the Accelerator is built, so the
product's sharded code (prepare, gathered sampling, gathered saving, sharded resume) runs
in CI as it runs on GPUs. Nothing of mogrpo is replaced."""

import sys

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # Both shared states: AcceleratorState copies PartialState's fields each time it is built.
    PartialState().distributed_type = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    # from the FSDP_* variables of the config file
    state.fsdp_plugin = FullyShardedDataParallelPlugin()


accelerate.Accelerator.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from mogrpo.cli import main

    sys.exit(main(sys.argv[1:]))
