"""One answer to "which device?", for every command and function that takes `--device`."""

import torch

from fromscratch.errors import UserError

KINDS = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device that `name` asks for, checked to exist here.

    "auto" is the (first) CUDA GPU when there is one, else the CPU. Under torchrun, a bare "cuda"
    (or "auto") means this process's GPU, `local_rank`. Anything else — a device type PyTorch does
    not know ("tpu"), CUDA where there is none, a GPU index past the last — is a UserError.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: not a device; use one of {', '.join(KINDS)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here")
        index = device.index if device.index is not None else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: the Apple GPU (MPS) is not available here")
        return device
    if device.type != "cpu":
        raise UserError(f"--device {name}: fromscratch runs on {', '.join(KINDS)}, not {device.type}")
    return device
