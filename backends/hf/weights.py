"""Model weights: cold loads from disk, warm copies in host RAM, and their measured costs.

A cold load is `from_pretrained` from the model folder. Before it, the folder's weight
files are dropped from the OS page cache (posix_fadvise DONTNEED, no root needed), so a
"cold" load really reads the disk instead of a RAM copy the kernel kept from the last
load; without that, cold and warm loads on one machine would both be RAM copies.

A warm copy is a complete model object in host memory (pinned when CUDA is present). A
warm load builds an empty skeleton on the meta device and fills it with copies of the
warm tensors on the target device: a host-to-device copy on CUDA, a memcpy on CPU. The
warm copy stays intact, so it can serve the next swap-in too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from qlmserve.operations.model_spec import ModelSpec


@dataclass(frozen=True)
class LoadRecord:
    """One measured model load (kept for the profiler and for stats)."""

    model: str
    warm: bool
    seconds: float
    bytes_moved: int


def model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _weight_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of a model's weight files."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in _weight_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped; a fresh build may leave some
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clone_model(model: PreTrainedModel, device: torch.device, *, pin: bool = False) -> PreTrainedModel:
    """A new model object on `device` whose tensors are copies of `model`'s."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            model.config, dtype=model.dtype, attn_implementation=model.config._attn_implementation
        )
    # Tied weights keep sharing one copy. Keyed by id() of the source Parameter / buffer,
    # which the source model keeps alive (never by id of a temporary like `p.data`,
    # whose id CPython reuses as soon as it is freed).
    copies: dict[int, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin and device.type == "cpu")
            out.copy_(t.detach(), non_blocking=t.is_pinned())
            copies[id(t)] = out
        return copies[id(t)]

    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        skeleton.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(copy(p), requires_grad=False)
    for name, b in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        skeleton.get_submodule(owner)._buffers[leaf] = copy(b)
    left = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"clone_model: tensors left on meta: {left[:5]}")
    skeleton.generation_config = model.generation_config
    skeleton.eval()
    sync(device)
    return skeleton


class WeightStore:
    """Where each model's weights are: the one active model on the device, warm copies in
    host RAM, and the rest on disk."""

    def __init__(self, specs: dict[str, ModelSpec], device: torch.device, dtype: torch.dtype) -> None:
        self.specs = specs
        self.device = device
        self.dtype = dtype
        self.pin = device.type == "cuda"
        self.warm: dict[str, PreTrainedModel] = {}
        self.history: list[LoadRecord] = []

    def _folder(self, name: str) -> Path:
        path = self.specs[name].path
        if not path:
            raise ValueError(f"model {name!r} has no path to load from")
        return Path(path)

    def load_cold(self, name: str, device: torch.device | None = None) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        folder = self._folder(name)
        target = device or self.device
        drop_page_cache(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=self.dtype,
            # The engine's KV view speaks the SDPA interface (boolean masks).
            attn_implementation="sdpa",
            device_map=str(target) if target.type == "cuda" else None,
        )
        model.eval()
        return model

    def activate(self, name: str) -> tuple[PreTrainedModel, LoadRecord]:
        """Put `name` on the device: from its warm copy when there is one, else from disk."""
        t0 = time.perf_counter()
        warm = name in self.warm
        model = clone_model(self.warm[name], self.device) if warm else self.load_cold(name)
        sync(self.device)
        record = LoadRecord(name, warm, time.perf_counter() - t0, model_bytes(model))
        self.history.append(record)
        return model, record

    def make_warm(self, name: str, active: PreTrainedModel | None) -> tuple[float, int]:
        """Hold `name`'s weights in host RAM; copied from the device when it is the active
        model, else read from disk. Returns (seconds, bytes)."""
        t0 = time.perf_counter()
        if name not in self.warm:
            if active is not None:
                host = clone_model(active, torch.device("cpu"), pin=self.pin)
            else:
                host = self.load_cold(name, torch.device("cpu"))
                if self.pin:
                    host = clone_model(host, torch.device("cpu"), pin=True)
            self.warm[name] = host
        return time.perf_counter() - t0, model_bytes(self.warm[name])

    def drop_warm(self, name: str) -> None:
        self.warm.pop(name, None)


def free_device_memory(device: torch.device) -> None:
    """Hand the cached blocks of dropped models back to the driver. No gc.collect(): the
    models hold no reference cycles (refcounting frees them at once), and a full
    collection costs ~0.3 s with transformers imported, more than a warm load."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def physical_memory_bytes() -> int:
    """Host RAM, where warm model copies live (the planner divides it by model sizes)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
