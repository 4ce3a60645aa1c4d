"""Several processes (torchrun): the process group, the collectives the trainers share, and FSDP2 contexts.

Every helper here works with one process too (no process group): the collectives then return their input.
The trainers keep their processes in step by deciding every skip and stop through `any_process`, so that no
process waits forever in a collective the others have left.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch

__all__ = ["all_gather", "all_max", "all_mean", "all_sum", "all_sums", "any_process", "average_gradients",
           "broadcast_object", "ddp_wrap", "fsdp_unsharded", "full_tensor", "init_distributed",
           "load_optimizer_state", "local_device", "optimizer_state", "parameters_on_meta", "patch_backbones",
           "rank_and_world", "shard_from_rank0", "shard_like", "too_big_for_one_gpu", "weights_on_this_process",
           "whole_on_rank0"]


def _env_world_size() -> int:
    """$WORLD_SIZE (torchrun sets it), 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_cuda_index() -> int:
    """This process's GPU: $LOCAL_RANK, or 0 when the launcher shows each process only its own GPU (SLURM with a
    CUDA_VISIBLE_DEVICES per task: cuda:$LOCAL_RANK does not exist there)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return 0 if torch.cuda.device_count() == 1 else local


def local_device(name: str, *, field: str = "model.device") -> torch.device:
    """The device a process trains on: "auto" -> this process's GPU (cuda:$LOCAL_RANK, or cuda:0 when it sees one
    GPU) when CUDA is there, else the CPU; "cuda" under torchrun -> the same GPU. A CUDA device asked for on a
    machine without one, or one GPU named for every process of a torchrun, is a ValueError naming `field`."""
    if name == "auto":
        return torch.device(f"cuda:{_local_cuda_index()}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{field}: {name!r} asked for, but torch sees no CUDA device")
    if name.startswith("cuda") and _env_world_size() > 1:
        if name != "cuda" and torch.cuda.device_count() > 1:
            raise ValueError(f"{field}: {name!r} would put every process of the torchrun on one GPU (NCCL refuses "
                             "that); use auto or cuda: each process takes cuda:$LOCAL_RANK")
        return torch.device(f"cuda:{_local_cuda_index()}")
    return torch.device(name)


def dist_timeout() -> timedelta:
    """How long a collective may wait for the slowest process before the job is aborted: $FUSEDRL_DIST_TIMEOUT_MIN
    minutes (default 60; NCCL's own default, 10, is shorter than rank 0 writing a large full fine-tuning checkpoint
    or one rank generating long completions while the others wait)."""
    value = os.environ.get("FUSEDRL_DIST_TIMEOUT_MIN", "60")
    try:
        minutes = float(value)
    except ValueError:
        raise ValueError(f"FUSEDRL_DIST_TIMEOUT_MIN must be a number of minutes, got {value!r}") from None
    if not minutes > 0:
        raise ValueError(f"FUSEDRL_DIST_TIMEOUT_MIN must be > 0, got {value!r}")
    return timedelta(minutes=minutes)


def init_distributed(cuda: bool) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) starts the default process group if it is not
    started yet: NCCL when `cuda` (and selects this process's GPU), gloo on the CPU; collectives wait up to
    `dist_timeout()`."""
    import torch.distributed as dist

    if _env_world_size() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(_local_cuda_index())
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dist_timeout())
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world() -> int:
    return rank_and_world()[1]


def all_sums(values: Iterable[float], device: torch.device) -> list[float]:
    """Each value summed over every process, in one all-reduce."""
    values = [float(v) for v in values]
    if _world() == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum(value: float, device: torch.device) -> float:
    """The sum of `value` over every process."""
    return all_sums([value], device)[0]


def all_gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every process's tensor (equal shapes), concatenated along dim 0 in rank order, on the CPU."""
    if _world() == 1:
        return t.detach().cpu()
    import torch.distributed as dist

    local = t.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def all_gather_objects(items: list) -> list:
    """Every process's list (picklable items), concatenated in rank order."""
    if _world() == 1:
        return list(items)
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def all_mean(metrics: dict[str, float], keys: Iterable[str], device: torch.device) -> None:
    """metrics[k] <- its mean over every process, for k in keys (in place; every process passes the same keys)."""
    keys = list(keys)
    if _world() == 1 or not keys:
        return
    import torch.distributed as dist

    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    for k, v in zip(keys, (t / dist.get_world_size()).tolist()):
        metrics[k] = v


def all_max(value: float, device: torch.device) -> float:
    """The largest `value` over every process."""
    if _world() == 1:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every process; `obj` itself with one process."""
    if _world() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on any: the guards skip a step on all processes together."""
    if _world() == 1:
        return bool(flag)
    return all_sum(1.0 if flag else 0.0, device) > 0


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """p.grad <- its mean over every process (one flat all-reduce per dtype and device), for parameters that
    no DDP / FSDP wrapper covers. A parameter without a gradient contributes zeros (every process must take
    part in the same collectives)."""
    world = _world()
    if world == 1:
        return
    import torch.distributed as dist

    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for _key, ps in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (DTensor; a collective: call it on every process), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# A model to be sharded waits on the CPU only when, whole, it would take more than this share of one GPU: on the
# GPU it costs no host memory (on the CPU, every process of a node holds a copy), and the rest of the GPU is needed
# beside it until it is sharded.
WHOLE_ON_GPU_SHARE = 0.5


def too_big_for_one_gpu(nbytes: int, device: torch.device) -> bool:
    """True when `nbytes` (a whole model before FSDP2 shards it) exceed WHOLE_ON_GPU_SHARE of `device`'s memory."""
    if device.type != "cuda":
        return False
    return nbytes > WHOLE_ON_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, the parameters of modules being built go to the meta device as they are registered (no memory held,
    no initialisation computed); buffers (rotary frequency tables, positional embeddings) stay real. A parameter
    assigned twice (tied embeddings) stays one parameter. For the processes of an FSDP2 job that take their weights
    from rank 0 (`shard_from_rank0`): a 14B model loaded by each of 8 processes of a node held 8 host copies."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def weights_on_this_process(module: torch.nn.Module) -> bool:
    """False when `module`'s parameters wait on the meta device (built by `parameters_on_meta`) for rank 0's."""
    return not any(p.is_meta for p in module.parameters())


def _parameters_to_meta(module: torch.nn.Module) -> None:
    """Every parameter of `module` replaced by a meta one (tied parameters stay tied); the old tensors live on only
    where something else holds them."""
    meta: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                sub._parameters[name] = meta[id(p)]


def _layout(module: torch.nn.Module) -> list[tuple[str, str, tuple[int, ...], str]]:
    return ([("parameter", n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()]
            + [("buffer", n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers()])


def shard_from_rank0(module: torch.nn.Module, shard: Callable[[torch.nn.Module], None], device: torch.device) -> None:
    """Shard `module` with `shard` (its FSDP2 `fully_shard` calls) and give every process its part of rank 0's
    weights. A collective: every process calls it with a module of the same structure.

    Rank 0 holds the module's weights (loaded, on the CPU or a GPU); the other processes may hold the same module
    built with `parameters_on_meta` (the weights are read once, by rank 0), or loaded too (rank 0's win, as
    DistributedDataParallel's do). Each parameter is broadcast whole from rank 0 in turn (one whole tensor on
    `device` at a time) and every process keeps its shard; buffers come from rank 0 too. A module whose parameter or
    buffer names, shapes or dtypes differ from rank 0's is a ValueError naming the first difference.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank, world = rank_and_world()
    ours = _layout(module)
    layouts: list = [None] * world
    dist.all_gather_object(layouts, ours)
    for r, theirs in enumerate(layouts):
        if theirs != layouts[0]:
            first = next((a, b) for a, b in zip(layouts[0] + [None], theirs + [None]) if a != b)
            raise ValueError(f"process {r}'s model differs from rank 0's, which gives every process its weights: "
                             f"rank 0 has {first[0]}, process {r} {first[1]}")
    whole = {n: p.detach() for n, p in module.named_parameters()} if rank == 0 else {}
    buffers = {n: b.detach() for n, b in module.named_buffers()} if rank == 0 else {}
    _parameters_to_meta(module)
    shard(module)
    module.to_empty(device=device)  # this process's shards, and its buffers, uninitialised until filled below
    no_comm = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = whole.pop(name).to(device) if rank == 0 else torch.empty(p.shape, dtype=p.dtype, device=device)
            dist.broadcast(value, src=0)
            if isinstance(p, DTensor):  # every process has the whole value now: each takes its part, no collective
                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements, **no_comm).to_local())
            else:
                p.copy_(value)
            del value
        for name, b in module.named_buffers():
            value = buffers[name].to(b.device) if rank == 0 else b
            dist.broadcast(value, src=0)
            if value is not b:
                b.copy_(value)


def patch_backbones(models: list[torch.nn.Module], *, weights_from_rank0: bool) -> list[Any]:
    """`fusedrl.patch_backbone` of each model (its `BackbonePatch`). With `weights_from_rank0` (a collective): rank 0
    probes, and the processes whose models wait on the meta device for rank 0's weights replay its probes, so that
    every process fuses the same modules."""
    from fusedrl.backbone import patch_backbone

    first = rank_and_world()[0] == 0
    patches = [patch_backbone(m) for m in models] if first or not weights_from_rank0 else []
    if weights_from_rank0:
        replays = broadcast_object([p.probes for p in patches] if first else None)
        if not first:
            patches = [patch_backbone(m, replay=r) for m, r in zip(models, replays, strict=True)]
    return patches


def whole_on_rank0(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: the whole tensor on the CPU} on rank 0, {} on the other processes: FSDP2 shards are gathered one at a
    time (a collective: every process calls it with the same names) and only rank 0 keeps a host copy (every rank
    copying a 12B-parameter model to host memory at each save ran the node out of it)."""
    keep = rank_and_world()[0] == 0
    out = {}
    for name, t in tensors:
        whole = full_tensor(t.detach())
        if keep:
            out[name] = whole.cpu()
        del whole
    return out


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) as `param` holds it: this process's shard when `param` is an FSDP2 DTensor."""
    value = value.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def optimizer_state(optimizer: torch.optim.Optimizer, sharded_model: torch.nn.Module | None = None) -> dict:
    """The optimizer's state dict, whole. With `sharded_model` (the FSDP2 module its parameters belong to): gathered
    to the CPU and keyed by parameter name (a collective: every process calls it)."""
    if sharded_model is None:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(sharded_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict,
                         sharded_model: torch.nn.Module | None = None) -> None:
    """Restore what `optimizer_state` returned (with `sharded_model`, each process takes its shards): the state
    (moments, step counts) comes from the checkpoint, while the hyperparameters (lr, betas, eps, weight decay) stay
    those `optimizer` was built with, i.e. the run's config, which `--resume --allow-change optim.lr` may have
    changed (a plain `load_state_dict` would put the saved ones back)."""
    built_with = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    if sharded_model is None:
        optimizer.load_state_dict(state)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        if _keyed_by_index(state):  # saved by one process (optimizer.state_dict()), resumed on several
            state = _keyed_by_name(state, optimizer, sharded_model)
        set_optimizer_state_dict(sharded_model, optimizer, optim_state_dict=state, options=options)
    for group, values in zip(optimizer.param_groups, built_with, strict=True):
        group.update(values)


def _keyed_by_index(state: dict) -> bool:
    return any(isinstance(p, int) for group in state.get("param_groups", ()) for p in group.get("params", ()))


def _keyed_by_name(state: dict, optimizer: torch.optim.Optimizer, sharded_model: torch.nn.Module) -> dict:
    """An `optimizer.state_dict()` (parameters numbered in param-group order) keyed by the parameter names that
    `get_optimizer_state_dict` uses for `sharded_model`, whose optimizer was built the same way (same groups,
    same order). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # the sharded form: every process gets the names (the whole form goes to rank 0 only, with cpu_offload)
    names = get_optimizer_state_dict(sharded_model, optimizer, options=StateDictOptions())
    groups = []
    number_to_name = {}
    saved_groups, name_groups = state["param_groups"], names["param_groups"]
    if len(saved_groups) != len(name_groups):
        raise ValueError(f"the saved optimizer state has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(name_groups)}")
    for saved, named in zip(saved_groups, name_groups):
        if len(saved["params"]) != len(named["params"]):
            raise ValueError(f"the saved optimizer state has a group of {len(saved['params'])} parameters where this "
                             f"optimizer has {len(named['params'])}")
        number_to_name.update(zip(saved["params"], named["params"]))
        groups.append({**saved, "params": list(named["params"])})
    return {"state": {number_to_name[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def ddp_wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over `module` on this process's device, without a buffer broadcast at each forward
    (the models' buffers - positional tables, rotary frequencies - are equal everywhere and never change; the
    keyword is forward_sync_buffers from torch 2.14 on, broadcast_buffers before)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    accepted = inspect.signature(DistributedDataParallel).parameters
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{quiet: False})


@contextlib.contextmanager
def fsdp_unsharded(module: Any) -> Iterator[None]:
    """Inside: the FSDP2 module's own (root) parameters are gathered."""
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
