"""Build the mmdet detector from a config and load a checkpoint, with errors a user can act on.

mmdet is the source of truth for the model: it is built through mmdet's registry
(``mmdet.apis.init_detector``). Without a checkpoint the model is randomly initialised with a
fixed seed and every record says "random-init" instead of a checkpoint hash.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.cache import file_sha256
from .core.errors import UserError

if TYPE_CHECKING:
    import torch
    from mmengine.config import Config

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "ssd300_coco.py"
SSD300_CHECKPOINT_NAME = "ssd300_coco_20210803_015428-d231a06e.pth"


@dataclass(frozen=True)
class ModelSpec:
    """What a model is made of: a config file and a checkpoint (None: seeded random init)."""

    config: Path = DEFAULT_CONFIG
    checkpoint: Path | None = None
    seed: int = 0
    # The user's explicit opt-in to a full unpickle of ``checkpoint`` (--trust-checkpoint):
    # it can run code from the file, so it is off unless asked for, and every record says so.
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", Path(self.config))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if not self.config.is_file():
            raise UserError(
                f"config not found: {self.config}; pass --cfg with an mmdet config file "
                f"(the SSD300 one ships at {DEFAULT_CONFIG})"
            )
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise UserError(
                f"checkpoint not found: {self.checkpoint}; pass --weight with the path of "
                f"{SSD300_CHECKPOINT_NAME} (see README: 'Data and weights'), "
                "or leave it out for a random-init model"
            )

    @property
    def weights_label(self) -> str:
        """``sha256:<hex>`` of the checkpoint, or ``random-init(seed=N)``."""
        if self.checkpoint is None:
            return f"random-init(seed={self.seed})"
        return "sha256:" + file_sha256(self.checkpoint)

    @property
    def checkpoint_load(self) -> str:
        """How the checkpoint was read: recorded in every record a run writes."""
        if self.checkpoint is None:
            return "none"
        return "trusted (full unpickle, --trust-checkpoint)" if self.trust_checkpoint \
            else "weights_only"

    def describe(self) -> dict[str, Any]:
        """What the model is (config, weights): goes into cache keys and ONNX metadata."""
        return {
            "config": self.config.name,
            "config_sha256": config_sha256(self.config),
            "weights": self.weights_label,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }

    def provenance(self) -> dict[str, Any]:
        """What every result record carries about the model: weights and how they were read."""
        return {"weights": self.weights_label, "checkpoint_load": self.checkpoint_load}


_config_hashes: dict[tuple[str, int], str] = {}


def config_sha256(path: Path) -> str:
    """Hash of the config as mmengine resolves it (its ``_base_`` files included), so a
    change in an inherited file changes every key built on it."""
    import hashlib
    import json

    memo = (str(path.resolve()), path.stat().st_mtime_ns)
    if memo not in _config_hashes:
        resolved = json.dumps(load_config(path).to_dict(), sort_keys=True, default=str)
        _config_hashes[memo] = hashlib.sha256(resolved.encode()).hexdigest()
    return _config_hashes[memo]


def load_config(path: str | Path) -> Config:
    """The mmengine Config at ``path``, or a UserError saying why it cannot be read."""
    from mmengine.config import Config

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        return Config.fromfile(str(path))
    except Exception as e:  # mmengine raises many types for a bad config file
        raise UserError(f"config {path} could not be parsed: {type(e).__name__}: {e}") from None


# The globals beyond torch's own allow-list that known checkpoint writers put into a
# checkpoint, allowed by name and nothing more; each with the writer that needs it
# (tests/test_security.py writes each kind with the writer's own code and loads it without
# --trust-checkpoint). mmdet 2.x / mmcv 1.x ``save_checkpoint`` files (the SSD300 zoo file:
# meta of str/int/tuple, OrderedDict state_dict) and the embedded model need none.
_MMENGINE = "mmengine Runner.save_checkpoint (mmdet 3.x training): message_hub"
SAFE_CHECKPOINT_GLOBALS: dict[str, str] = {
    "mmengine.logging.history_buffer.HistoryBuffer": f"{_MMENGINE} log_scalars",
    "builtins.getattr": f"{_MMENGINE}: HistoryBuffer's statistics_methods, pickled as "
                        "getattr(HistoryBuffer, 'min'|'max'|'mean'|'current'); only those four "
                        "are allowed",
    "numpy.core.multiarray._reconstruct": f"{_MMENGINE}: HistoryBuffer arrays (numpy 1 name)",
    "numpy._core.multiarray._reconstruct": f"{_MMENGINE}: HistoryBuffer arrays (numpy 2 name)",
    "numpy.core.multiarray.scalar": f"{_MMENGINE}: numpy scalars logged (numpy 1 name)",
    "numpy._core.multiarray.scalar": f"{_MMENGINE}: numpy scalars logged (numpy 2 name)",
    "numpy.ndarray": f"{_MMENGINE}: HistoryBuffer arrays",
    "numpy.dtype": f"{_MMENGINE}: HistoryBuffer arrays",
    "numpy.dtypes.Float64DType": f"{_MMENGINE}: HistoryBuffer log history",
    "numpy.dtypes.Int64DType": f"{_MMENGINE}: HistoryBuffer count history",
}
TRUST_HINT = ("if you trust this file and where it came from, pass --trust-checkpoint "
              "(ssd-pipeline and pytest) or TRUST_CHECKPOINT=1 (the seed scripts)")
_HISTORY_BUFFER_STATISTICS = frozenset({"min", "max", "mean", "current"})


def _history_buffer_statistic(obj: Any, name: str) -> Any:
    """What ``builtins.getattr`` means inside a checkpoint: HistoryBuffer's own statistics
    methods, nothing else (a free getattr would run any property of any loaded object)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, "
                                 f"{name!r}) is not allowed in a checkpoint")


def _safe_globals() -> list[Any]:
    """The allowed objects, as torch's safe_globals takes them: (object, dotted name)."""
    import importlib

    found: list[Any] = [(_history_buffer_statistic, "builtins.getattr")]
    for dotted in SAFE_CHECKPOINT_GLOBALS:
        module, _, name = dotted.rpartition(".")
        if dotted == "builtins.getattr":
            continue
        try:
            found.append((getattr(importlib.import_module(module), name), dotted))
        except (ImportError, AttributeError):  # numpy 1 vs 2 spell some of them differently
            continue
    return found


def read_state_dict(path: Path, trust: bool = False) -> dict[str, Any]:
    """The ``state_dict`` of a checkpoint file, read with torch's weights-only unpickler.

    A checkpoint that needs any global beyond :data:`SAFE_CHECKPOINT_GLOBALS` is refused in
    one line naming it: a pickle can run arbitrary code while it loads. ``trust=True`` (the
    user's --trust-checkpoint) unpickles fully instead. No fallback from one to the other.
    """
    import torch

    try:
        if trust:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(_unreadable(path, e)) from None
        allowed = set(SAFE_CHECKPOINT_GLOBALS)
        try:  # reads the pickle's opcodes; runs nothing
            offending = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                         if g not in allowed]
        except Exception:
            offending = []
        what = ", ".join(offending) if offending else "an object outside the allowed list"
        raise UserError(
            f"checkpoint {path} refused: loading it would call {what}, which a weights-only "
            f"load does not allow (a pickle can run code while it loads); {TRUST_HINT}"
        ) from None
    except Exception as e:  # garbage bytes raise anything from EOFError to IndexError
        raise UserError(_unreadable(path, e)) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"checkpoint {path} holds no state_dict (got {type(ckpt).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unreadable(path: Path, e: BaseException) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return (f"checkpoint {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{first}); it may be truncated or corrupt: download it again")


def check_state_dict(model: Any, state: dict[str, Any], path: Path, config: Path) -> None:
    """Refuse a checkpoint that does not fit the model exactly (another architecture)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise UserError(
            f"checkpoint {path} does not fit config {config.name}: {'; '.join(parts)}. "
            "Is it a checkpoint of this architecture?"
        )


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The mmdet detector for ``spec`` on CPU, in eval mode, ready for inference."""
    import torch
    from mmdet.apis import init_detector
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = load_config(spec.config)
    torch.manual_seed(spec.seed)
    try:
        # init_detector resets the warning filters and warns "checkpoint is None": we load
        # the weights ourselves, so record its warnings and pass on only the others.
        with warnings.catch_warnings(record=True) as caught:
            model = init_detector(cfg, checkpoint=None, device="cpu")
        for w in caught:
            if "checkpoint is None" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except Exception as e:
        raise UserError(
            f"config {spec.config} does not build an mmdet model: {type(e).__name__}: {e}"
        ) from None
    if spec.checkpoint is None:
        from mmengine.logging import MMLogger

        # init_detector skips init_weights; without it nothing is detected. It logs one INFO
        # block per parameter: keep the user's terminal for what matters.
        mm_logger = MMLogger.get_current_instance()
        level = mm_logger.level
        mm_logger.setLevel(logging.WARNING)
        try:
            model.init_weights()
        finally:
            mm_logger.setLevel(level)
    else:
        state = read_state_dict(spec.checkpoint, spec.trust_checkpoint)
        check_state_dict(model, state, spec.checkpoint, spec.config)
        model.load_state_dict(state, strict=True)
    if cfg.get("classes"):
        model.dataset_meta = {"classes": list(cfg.classes)}  # not COCO's: init_detector's default
    head = model.bbox_head
    if not hasattr(head, "loss_cls"):
        # mmdet 3.3.0 bug (issues #11305, #11780): SSDHead.predict_by_feat reads loss_cls,
        # which SSDHead never sets; the original sets it to None the same way.
        head.loss_cls = None
    return model.eval()


def head_outputs_module(model: torch.nn.Module) -> torch.nn.Module:
    """A torch module: image batch -> the 12 raw head outputs (6 cls maps, then 6 box maps).

    This is what the ONNX graph contains and what the PyTorch backend runs, so that the
    parity tests compare the same computation. No NMS, as in the original.
    """
    import torch

    class _HeadOutputs(torch.nn.Module):
        def __init__(self, det: Any) -> None:
            super().__init__()
            self.det = det

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cls_scores, bbox_preds = self.det.bbox_head(self.det.extract_feat(x))
            return (*cls_scores, *bbox_preds)

    return _HeadOutputs(model).eval()
