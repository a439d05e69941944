"""Fully sharded data parallel training (``trainer=fsdp``, ``trainer=fsdp_cpu``): the strategy and its checks."""
from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy

#: the blocks each made one shard group: a DiT's transformer blocks, a U-Net's residual and attention blocks
FSDP_UNITS = ("diffexp.nets.dit.DiTBlock", "diffexp.nets.layers.ResBlock", "diffexp.nets.layers.AttentionBlock",
              "diffexp.nets.layers.TransformerBlock")
#: callbacks that need the whole model on one process (they read or swap every weight, or sample on rank 0)
WHOLE_MODEL_CALLBACKS = ("EMA", "SampleGrid", "DenoisingGrid", "FIDCallback")


def fsdp_strategy(reshard_after_forward: bool = True, cpu_offload: bool = False,
                  units: tuple[str, ...] | list[str] = FSDP_UNITS, **options):
    """``trainer=fsdp``'s strategy: :class:`FullyShardedStrategy` (FSDP2 through Lightning's
    ``ModelParallelStrategy``), every block of ``units`` its own shard group."""
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"trainer.strategy.reshard_after_forward must be true (free each block's gathered weights "
                         f"after its forward, as ZeRO-3) or false (keep them until the backward, as ZeRO-2), got "
                         f"{reshard_after_forward!r}")
    if not isinstance(cpu_offload, bool):
        raise ValueError(f"trainer.strategy.cpu_offload must be true or false, got {cpu_offload!r}")
    return FullyShardedStrategy(reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload,
                                units=tuple(units), **options)


class FullyShardedStrategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023) over every
    process, on GPUs (NCCL) or CPU processes (gloo).

    Parameters, gradients and AdamW state are split over the processes: each block named in ``units`` (and then
    the rest of the net) is one shard group, whose full weights are all-gathered just before it runs and freed
    after (``reshard_after_forward``); gradients are reduce-scattered. Only the trained net is sharded; frozen
    text encoders and autoencoders stay whole on every process. Checkpoints are full: gathered to rank 0 and
    written by the safe checkpoint writer as one file that resumes on any number of processes (every process
    reads it and keeps its shard). Built on Lightning's ``ModelParallelStrategy`` with the data-parallel mesh
    spanning the whole world."""

    def __init__(self, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 units: tuple[str, ...] = FSDP_UNITS, **options):
        super().__init__(save_distributed_checkpoint=False, **options)
        self.reshard_after_forward, self.cpu_offload, self.units = reshard_after_forward, cpu_offload, units

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def shard(self, net) -> None:
        """Apply ``fully_shard`` to each block of ``units`` in ``net``, then to ``net`` (its remaining weights)."""
        from hydra.utils import get_class
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kinds = tuple(get_class(name) for name in self.units)
        options = {"mesh": self.device_mesh["data_parallel"], "reshard_after_forward": self.reshard_after_forward}
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for module in list(net.modules()):
            if module is not net and isinstance(module, kinds) and any(p.requires_grad for p in module.parameters()):
                fully_shard(module, **options)
        fully_shard(net, **options)

    # Resume: the checkpoint is read once by the safe reader (no code runs), brought to the current format by the
    # module's on_load_checkpoint, then each process takes its shard of the full weights and optimizer state.
    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        return self.checkpoint_io.load_checkpoint(checkpoint_path)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, checkpoint["state_dict"],
                             options=StateDictOptions(full_state_dict=True, strict=strict))

    def load_optimizer_state_dict(self, checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            # saved keyed by parameter index (as a plain optimizer's); the loader wants parameter names
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))


def is_sharded(trainer) -> bool:
    return isinstance(trainer.strategy, FullyShardedStrategy)


def check_sharded_callbacks(trainer, callbacks: list) -> None:
    """Under FSDP no process holds the whole model between steps: refuse the callbacks that need it, by name."""
    if not is_sharded(trainer):
        return
    refused = [type(c).__name__ for c in callbacks if type(c).__name__ in WHOLE_MODEL_CALLBACKS]
    if refused:
        raise ValueError(f"trainer=fsdp shards the weights over processes; callbacks {refused} need the whole model on "
                         f"one process (EMA, sampling). Add callbacks=fsdp (checkpoints, lr monitor, divergence "
                         f"guard), then sample from the checkpoint with sample.py")
