"""PyTorch eager: the mmdet model itself, the reference every other backend is held to."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..artifacts.export import output_names
from ..core.host import default_threads
from .base import Backend, Runner, check_batch

if TYPE_CHECKING:
    import torch

    from ..artifacts.chain import ModelArtifacts


class TorchRunner(Runner):
    def __init__(self, module: torch.nn.Module, threads: int) -> None:
        import torch

        super().__init__("torch", "fp32", threads, output_names(),
                         {"device": "cpu", "torch": torch.__version__})
        self.module = module

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        # set per call: the thread count is process-global in torch
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            outs = self.module(torch.from_numpy(check_batch(batch)))
        return [o.float().numpy() for o in outs]


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32",)

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        self.check_precision(precision)
        return TorchRunner(artifacts.torch_head_outputs, threads or default_threads())
