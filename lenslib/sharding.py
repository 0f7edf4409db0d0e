"""DeepSpeed ZeRO-3: parameters sharded over processes, gathered where code reads them.

ZeRO-3 keeps only a shard of every parameter on each process and gathers a module's weights
while DeepSpeed's hooks run that module's `forward`. Code that reads parameters any other way
(generation token by token, evaluation, SAM2 reading its token embeddings directly, saving)
must gather them itself: `zero3_gathered`. Without DeepSpeed every function here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from accelerate import Accelerator
from torch import nn


def zero3_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 holds sharded right now (placeholders on this rank)."""
    from_zero = [p for p in params if hasattr(p, "ds_id")]
    if not from_zero:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in from_zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


@contextmanager
def zero3_gathered(
    params: Iterable[nn.Parameter], engine=None, fwd_module: nn.Module | None = None
) -> Iterator[None]:
    """Whole parameters inside the block, under DeepSpeed ZeRO-3 (a no-op otherwise).

    ZeRO-3 shards every parameter; a module's own shards are gathered only while DeepSpeed's
    hooks run that module's `forward`. Code that reads parameters in any other way (generation,
    evaluation before or after `prepare`, SAM's token embeddings read by `predict_masks`) must
    gather them first. All ranks must enter together (it is a collective). `engine`: the
    DeepSpeed engine the parameters belong to; its per-module hooks are taken off inside the
    block (as TRL does for generation), so that one gather serves every decoding step instead
    of each module re-gathering and releasing its weights on every token. `fwd_module`: a
    module being run by the engine that uses the parameters; DeepSpeed then gathers them for
    its backward pass too (`deepspeed.zero.register_external_parameter`).
    """
    params = zero3_params(params)
    if not params:
        yield
        return
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    with deepspeed.zero.GatheredParameters(params, fwd_module=fwd_module):
        if offload is not None:
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if offload is not None:
                for p in offload.module.parameters():
                    p.ds_active_sub_modules.clear()
                if not offload.param_coordinator.is_invalid_trace():  # the module order changed
                    offload.param_coordinator._invalidate_trace()
                offload._register_deepspeed_module(offload.module)


def deepspeed_engine(accelerator: Accelerator | None, model: nn.Module):
    """The DeepSpeed engine `accelerator.prepare` wrapped around `model` (None without
    DeepSpeed or before `prepare`): the stages prepare the model inside, so their callers
    hold the LensModel, not its engine."""
    prepared = getattr(accelerator, "_models", [])
    engines = [m for m in prepared if getattr(m, "module", None) is model]
    return engines[-1] if engines and hasattr(engines[-1], "optimizer") else None
