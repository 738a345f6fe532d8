"""The pretraining configuration: one dataclass is the single source of names, defaults and help.

Names and defaults follow the reference implementation (``main_dino.py``), in snake_case here and
kebab-case on the command line. Precedence: defaults < ``--config FILE.toml`` < command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dinocli.errors import DinoError, UsageError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODEL, TEMP, OPTIM, AUG, RUN = "Model", "Teacher temperature", "Optimisation", "Augmentation", "Run"
MONITOR = "Monitoring"


def _opt(default: Any, help: str, panel: str, **extra: Any) -> Any:
    kind = dataclasses.field
    meta = {"help": help, "panel": panel, **extra}
    if isinstance(default, (list, tuple)):
        return kind(default_factory=lambda: tuple(default), metadata=meta)
    return kind(default=default, metadata=meta)


@dataclass
class PretrainConfig:
    """Every option of ``dino pretrain``. See ``dino pretrain --help`` for each one's meaning."""

    data: str = _opt(
        "", "Folder of images (searched recursively), tar shards (s-{000..099}.tar, a .tar, a folder of "
        ".tar; see docs/data.md), or 'demo' for the built-in set.", RUN,
    )
    output: str = _opt("", "Run folder: checkpoints, config.toml, metrics.jsonl.", RUN)
    recipe: str = _opt(
        "reference",
        "Named defaults: reference (the reference implementation's), small-data (thousands of "
        "small images, tens of epochs) or auto (scaled from the data and --epochs); options "
        "given explicitly override it. See `dino plugins`.",
        RUN,
    )
    arch: str = _opt("vit_small", "Backbone name (see `dino plugins`).", MODEL)
    patch_size: int = _opt(16, "ViT patch size.", MODEL)
    patch_embed: str = _opt(
        "linear",
        "ViT patch embedding: linear (one patch-size convolution, the reference's) or conv (a "
        "convolutional stem of 3x3 stride-2 convolutions, Xiao et al. 2021). Other backbones ignore it.",
        MODEL,
        choices=("linear", "conv"),
    )
    depth: int = _opt(
        0,
        "ViT depth (transformer blocks); 0 keeps the architecture's (12 for vit_tiny, vit_small "
        "and vit_base). Other backbones ignore it.",
        MODEL,
    )
    pool: str = _opt(
        "cls",
        "ViT output: cls (the CLS token, the reference's) or avg (the mean patch token, global "
        "average pooling). Other backbones ignore it.",
        MODEL,
        choices=("cls", "avg"),
    )
    out_dim: int = _opt(65536, "Number of prototypes (head output size).", MODEL)
    norm_last_layer: bool = _opt(True, "Fix the norm of the prototypes to 1 (more stable).", MODEL)
    momentum_teacher: float = _opt(
        0.996, "Base EMA momentum of the teacher, raised to 1 on a cosine schedule.", MODEL
    )
    use_bn_in_head: bool = _opt(False, "BatchNorm in the head's MLP.", MODEL)
    drop_path_rate: float = _opt(0.1, "Stochastic depth rate of the student.", MODEL)
    warmup_teacher_temp: float = _opt(0.04, "Initial teacher temperature.", TEMP)
    teacher_temp: float = _opt(
        0.04,
        "Teacher temperature after warm-up. The reference's default keeps 0.04 throughout; its "
        "boosted recipe warms up 0.04 -> 0.07 over 30 epochs (examples/vit_small_300ep.toml).",
        TEMP,
    )
    warmup_teacher_temp_epochs: int = _opt(0, "Epochs of linear teacher-temperature warm-up.", TEMP)
    weight_decay: float = _opt(0.04, "Initial weight decay (cosine schedule).", OPTIM)
    weight_decay_end: float = _opt(0.4, "Final weight decay.", OPTIM)
    clip_grad: float = _opt(3.0, "Gradient clipping threshold; 0 disables.", OPTIM)
    clip_grad_mode: str = _opt(
        "per-tensor",
        "'per-tensor' clips each parameter's gradient norm separately (the reference's "
        "behaviour); 'global' clips the norm of all gradients together.",
        OPTIM,
        choices=("per-tensor", "global"),
    )
    batch_size: int = _opt(64, "Images per device per iteration.", OPTIM)
    epochs: int = _opt(100, "Training epochs.", OPTIM)
    freeze_last_layer: int = _opt(1, "Epochs during which the prototypes are frozen.", OPTIM)
    lr: float = _opt(0.0005, "Peak learning rate for a global batch of 256 (scaled linearly).", OPTIM)
    warmup_epochs: int = _opt(10, "Epochs of linear learning-rate warm-up.", OPTIM)
    min_lr: float = _opt(1e-6, "Final learning rate of the cosine schedule.", OPTIM)
    optimizer: str = _opt("adamw", "adamw, sgd or lars.", OPTIM, choices=("adamw", "sgd", "lars"))
    augmentation: str = _opt("dino", "Multi-crop augmentation pipeline (see `dino plugins`).", AUG)
    global_crops_scale: tuple[float, float] = _opt((0.4, 1.0), "Area range of global crops.", AUG)
    local_crops_number: int = _opt(8, "Number of local crops; 0 disables multi-crop.", AUG)
    local_crops_scale: tuple[float, float] = _opt((0.05, 0.4), "Area range of local crops.", AUG)
    global_crop_size: int = _opt(224, "Global crop size in pixels (e.g. 32 for CIFAR).", AUG)
    local_crop_size: int = _opt(96, "Local crop size in pixels (e.g. 16 for CIFAR).", AUG)
    augment_on: str = _opt(
        "cpu",
        "Where the augmentation runs: cpu (data-loading workers), split (workers decode, crop, resize "
        "and flip; colour, blur and solarisation batched on the training device: a quarter to a third "
        "of the workers' work) or gpu (all of it on the training device; workers only read files). split "
        "and gpu: built-in `dino` augmentation only.",
        AUG,
        choices=("cpu", "split", "gpu"),
    )
    collapse: str = _opt(
        "centering",
        "Collapse avoidance: centering, sinkhorn-knopp or none, plus regularisers after commas "
        "(e.g. centering,koleo); see `dino plugins` and docs/collapse.md.",
        MODEL,
    )
    saveckp_freq: int = _opt(20, "Keep checkpoint{epoch:04d}.pth every N epochs; 0 never.", RUN)
    seed: int = _opt(0, "Random seed: data order, augmentation and initialisation.", RUN)
    num_workers: int = _opt(
        -1,
        "Data-loading processes; -1: every core but one when they augment for a GPU (--augment-on "
        "cpu or split), else min(10, cores - 1); at least 1. Cores: this process's share of its CPU "
        "affinity.",
        RUN,
    )
    precision: str = _opt(
        "auto",
        "auto, fp32, bf16 or fp16 (fp16 with a gradient scaler, CUDA only). auto: bf16 on CUDA "
        "GPUs that support it and on CPUs with native bf16, fp16 on older GPUs, else fp32.",
        RUN,
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps.", RUN)
    compile: bool = _opt(
        False,
        "torch.compile the student and teacher backbones: faster steps on GPUs after a warm-up "
        "of a minute or so (needs a C++ compiler on the CPU).",
        RUN,
    )
    init_from: str = _opt(
        "", "Start a NEW run from these weights (fresh optimiser and schedules).", RUN
    )
    progress: bool = _opt(True, "Rich progress display (plain log lines without).", RUN)
    log_every: int = _opt(10, "Log metrics every N iterations.", RUN)
    logger: str = _opt(
        "jsonl", "Where metrics go, comma-separated: jsonl (RUN/metrics.jsonl, read by dino report), tensorboard, "
        "wandb (offline unless WANDB_MODE), mlflow (RUN/mlruns unless MLFLOW_TRACKING_URI), or a plugin's.", RUN,
    )
    on_bad_image: str = _opt(
        "skip", "Unreadable images: skip (counted, reported) or fail.", RUN, choices=("skip", "fail")
    )
    knn_every: int = _opt(
        0, "Every N epochs (and after the last), the teacher's k-NN top-1 (k=20) on --knn-train/"
        "--knn-val, computed as `dino knn` does; 0 disables.", MONITOR,
    )
    knn_train: str = _opt("", "Labelled <class>/<image> folder or tar shards: the k-NN monitor's train set.", MONITOR)
    knn_val: str = _opt("", "Labelled <class>/<image> folder or tar shards: the k-NN monitor's val set.", MONITOR)
    linear_every: int = _opt(
        0, "Every N epochs (a multiple of --knn-every), also the linear-probe top-1 on the k-NN monitor's "
        "features (`dino linear`'s fast 13-lr sweep, seconds); 0 disables.", MONITOR,
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as saved in config.toml and in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in fields(PretrainConfig)}


def _defaults() -> dict[str, Any]:
    return dataclasses.asdict(PretrainConfig())


def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` converted to the type of option ``name``; a clear error when it does not fit."""
    if name not in FIELDS:
        raise unknown_name("option", name, FIELDS, where=f"in {source}")
    default = _defaults()[name]
    where = f"{name!r} in {source}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != len(default)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise UsageError(f"{where} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if not isinstance(value, str):
        raise UsageError(f"{where} must be a string, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """The options in a TOML file (top-level keys, kebab- or snake-case), type-checked."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--config {path} is a folder; give a TOML file")
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    return {
        key.replace("-", "_"): coerce(key.replace("-", "_"), value, str(path))
        for key, value in raw.items()
    }


def resolve_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    explain: Callable[[str], None] | None = None,
) -> PretrainConfig:
    """Defaults, then the recipe, then the TOML ``file``, then ``overrides`` (the command line).

    ``explain`` receives one line per value the recipe sets, with the reason.
    """
    from dinocli.registry import get_registry

    explicit: dict[str, Any] = dict(load_toml(file)) if file else {}
    for key, value in (overrides or {}).items():
        explicit[key] = coerce(key, value, "the options")
    values = _defaults()
    name = explicit.get("recipe", values["recipe"])
    for key, (value, reason) in recipe_values(name, explicit).items():
        if key in explicit:
            continue
        values[key] = coerce(key, value, get_registry().describe("recipes", name))
        if explain is not None:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            explain(f"recipe {name}: {key} = {shown}  ({reason})")
    values.update(explicit)
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


def recipe_values(name: str, explicit: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """What recipe ``name`` sets, as ``{option: (value, reason)}``, for the data and epochs given."""
    from dinocli.data import resolve_data
    from dinocli.data.shards import shard_paths
    from dinocli.recipes import describe_data
    from dinocli.registry import get_registry

    entry = get_registry().get("recipes", name)
    context: dict[str, Any] = {"epochs": explicit.get("epochs"), "n_images": None, "image_size": None}
    data = resolve_data(explicit["data"]) if name != "reference" and explicit.get("data") else None
    if data is not None and (data.is_dir() or shard_paths(data) is not None):
        stats = describe_data(data)
        context.update(n_images=stats.n_images, image_size=stats.image_size)
    what = get_registry().describe("recipes", name)
    try:
        chosen = entry.factory(**context)
    except DinoError:
        raise
    except Exception as exc:
        raise DinoError(f"{what} failed to build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(chosen, Mapping) or not all(isinstance(key, str) for key in chosen):
        raise DinoError(
            f"{what} is broken: its factory must return a mapping of option names to values, got "
            f"{type(chosen).__name__}"
        )
    return {
        key: value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)
        else (value, "")
        for key, value in chosen.items()
    }


def validate(cfg: PretrainConfig) -> None:
    """Reject impossible values with a message that names the option."""
    if not cfg.data:
        raise UsageError("no data: pass --data DIR (or --data demo)")
    if not cfg.output:
        raise UsageError("no output folder: pass --output RUN")
    positive = ("patch_size", "out_dim", "batch_size", "epochs", "global_crop_size", "local_crop_size")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{_flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("depth", "local_crops_number", "warmup_epochs", "freeze_last_layer", "saveckp_freq",
                 "warmup_teacher_temp_epochs"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{_flag(name)} must not be negative, got {getattr(cfg, name)}")
    if cfg.num_workers < -1:
        raise UsageError(f"--num-workers must be -1 (from the cores) or at least 0, got {cfg.num_workers}")
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(
            f"--warmup-epochs {cfg.warmup_epochs} is longer than the run (--epochs {cfg.epochs}); "
            f"give at most {cfg.epochs} (the reference warms up for a tenth of the run: "
            f"--warmup-epochs {cfg.epochs // 10})"
        )
    if cfg.warmup_teacher_temp_epochs > cfg.epochs:
        raise UsageError(
            f"--warmup-teacher-temp-epochs {cfg.warmup_teacher_temp_epochs} is longer than the run "
            f"(--epochs {cfg.epochs})"
        )
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(cfg, name)
        if not (0.0 < lo <= hi <= 1.0):
            raise UsageError(f"--{_flag(name)} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    for name in ("momentum_teacher",):
        if not (0.0 <= getattr(cfg, name) <= 1.0):
            raise UsageError(f"--{_flag(name)} must be between 0 and 1, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path_rate"):
        value = getattr(cfg, name)
        if value < 0 or not math.isfinite(value):
            raise UsageError(f"--{_flag(name)} must be a finite number >= 0, got {value}")
    for name in ("teacher_temp", "warmup_teacher_temp"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.log_every <= 0:
        raise UsageError(f"--log-every must be positive, got {cfg.log_every}")
    if cfg.knn_every < 0:
        raise UsageError(f"--knn-every must not be negative, got {cfg.knn_every}")
    if cfg.knn_every and not (cfg.knn_train and cfg.knn_val):
        raise UsageError("--knn-every needs both --knn-train DIR and --knn-val DIR (labelled folders)")
    if (cfg.knn_train or cfg.knn_val) and not cfg.knn_every:
        raise UsageError("--knn-train/--knn-val are used only with --knn-every N (epochs); add it")
    if cfg.linear_every < 0:
        raise UsageError(f"--linear-every must not be negative, got {cfg.linear_every}")
    if cfg.linear_every and (not cfg.knn_every or cfg.linear_every % cfg.knn_every):
        raise UsageError("--linear-every N runs on the k-NN monitor's features: give --knn-every M "
                         "(with --knn-train/--knn-val) where N is a multiple of M")
    from dinocli.loggers import parse_logger_names
    from dinocli.registry import get_registry

    for name in parse_logger_names(cfg.logger):
        get_registry().get("loggers", name)  # the one-line error with the closest names
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise unknown_name(f"value for --{_flag(name)}", getattr(cfg, name), choices)


def augmentation_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    """What the augmentation factory ``cfg.augmentation`` is given for ``cfg``."""
    return {
        "global_crops_scale": cfg.global_crops_scale,
        "local_crops_scale": cfg.local_crops_scale,
        "local_crops_number": cfg.local_crops_number,
        "global_crop_size": cfg.global_crop_size,
        "local_crop_size": cfg.local_crop_size,
    }


def backbone_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    """What a backbone factory is given for ``cfg`` (besides ``drop_path_rate``); ``depth`` only
    when the run asks for one (``--depth N``, N > 0)."""
    kwargs: dict[str, Any] = {
        "patch_size": cfg.patch_size,
        "img_size": cfg.global_crop_size,
        "patch_embed": cfg.patch_embed,
        "pool": cfg.pool,
    }
    if cfg.depth:
        kwargs["depth"] = cfg.depth
    return kwargs


def to_toml(cfg: PretrainConfig) -> str:
    """``cfg`` as a TOML document that :func:`load_toml` reads back."""
    lines = ["# dinocli pretrain configuration", ""]
    for key, value in cfg.to_dict().items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _flag(name: str) -> str:
    return name.replace("_", "-")


__all__ = ["FIELDS", "PretrainConfig", "backbone_kwargs", "coerce", "load_toml", "resolve_config", "to_toml", "validate"]
