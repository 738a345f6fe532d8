"""DINO pretraining: student and momentum teacher, multi-crop self-distillation, exact resume."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import dinocli
from dinocli.backbones.vit import require_whole_patch
from dinocli.data import list_images
from dinocli.distributed import (
    ProcessGroup,
    agree_on_step,
    all_processes,
    barrier,
    destroy_distributed,
    global_batch_noise,
    init_distributed,
    read_agreements,
    same_on_all_processes,
    step_seed,
)
from dinocli.errors import DinoError, UsageError
from dinocli.heads import DINOHead
from dinocli.io import FolderLock, atomic_write_text, check_output_path, make_folder
from dinocli.loggers import open_loggers
from dinocli.registry import create_augmentation, create_backbone, get_registry
from dinocli.runtime import TimedIterator, autocast, resolve_precision, training_workers
from dinocli.train.checkpoint import (
    BACKBONE_SPEC_KEY,
    LATEST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dinocli.strategies.combine import build_collapse_strategy
from dinocli.train.config import PretrainConfig, augmentation_kwargs, backbone_kwargs, to_toml
from dinocli.train.diagnostics import CollapseDetector, batch_diagnostics
from dinocli.train.knn_monitor import KnnMonitor
from dinocli.train.loss import multicrop_cross_entropy
from dinocli.train.model import MultiCropNetwork, ema_update
from dinocli.train.optim import build_optimizer, clip_gradients, param_groups
from dinocli.train.progress import TrainingDisplay
from dinocli.train.sampler import EpochSampler
from dinocli.train.schedules import Schedules, build_schedules
from dinocli.weights import read_backbone_weights

if TYPE_CHECKING:
    from dinocli.data.multicrop_dataset import MultiCropDataset

STUDENT_TEMP = 0.1

#: Options that fix the shape of what a checkpoint holds: a resumed run must keep them.
STRUCTURAL = (
    "arch", "patch_size", "patch_embed", "pool", "depth", "out_dim", "norm_last_layer", "use_bn_in_head",
    "collapse", "augmentation", "local_crops_number", "global_crop_size", "optimizer",
)


@dataclass
class PretrainResult:
    """Where a finished run left its files, and how it ended."""

    output: Path
    checkpoint: Path
    epochs: int
    iterations: int
    last_loss: float
    skipped_images: int = 0
    #: This call's epoch summaries and k-NN evaluations, as written to ``metrics.jsonl``.
    history: list[dict[str, Any]] = field(default_factory=list)


def pretrain(cfg: PretrainConfig, display_rich: bool | None = None) -> PretrainResult:
    """Train a DINO student and teacher as ``cfg`` says; resumes from ``cfg.output`` if it holds a run."""
    group, device = init_distributed(cfg.device)
    try:
        precision = resolve_precision(cfg.precision, device)
        trainer = Trainer(cfg, group, device, precision, display_rich)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        destroy_distributed()


#: the signals that make a run save its last iteration and stop (a second one stops it at once).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Trainer:
    """One training run; :meth:`run` goes from the current state to ``cfg.epochs``."""

    def __init__(
        self,
        cfg: PretrainConfig,
        group: ProcessGroup,
        device: torch.device,
        precision: str,
        display_rich: bool | None = None,
    ) -> None:
        self.cfg, self.group, self.device, self.precision = cfg, group, device, precision
        self.out = Path(cfg.output)
        check_output_path(self.out, "--output", folder=True)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.paths = list_images(cfg.data)  # image files, or the samples of tar shards
        self.augmentation = create_augmentation(cfg.augmentation, **augmentation_kwargs(cfg))
        self.n_global = self.augmentation.n_global
        self.n_crops = self.n_global + self.augmentation.n_local

        torch.manual_seed(cfg.seed)
        self.spec = {"name": cfg.arch, "kwargs": backbone_kwargs(cfg)}
        student_backbone = create_backbone(
            cfg.arch, drop_path_rate=cfg.drop_path_rate, **self.spec["kwargs"]
        )
        teacher_backbone = create_backbone(cfg.arch, drop_path_rate=0.0, **self.spec["kwargs"])
        embed_dim = int(student_backbone.embed_dim)
        if isinstance(patch := getattr(student_backbone, "patch_size", None), int):  # before any step
            crop = min([cfg.global_crop_size] + [cfg.local_crop_size] * bool(self.augmentation.n_local))
            require_whole_patch(crop, crop, patch)
        backbone_name = get_registry().describe("backbones", cfg.arch)
        self.student = MultiCropNetwork(
            student_backbone,
            DINOHead(embed_dim, cfg.out_dim, cfg.use_bn_in_head, cfg.norm_last_layer),
            name=backbone_name,
        )
        self.teacher = MultiCropNetwork(
            teacher_backbone, DINOHead(embed_dim, cfg.out_dim, cfg.use_bn_in_head), name=backbone_name
        )
        if cfg.init_from:
            self._init_from(cfg.init_from)
        if group.world_size > 1 and device.type == "cuda":  # SyncBatchNorm needs CUDA
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.channels_last = device.type == "cuda" and _is_cnn(student_backbone)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.student.to(device, memory_format=memory_format)
        self.teacher.to(device, memory_format=memory_format)
        self.teacher.load_state_dict(self.student.state_dict())
        if cfg.compile:  # in place, so the state-dict keys stay the same; one graph per crop size
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.strategy = build_collapse_strategy(
            cfg.collapse,
            out_dim=cfg.out_dim,
            n_global=self.n_global,
            n_crops=self.n_crops,
            student_temp=STUDENT_TEMP,
        ).to(device)
        if not getattr(self.strategy, "provides_targets", True):
            raise UsageError(
                f"collapse strategy {cfg.collapse!r} only adds a regulariser; it cannot make "
                "teacher targets on its own"
            )

        self.model = (
            DistributedDataParallel(self.student, device_ids=[device] if device.type == "cuda" else None)
            if group.world_size > 1
            else self.student
        )
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg.optimizer, param_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

        self.global_batch = cfg.batch_size * group.world_size
        self.sampler = EpochSampler(
            len(self.paths), cfg.batch_size, cfg.seed, group.rank, group.world_size
        )
        self.iters_per_epoch = self.sampler.batches_per_epoch
        if self.iters_per_epoch == 0:
            raise UsageError(
                f"{len(self.paths)} images are fewer than one global batch of "
                f"{self.global_batch}; lower --batch-size"
            )
        self.schedules: Schedules = build_schedules(
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            global_batch=self.global_batch,
            weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end,
            momentum_teacher=cfg.momentum_teacher,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            iters_per_epoch=self.iters_per_epoch,
        )
        self.epoch = 0  # completed epochs
        self.iteration = 0  # completed iterations
        self.skipped_images = 0
        self.display = TrainingDisplay(
            cfg.epochs,
            self.iters_per_epoch,
            enabled=group.is_main,
            rich=display_rich if cfg.progress else False,
        )
        self.detector = CollapseDetector(
            cfg.out_dim, embed_dim, warn=self.display.log, start_epoch=max(1, cfg.freeze_last_layer)
        )
        self.knn = KnnMonitor(
            cfg.knn_train, cfg.knn_val, cfg.knn_every, cfg.global_crop_size, batch_size=cfg.batch_size,
            num_workers=max(cfg.num_workers, 0), precision=precision, linear_every=cfg.linear_every,
        ) if cfg.knn_every else None
        self._last_knn: dict[str, float] = {}
        self._interrupted = False
        self._stop_agreed = False
        #: The loss sum and count of the epoch so far: a checkpoint saved mid-epoch keeps them, so the
        #: resumed epoch's summary is the mean of the whole epoch.
        self.epoch_loss: tuple[float, int] = (0.0, 0)
        self.epoch_skipped = 0  # unreadable images skipped in the epoch so far, kept the same way
        self._unsettled: list[tuple[int, int, torch.Tensor]] = []  # (epoch, iteration, agreement)
        # last: a run the checks above refuse leaves no folder, and no logger's run is left open
        self._lock = None
        if group.is_main:
            make_folder(self.out)
            self._lock = FolderLock(self.out, "dino pretrain")  # before anything in it is read or written
        self.metrics = open_loggers(cfg.logger, self.out, cfg.to_dict(), warn=self.display.log, enabled=group.is_main)

    # -- set-up -----------------------------------------------------------------------------

    def _init_from(self, path: str) -> None:
        from dinocli.weights import load_state_dict_strict

        weights = read_backbone_weights(path)
        load_state_dict_strict(self.student.backbone, weights.state_dict, what=self.cfg.arch)
        if weights.head:
            load_state_dict_strict(self.student.head, weights.head, what="the DINO head")

    def make_dataset(self, seed: int | None = None) -> MultiCropDataset:
        """The training images as this run augments them: on the device (``--augment-on gpu``:
        decoded, cropped and coloured in :meth:`step`), split (``split``: cut, resized and flipped
        in the workers, coloured in :meth:`step`), or in the workers, which for a GPU send uint8
        levels that :meth:`step` normalises there (a quarter of the bytes of float views)."""
        from dinocli.data.multicrop_dataset import MultiCropDataset

        return MultiCropDataset(
            self.paths, self.augmentation, seed=self.cfg.seed if seed is None else seed,
            on_bad_image=self.cfg.on_bad_image, on_device=self.cfg.augment_on == "gpu",
            colour_on_device=self.cfg.augment_on == "split", levels=self.device.type == "cuda",
            name=get_registry().describe("augmentations", self.cfg.augmentation),
        )  # fmt: skip

    def _loader(self) -> DataLoader:
        from dinocli.data.multicrop_dataset import collate_multicrop

        self.dataset = self.make_dataset()
        workers = self.cfg.num_workers
        if workers < 0:
            workers = training_workers(self.device, self.cfg.augment_on)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_multicrop,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            worker_init_fn=_ignore_sigint,
        )

    def resume_if_possible(self) -> bool:
        """Continue from ``RUN/checkpoint.pth`` when it exists; says so."""
        path = self.out / LATEST
        if not path.exists():
            self._forget_earlier_metrics()
            return False
        ckpt = load_checkpoint(path)
        saved = ckpt.get("config", {})
        # an option that did not exist when the run was saved had its default's effect
        before = {**PretrainConfig().to_dict(), **saved} if saved else {}
        if self.cfg.init_from and before.get("init_from") != self.cfg.init_from:
            raise UsageError(
                f"{self.out} already holds a run ({path}); --init-from starts a new one: give another --output, "
                "or drop --init-from to resume this run"
            )
        changed = [k for k in STRUCTURAL if k in before and _plain(before[k]) != _plain(getattr(self.cfg, k))]
        if changed:
            details = ", ".join(f"{k}: {before[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            keep = " ".join(
                f"--{k.replace('_', '-')} {before[k]}" for k in changed if isinstance(before[k], (int, float, str))
                and not isinstance(before[k], bool)
            )  # fmt: skip
            hint = f"give {keep} to go on with it, " if keep else ""
            raise UsageError(
                f"{path} was trained with other settings ({details}); {hint}use another --output "
                "or --init-from to start a new run from its weights"
            )
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.strategy.load_state_dict(ckpt["strategy"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.skipped_images = int(ckpt.get("skipped_images", 0))
        loss_sum, loss_count = ckpt.get("epoch_loss", (0.0, 0))
        self.epoch_loss = (float(loss_sum), int(loss_count))
        self.epoch_skipped = int(ckpt.get("epoch_skipped", 0))
        self.metrics.rewind(self.iteration)
        self._adapt_to_epoch_length(
            int(ckpt.get("global_batch", self.global_batch)), int(ckpt.get("num_images", len(self.paths))), path
        )
        other = [k for k in saved if k not in STRUCTURAL and k != "output"
                 and _plain(saved[k]) != _plain(getattr(self.cfg, k, None))]
        note = f" (changed: {', '.join(other)})" if other else ""
        self.display.log(
            f"resuming from {path}: epoch {self.epoch}, iteration {self.iteration}{note}"
        )
        return True

    def _adapt_to_epoch_length(self, saved_batch: int, saved_images: int, path: Path) -> None:
        """A run saved with another global batch (processes x --batch-size) or another number of
        images goes on from its epoch end, with the schedules of the new epoch length."""
        changes = []
        if saved_batch != self.global_batch:
            changes.append(f"the global batch changed from {saved_batch} to {self.global_batch}")
        if saved_images != len(self.paths):
            changes.append(f"the data changed from {saved_images} to {len(self.paths)} images")
        if not changes:
            return
        if self.iteration != self.epoch * (saved_images // saved_batch):
            raise UsageError(
                f"{path} was saved in the middle of an epoch, and {' and '.join(changes)}: resume it with "
                "the same images and global batch (processes x --batch-size), or start a new run from its "
                "weights with --init-from"
            )
        self.iteration = self.epoch * self.iters_per_epoch
        self.display.log(
            f"{'; '.join(changes)}: the schedules continue from the start of the next epoch"
        )

    def _forget_earlier_metrics(self) -> None:
        """A new run in a folder whose checkpoint is gone starts its metrics afresh, and says so."""
        earlier = self.out / "metrics.jsonl"
        if self.group.is_main and earlier.is_file() and earlier.stat().st_size:
            self.display.log(
                f"{self.out} has no checkpoint to resume: this new run replaces the records of the earlier one "
                "in metrics.jsonl"
            )
        self.metrics.rewind(0)

    # -- training ---------------------------------------------------------------------------

    def run(self, stop_after_epoch: int | None = None) -> PretrainResult:
        """Train to ``cfg.epochs`` (or stop after epoch ``stop_after_epoch``, as an interruption would)."""
        cfg = self.cfg
        last_epoch = cfg.epochs if stop_after_epoch is None else min(stop_after_epoch, cfg.epochs)
        resumed = self.resume_if_possible()
        if not same_on_all_processes(self.iteration):
            raise DinoError(
                f"the processes found different checkpoints in {self.out}; every node must see "
                "the same --output folder (a shared file system) to resume"
            )
        if self.group.is_main:
            if self.epoch < last_epoch or not resumed:  # a finished run keeps the settings it was trained with
                atomic_write_text(self.out / "config.toml", to_toml(cfg))
            if not resumed:
                self.display.log(to_toml(cfg).rstrip())
            self.display.log(
                f"{len(self.paths)} images, {self.iters_per_epoch} iterations per epoch, "
                f"device {self.device}, precision {self.precision}, "
                f"{self.group.world_size} process(es)"
            )
        history: list[dict[str, Any]] = []
        last_loss = float("nan")
        loader = self._loader() if self.epoch < last_epoch else None
        with self._sigint_saves_checkpoint():
            while self.epoch < last_epoch:
                done_in_epoch = self.iteration - self.epoch * self.iters_per_epoch
                self.sampler.set_epoch(self.epoch, skip_batches=max(done_in_epoch, 0))
                self.dataset.set_epoch(self.epoch)
                record = self.train_one_epoch(loader, max(done_in_epoch, 0))
                last_loss = record["loss"]
                history.append(record)
                self.epoch += 1
                self.save()
                knn = self._monitor_knn()
                if knn is not None:
                    history.append(knn)
        self.display.close()
        if self.group.is_main and self.skipped_images:
            self.display.log(f"{self.skipped_images} unreadable image(s) were skipped in this run")
        return PretrainResult(
            output=self.out,
            checkpoint=self.out / LATEST,
            epochs=self.epoch,
            iterations=self.iteration,
            last_loss=last_loss,
            skipped_images=self.skipped_images,
            history=history,
        )

    def train_one_epoch(self, loader: DataLoader, done: int) -> dict[str, Any]:
        cfg, sched = self.cfg, self.schedules
        self.student.train()
        self.display.start_epoch(self.epoch, done)
        temp = sched.teacher_temp(self.epoch)
        if not done:  # else resumed mid-epoch: the checkpoint's sums of the epoch's first part go on
            self.epoch_loss, self.epoch_skipped = (0.0, 0), 0
        stepped = False
        tick, tick_images = time.perf_counter(), 0
        start = time.perf_counter()
        batches = TimedIterator(loader)  # how long each logged interval waited for the workers
        for views, n_skipped in batches:
            self.epoch_skipped += n_skipped
            if not self._all_have_images(bool(views)):  # nothing to learn from on some process
                self.iteration += 1
                continue
            it = self.iteration
            lr, wd, momentum = sched.lr(it), sched.weight_decay(it), sched.momentum(it)
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = lr
                if i == 0:
                    group["weight_decay"] = wd
            log_now = (self.iteration + 1) % cfg.log_every == 0 or not stepped  # and the first step
            losses, extra = self.step(views, temp, momentum, diagnose=log_now)
            stepped = True
            self._add_losses(losses)
            self.iteration += 1
            n_images = len(views) if hasattr(views, "finish") else views[0].shape[0]  # encoded or views
            tick_images += n_images * self.group.world_size
            if log_now:
                now = time.perf_counter()
                record = {
                    "epoch": self.epoch, "iteration": self.iteration, "loss": losses[-1], "lr": lr,
                    "wd": wd, "momentum": momentum, "teacher_temp": temp,
                    "images_per_s": tick_images / max(now - tick, 1e-9),
                    "data_wait": min(batches.take() / max(now - tick, 1e-9), 1.0), **extra,
                }
                tick, tick_images = now, 0
                issued = self.detector.check(record)
                if issued:
                    record["collapse_warning"] = ",".join(issued)
                self.metrics.write(record)
                self.display.update({**record, **self._last_knn}, log_line=True)
            elif losses:
                self.display.update({"loss": losses[-1]}, log_line=False)
            if self._stop_agreed or (self.group.world_size == 1 and self._interrupted):
                self._save_interrupted()  # after this iteration's log line
        self._add_losses(self.settle())
        (total, count), skipped = self.epoch_loss, self.epoch_skipped
        self.skipped_images += skipped
        elapsed = time.perf_counter() - start
        record = {
            "epoch": self.epoch, "iteration": self.iteration, "loss": total / max(count, 1),
            "epoch_time_s": elapsed, "skipped_images": skipped, "summary": "epoch",
        }
        self.epoch_loss, self.epoch_skipped = (0.0, 0), 0  # what the end-of-epoch checkpoint holds
        self.metrics.write(record)
        self.display.log(
            f"epoch {self.epoch + 1}/{cfg.epochs} done: loss {record['loss']:.4f}, "
            f"{elapsed:.1f}s" + (f", {skipped} unreadable image(s) skipped" if skipped else "")
        )
        return record

    def step(
        self, views: list[torch.Tensor], temp: float, momentum: float, diagnose: bool = True
    ) -> tuple[list[float], dict]:
        """One iteration: forward both networks, DINO loss, update the student, then the teacher.

        The host does not wait for the device inside the step: this iteration's loss is read at the
        next step (or by :meth:`settle`), once the device has the next iteration queued. Returns
        the losses read (:meth:`settle` keeping this step's; every loss, this one last, with
        ``diagnose``) and, with ``diagnose`` (logged iterations), the strategy's metrics and the
        collapse diagnostics (:func:`dinocli.train.diagnostics.batch_diagnostics`).
        """
        cfg = self.cfg
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        if hasattr(views, "finish"):  # encoded images (--augment-on gpu) or uint8 levels (split, cpu): on the device
            views = views.finish(self.device)
        views = [v.to(self.device, non_blocking=True, memory_format=fmt) for v in views]
        noise = global_batch_noise(
            step_seed(cfg.seed, self.iteration), views[0].shape[0], self.device, self.group
        )
        with autocast(self.precision, self.device):
            with torch.no_grad():
                teacher_emb, teacher_logits = self.teacher(views[: self.n_global])
            with noise:  # stochastic depth per sample, whatever the number of processes
                student_emb, student_logits = self.model(views)
        teacher_logits = teacher_logits.float()
        targets = self._call_strategy("targets", teacher_logits, temp, check=_like(teacher_logits))
        loss = multicrop_cross_entropy(student_logits, targets, self.n_crops, STUDENT_TEMP)
        n_global_rows = teacher_logits.shape[0]
        reg = self._call_strategy(
            "regularizer", student_emb[:n_global_rows].float(), student_logits.float(), check=_scalar_or_none
        )
        if reg is not None:
            loss = loss + reg
        # All processes agree on the mean loss, on stopping, and on going on; read by settle().
        agreement = agree_on_step(loss, views[0].shape[0], stop=self._interrupted)
        self._unsettled.append((self.epoch, self.iteration, agreement))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.clip_grad > 0:
            clip_gradients(self.params, cfg.clip_grad, cfg.clip_grad_mode)
        if self.epoch < cfg.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.teacher, self.student, momentum)
        self._call_strategy("update", teacher_logits)
        if not diagnose:
            return self.settle(keep=1), {}
        losses = self.settle()
        self._require_probabilities(targets)
        extra = self._call_strategy("metrics", check=_numbers)
        extra.update(
            batch_diagnostics(targets, student_logits.detach(), teacher_emb, self.n_crops, STUDENT_TEMP)
        )
        if self.device.type == "cuda":
            extra["max_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return losses, extra

    def settle(self, keep: int = 0) -> list[float]:
        """The mean losses of the steps whose losses are still on the device, all but the newest
        ``keep``, read with one host-device sync. Raises :class:`DinoError` for a non-finite one
        (no checkpoint has been written since: a checkpoint is written after a settle), and notes
        a stop that a process asked for (Ctrl-C), so that all processes stop at the same step.
        """
        ready = self._unsettled[: max(len(self._unsettled) - keep, 0)]
        if not ready:
            return []
        del self._unsettled[: len(ready)]
        losses = []
        for (epoch, iteration, _), agreed in zip(ready, read_agreements([a for *_, a in ready])):
            self._stop_agreed = self._stop_agreed or agreed.stop
            if not agreed.finite:
                world = self.group.world_size
                where = f" on at least one of {world} processes" if world > 1 else ""
                raise DinoError(
                    f"the loss became {agreed.loss} at epoch {epoch + 1}, iteration {iteration + 1}"
                    f"{where}; {self._checkpoint_state()}. Try --precision "
                    "fp32, a lower --lr, a smaller --clip-grad or a longer --warmup-epochs"
                )
            losses.append(agreed.loss)
        return losses

    def _call_strategy(self, method: str, *args: Any, check: Callable[[Any], Any] | None = None) -> Any:
        """``self.strategy.<method>(*args)``, as ``check`` takes it (it raises ``ValueError`` with what
        is wrong); a failure or a wrong result names the plugin behind ``--collapse``."""
        try:
            result = getattr(self.strategy, method)(*args)
        except DinoError:
            raise
        except Exception as exc:
            raise self._strategy_error(f"raised in {method}()", f"{type(exc).__name__}: {exc}") from exc
        if check is None:
            return result
        try:
            return check(result)
        except ValueError as exc:
            raise self._strategy_error(f"returned {exc} from {method}()", _CONTRACTS[method]) from None

    def _require_probabilities(self, targets: torch.Tensor) -> None:
        """Targets must be rows of probabilities (read at logged iterations, which wait anyway)."""
        low, worst = torch.stack([targets.min(), (targets.sum(-1) - 1).abs().max()]).tolist()
        if low < 0 or not worst <= 1e-3:
            raise self._strategy_error(
                f"returned targets that are not probabilities (smallest value {low:.4g}, a row sum "
                f"{worst:.4g} away from 1) from targets()", _CONTRACTS["targets"]
            )

    def _strategy_error(self, what: str, detail: str) -> DinoError:
        from dinocli.strategies.combine import parse_collapse

        registry = get_registry()
        plugins = sorted({registry.get("collapse_strategies", n).plugin for n in parse_collapse(self.cfg.collapse)})
        word = "plugin" if len(plugins) == 1 else "plugins"
        return DinoError(
            f"collapse strategy {self.cfg.collapse!r} from {word} {', '.join(repr(p) for p in plugins)} "
            f"{what} at epoch {self.epoch + 1}, iteration {self.iteration + 1}: {detail}; "
            f"{self._checkpoint_state()}"
        )

    def _add_losses(self, losses: list[float]) -> None:
        self.epoch_loss = (self.epoch_loss[0] + sum(losses), self.epoch_loss[1] + len(losses))

    def _checkpoint_state(self) -> str:
        """What a failed run leaves: its last checkpoint intact, or (before the first) none."""
        latest = self.out / LATEST
        return f"the last checkpoint ({latest}) is intact" if latest.is_file() else "no checkpoint was written yet"

    def _monitor_knn(self) -> dict[str, Any] | None:
        """The teacher's k-NN top-1 when ``--knn-every`` says so (main process; logged, shown and
        returned as its metrics record)."""
        if self.knn is None or not self.knn.due(self.epoch, self.cfg.epochs) or not self.group.is_main:
            return None
        result = self.knn.evaluate(self.teacher.backbone)
        self._last_knn = {"knn_top1": result["knn_top1"]}
        record = {"epoch": self.epoch - 1, "iteration": self.iteration, **result, "summary": "knn"}
        self.metrics.write(record)
        self.display.log(
            f"k-NN top-1 (k={result['knn_k']}) of the teacher after epoch {self.epoch}: "
            f"{result['knn_top1']:.2f}% ({result['knn_time_s']:.1f}s)"
            + (f"; linear top-1 {result['linear_top1']:.2f}%" if "linear_top1" in result else "")
        )
        return record

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "skipped_images": self.skipped_images,
            "epoch_loss": [self.epoch_loss[0], self.epoch_loss[1]],
            "epoch_skipped": self.epoch_skipped,
            "config": self.cfg.to_dict(),
            "global_batch": self.global_batch,
            "num_images": len(self.paths),
            "rng": rng_state(),
            BACKBONE_SPEC_KEY: self.spec,
            "dinocli.version": dinocli.__version__,
        }

    def save(self, end_of_epoch: bool = True) -> None:
        """``checkpoint.pth`` now, and ``checkpoint{epoch:04d}.pth`` every ``saveckp_freq`` epochs."""
        if self.group.is_main:
            state = self.state()
            save_checkpoint(self.out / LATEST, state)
            freq = self.cfg.saveckp_freq
            if end_of_epoch and freq and self.epoch % freq == 0:
                save_checkpoint(self.out / f"checkpoint{self.epoch:04d}.pth", state)
        barrier()  # no process goes on (or reads it) before the checkpoint is complete

    def _save_interrupted(self) -> None:
        """Ctrl-C or SIGTERM: keep the last completed iteration (resume accepts it), then stop."""
        self._add_losses(self.settle())  # no checkpoint of a step whose loss was not finite
        self.display.close()
        self.save(end_of_epoch=False)
        self.display.log(
            f"interrupted: saved iteration {self.iteration} to {self.out / LATEST}; "
            "run the same command to continue"
        )
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def _sigint_saves_checkpoint(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM, as schedulers send before they kill) finishes the current
        iteration and saves; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: Any) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _all_have_images(self, has_images: bool) -> bool:
        """Whether every process has images this iteration (all processes must step together)."""
        return has_images if self.group.world_size == 1 else all_processes(has_images)

    def close(self) -> None:
        self.display.close()
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()


#: What each strategy method must return, for the error when it does not.
_CONTRACTS = {
    "targets": "targets() returns probabilities of the teacher logits' shape, rows summing to 1",
    "regularizer": "regularizer() returns a scalar tensor or None",
    "metrics": "metrics() returns a dict of numbers",
}


def _shape_of(value: Any) -> str:
    return f"a {list(value.shape)} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _like(reference: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    """A check that a result is a tensor of ``reference``'s shape."""

    def check(value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor) and value.shape == reference.shape:
            return value
        raise ValueError(f"{_shape_of(value)} for {list(reference.shape)} teacher logits")

    return check


def _scalar_or_none(value: Any) -> torch.Tensor | None:
    if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return value
    raise ValueError(_shape_of(value))


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"a {type(value).__name__}")
    numbers = {}
    for key, number in value.items():
        try:
            numbers[str(key)] = float(number)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{_shape_of(number)} as {key!r}") from None
    return numbers


def _is_cnn(backbone: nn.Module) -> bool:
    """More than one 2-d convolution (a ViT has a single one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1


def _ignore_sigint(worker_id: int) -> None:
    """Data-loading workers leave Ctrl-C to the main process, which saves a checkpoint. (Not
    SIGTERM: the DataLoader ends workers that do not stop in time with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
