"""The device a run uses: choosing it, naming it, joining the other processes torchrun started,
and checking that a run fits in the device's memory."""
import os
import platform

import torch
import torch.distributed as dist
from torch.func import functional_call

from shared import UserError

# The estimate below counts what a training step holds at its peak. Measured against the peak
# memory of real steps (tests/test_device.py) it stays within this factor either way.
ESTIMATE_FACTOR = 2


def select_device(name="auto"):
    """The fastest device present for 'auto'; the one asked for otherwise, if it is there."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto" and torch.cuda.is_available():
        name = "cuda"
    elif name == "auto":
        name = "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch finds no CUDA GPU on this machine; "
                        "use --device cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: PyTorch finds no Apple GPU (MPS) on this machine; "
                        "use --device cpu")
    return torch.device(name)


def setup_distributed(device):
    """Under torchrun, which starts one process per GPU (or CPU worker) and sets RANK, LOCAL_RANK
    and WORLD_SIZE, join the others: NCCL between GPUs, Gloo on CPUs. Returns (rank, world size,
    this process's device); a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise UserError("several processes need CUDA GPUs or CPUs; use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(values, op=dist.ReduceOp.SUM):
    """values (a list of floats) combined across processes; unchanged in a single process."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def machine(device):
    """The hardware a run used, in words: the GPU's name, or the CPU's and its thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "mps":
        return f"Apple GPU (MPS), {platform.machine()}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def available_memory(device):
    """Bytes this process can still take on the device, or None where that can't be told. On a
    CPU, what the system says is available, within the container's limit if there is one, and
    shared with the other processes torchrun started on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:  # macOS and other Unixes: the physical memory, a bound at least
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        with (open("/sys/fs/cgroup/memory.max") as limit,
              open("/sys/fs/cgroup/memory.current") as used):
            available = min(available, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):  # no cgroup v2 here, or no limit ("max")
        pass
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def training_memory(model, batch_size, block_size):
    """Bytes a training step at this batch and context needs, found without taking any: the
    model's weights and buffers, a gradient and two optimizer moments per weight that trains, the
    activations the forward pass keeps for the backward pass (attention matrices included), and
    room for the two largest of them while they are differentiated. The activations are counted
    by running the forward pass on PyTorch's meta device, where tensors have shapes but no
    data."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    stand_ins = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                 for name, t in tensors.items()}
    saved = []

    def count(tensor):  # autograd hands over every tensor it keeps for the backward pass
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    idx = torch.zeros(batch_size, block_size, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        functional_call(model, stand_ins, (idx, idx))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return weights + 3 * trained + buffers + sum(saved) + 2 * max(saved, default=0)


def gigabytes(n):
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_memory(model, args, device, rows=None):
    """Refuse, in one sentence, a run that would not fit in the device's memory: a step of rows
    sequences of --block-size tokens (--batch-size of them if not given)."""
    needed = training_memory(model, rows or args.batch_size, args.block_size)
    available = available_memory(device)
    if available is None or needed <= available:
        return
    weights = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    lower = ("the model's size (--n-layer, --n-embd)" if weights > available
             else "--batch-size or --block-size")
    raise UserError(f"training needs about {gigabytes(needed)} of memory and the {device.type} has "
                    f"{gigabytes(available)} available; lower {lower}")


def build_model(make_model, args, device):
    """make_model() on the device, once check_memory has seen that training it fits: the check
    builds it first on the meta device, so an oversized model never takes any memory at all."""
    try:
        with torch.device("meta"):
            model = make_model()
    except RuntimeError as err:  # sizes beyond what a tensor can even describe
        raise UserError(f"a model of this size cannot be built ({str(err).splitlines()[0]}); lower "
                        "--n-embd or --block-size") from None
    check_memory(model, args, device)
    return make_model().to(device)
