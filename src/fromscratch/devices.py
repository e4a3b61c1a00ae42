"""One answer to "which device?", for every command and function that takes `--device`; and
what the device is, for the records of runs and benchmarks (`describe_device`)."""

import os
import platform
from pathlib import Path

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


def cpu_description(cpuinfo: str) -> dict:
    """The first processor of a /proc/cpuinfo text: {"model_name", "family", "model", "avx512f",
    "avx512_bf16"}. Two machines that `platform.processor()` names alike ("x86_64") can differ by a
    generation (AMD EPYC family 25 model 1, Zen 3, has no AVX-512; model 17, Zen 4, does, with
    bfloat16 products), and timings taken on one do not carry over to the other."""
    fields, flags = {}, set()
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if not key and fields:  # a blank line ends the first processor's block
            break
        if key in ("model name", "cpu family", "model") and key not in fields:
            fields[key] = value
        elif key == "flags":
            flags = set(value.split())
    return {"model_name": fields.get("model name", ""), "family": fields.get("cpu family", ""),
            "model": fields.get("model", ""), "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}


def describe_device(device: torch.device | str = "cpu") -> dict:
    """What `device` is: for a GPU its name and compute capability; for the CPU its model (from
    /proc/cpuinfo where there is one), the vector instructions PyTorch's kernels use here, and the
    cores and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    if device.type != "cpu":
        return {"type": device.type}
    cpuinfo = Path("/proc/cpuinfo")
    cpu = cpu_description(cpuinfo.read_text()) if cpuinfo.is_file() else {"model_name": platform.processor()}
    return {"type": "cpu", **cpu, "vector": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
