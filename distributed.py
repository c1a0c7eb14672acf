"""
Training on several ranks under torchrun, the plumbing a reader of the method can skip: the process group, FSDP's
sharding of the GPT, gradient sync under gradient accumulation, and checkpoints that are the same file whatever
layout wrote them (full state dicts gathered from the shards, a full optimizer state loaded back into them).
train.py calls these; in one process without --fsdp each is the plain single-process call.
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from utils import pick_device


@contextmanager
def process_group(device):
    """-> (ddp, rank, world, device) of this process. Under torchrun (RANK set) it joins the process group (NCCL on
    CUDA, gloo on CPU) for the length of the run, on device cuda:LOCAL_RANK; alone it is rank 0 of 1."""
    if int(os.environ.get('RANK', -1)) == -1:
        yield False, 0, 1, pick_device(device)
        return
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    use_cuda = pick_device(device).startswith('cuda')
    device = f'cuda:{local_rank}' if use_cuda else 'cpu'
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    try:
        yield True, rank, world, device
        dist.barrier()  # leave together: a rank that quits while rank 0 still writes its checkpoint can abort gloo
    finally:
        dist.destroy_process_group()


def shard_model(model, use_bf16):
    """--fsdp=True: shard the GPT in place with PyTorch's fully_shard (FSDP2). Each block is its own unit, gathered
    just before it computes and freed after; the root unit holds the rest (embeddings, norm, head, projector). On
    CUDA the gathered weights are bf16 while the shards (the master weights AdamW updates) and the gradient
    reduction stay fp32; on CPU everything is fp32. Parameter names do not change, so state dicts keep their keys."""
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def gradient_sync(model, raw_model, fsdp, last_micro):
    """The context of one micro-step's forward and backward: gradients are all-reduced (DDP) or reduce-scattered
    (FSDP) across ranks on the last micro-step only; earlier ones accumulate locally."""
    if fsdp:
        raw_model.set_requires_gradient_sync(last_micro)
        return nullcontext()
    return model.no_sync() if isinstance(model, DDP) and not last_micro else nullcontext()


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters in its order: index i of optimizer.state_dict() is name i."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group['params']]


def load_optimizer_state(model, optimizer, saved, fsdp):
    """Load a full optimizer state (keyed by index, as one process saves it; full_state's). Under FSDP into this
    rank's shards: every rank holds the file's full tensors, set_optimizer_state_dict keeps each rank's slice."""
    if not fsdp:
        return optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
    names = parameter_names(model, optimizer)
    saved_indices = [i for group in saved['param_groups'] for i in group['params']]
    if sorted(saved_indices) != list(range(len(names))):
        raise ValueError(f'{len(saved_indices)} saved parameters for {len(names)} optimized ones')
    by_name = {'state': {names[i]: s for i, s in saved['state'].items()},
               'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in saved['param_groups']]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def full_state(raw_model, optimizer, fsdp):
    """-> (model state dict, optimizer state dict) as one process holds them. Under FSDP the full tensors are
    gathered from the shards (a collective: every rank calls it; rank 0 receives them, on the CPU, the others get
    empty dicts) and the optimizer's, keyed by parameter name there, is keyed by index as optimizer.state_dict()
    is: a checkpoint is the same file whatever the layout that wrote it, and loads under any other."""
    if not fsdp:
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, \
        StateDictOptions
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(raw_model, options=options)
    by_name = get_optimizer_state_dict(raw_model, optimizer, options=options)
    index = {name: i for i, name in enumerate(parameter_names(raw_model, optimizer))}
    return model_state, {'state': {index[n]: s for n, s in by_name.get('state', {}).items()},
                         'param_groups': [{**g, 'params': [index[n] for n in g['params']]}
                                          for g in by_name.get('param_groups', [])]}
