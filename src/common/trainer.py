"""The training loop shared by train_improved.py and train_fp8.py.

config -> process group -> model -> loader (restored state) -> loop: batch -> forward/backward
under autocast -> DDP all-reduce -> clip -> optimizer step -> metrics -> eval / samples /
checkpoint / shutdown check at step boundaries.

The entry scripts differ only in how the model is built and which precision context wraps the
forward pass (`ModelSpec`); everything else is here, written once.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import __version__
from common.checkpoint import Checkpointer, CheckpointError, estimate_state_bytes
from common.config import C, TrainConfig, config_to_dict, from_dict, git_commit
from common.data import DatasetIndex, ShardedTrainLoader, ValReader
from common.dist import (
    DistContext,
    all_reduce_mean,
    destroy,
    gather_objects,
    init_distributed,
    rank0_decides,
    seed_everything,
)
from common.errors import RunFailed, UserError
from common.logger import RunLogger, setup_logging
from common.metrics import (
    StepTimer,
    flops_per_token,
    format_duration,
    gpu_peak_flops,
    measure_matmul_peak,
    memory_stats,
)
from common.model import GPT, GPTConfig
from common.optim import build_adamw, lr_at
from common.rng import capture_rng_state, restore_rng_state
from common.signals import GracefulShutdown
from common.tokenizer import get_tokenizer

log = logging.getLogger("train")

# Config fields that may differ between a checkpoint and the run resuming it (logged when they do).
# Any other difference outside the model shape is logged too; the model shape must match.
_RESUME_TOLERATED = ("max_steps", "eval_freq", "checkpoint_freq", "log_freq", "batch_size",
                     "keep_rolling", "keep_epoch", "resume", "use_tensorboard", "use_wandb")


@dataclass
class ModelSpec:
    """What an entry script decides about the model: how to build it and in which precision."""

    build: Callable[[GPTConfig], torch.nn.Module]
    precision: str  # "bf16", "fp32", "fp8-hybrid-delayed"...: recorded in log, meta and hparams
    autocast_dtype: torch.dtype | None  # torch.autocast dtype around the forward, None for fp32
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext  # e.g. TE's FP8 autocast
    allow_compile: bool = True
    meta: dict[str, Any] = field(default_factory=dict)  # extra facts for the checkpoint's meta
    # Adapts a checkpoint's model state to this model before a strict load (FP8 scaling state).
    adapt_state_dict: Callable[[dict[str, Any], torch.nn.Module], dict[str, Any]] | None = None


def resolve_autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; fp32 on CPU and MPS unless asked (bf16 matmuls are emulated and
    hundreds of times slower on CPUs without native support)."""
    choice = cfg.dtype
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def plain_model_spec(cfg: TrainConfig, ctx: DistContext) -> ModelSpec:
    dtype = resolve_autocast_dtype(cfg, ctx.device)
    return ModelSpec(build=GPT, autocast_dtype=dtype,
                     precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])


# ---------------------------------------------------------------------------- setup helpers

def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_step:
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size x block_size x "
            f"world_size = {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_step}; "
            f"use a multiple of {per_step}")
    return cfg.total_batch_size // per_step


def planned_steps(cfg: TrainConfig, index: DatasetIndex) -> int:
    """max_steps, or enough steps for `epochs` passes over the tokens the dataset will hold
    (meta.json's expected total, so a cache still being written sizes the schedule right)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * index.expected_train_tokens() / cfg.total_batch_size))


# Always taken from the command that resumes, never from the checkpoint: they describe this
# machine and this invocation, not the run.
_NOT_INHERITED = ("resume", "device", "cpu_threads")


def resume_config(saved: dict[str, Any], cfg: C, explicit: set[str]) -> tuple[C, dict[str, tuple[Any, Any]]]:
    """The config a resumed run continues with: the checkpoint's own, with every field the user
    set now (in --config or as a flag) on top, and what differs from the saved one. `--resume
    latest` alone thus continues the run as it was; a different model shape is refused."""
    known = {f.name for f in fields(cfg)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: getattr(cfg, k) for k in set(explicit) | set(_NOT_INHERITED)})
    merged = from_dict(type(cfg), values, "the checkpoint's config")
    merged.validate()
    wrong = {k: (saved.get(k), v) for k, v in merged.model_shape().items() if saved.get(k) != v}
    if wrong:
        desc = ", ".join(f"{k}={old} in the checkpoint but {new} now" for k, (old, new) in wrong.items())
        raise UserError(f"the checkpoint's model shape differs from the config ({desc}); "
                        "resume with the same model settings or start a fresh --checkpoint_dir")
    changes = {k: (saved[k], v) for k, v in config_to_dict(merged).items()
               if k in saved and saved[k] != v and k != "resume"}
    return merged, changes


class _Progress:
    """A tqdm bar on a terminal (rank 0); plain log lines every log_freq steps otherwise."""

    def __init__(self, enabled: bool, start: int, total: int, log_freq: int) -> None:
        self.bar = None
        self.log_freq = log_freq
        self.total = total
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, summary: str, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif step % self.log_freq == 0 or step == self.total or step == 1:
            log.info("step %d/%d | %s", step, self.total, summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- the run

class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext,
                 make_spec: Callable[[TrainConfig, DistContext], ModelSpec], explicit: set[str]) -> None:
        self.ctx = ctx
        resume_path = self._resolve_resume(cfg)
        checkpoint = self._make_checkpointer(cfg).load(resume_path) if resume_path else None
        changes: dict[str, tuple[Any, Any]] = {}
        if checkpoint is not None:
            cfg, changes = resume_config(checkpoint["config"], cfg, explicit)
        setup_logging(Path(cfg.log_dir), is_main=ctx.is_main, rank=ctx.rank)  # the run's own log_dir
        for key, (old, new) in changes.items():
            log.info("resume: %s changed from %r to %r", key, old, new)
        self.cfg = cfg
        self.checkpointer = self._make_checkpointer(cfg)
        self.spec = spec = make_spec(cfg, ctx)
        self.index = DatasetIndex.open(cfg.data_dir)
        if self.index.vocab_size > cfg.vocab_size:
            raise UserError(f"the dataset's tokenizer has {self.index.vocab_size} tokens but --vocab_size is "
                            f"{cfg.vocab_size}; set --vocab_size {self.index.vocab_size}")
        self.grad_accum = gradient_accumulation_steps(cfg, ctx.world_size)
        self.max_steps = planned_steps(cfg, self.index)

        # Same seed everywhere for the init (DDP broadcasts rank 0's weights anyway); a per-rank
        # stream afterwards so dropout masks differ between ranks.
        seed_everything(cfg.seed)
        self.raw_model = spec.build(GPTConfig.from_train_config(cfg)).to(ctx.device)
        self.optimizer = build_adamw(self.raw_model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     betas=(cfg.beta1, cfg.beta2), device=ctx.device)
        seed_everything(cfg.seed + ctx.rank)

        self.loader = ShardedTrainLoader(cfg.data_dir, block_size=cfg.block_size,
                                         micro_batch_size=cfg.batch_size, grad_accum_steps=self.grad_accum,
                                         rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                         device=ctx.device)
        self.step = 0
        self.best_val_loss = math.inf
        self.last_val_loss: float | None = None
        self.tokens_seen = 0
        self.latest_saved_step: int | None = None
        logger_state = None
        if checkpoint is not None:
            self._restore(checkpoint, resume_path)
            logger_state = checkpoint.get("logger")
        self.model = self._wrap(self.raw_model)
        self.run_logger = RunLogger(Path(cfg.log_dir), enabled=ctx.is_main, use_tensorboard=cfg.use_tensorboard,
                                    use_wandb=cfg.use_wandb, config=config_to_dict(cfg),
                                    resume_step=self.step if checkpoint is not None else None,
                                    state=logger_state, wandb_project=cfg.wandb_project,
                                    wandb_run_name=cfg.run_name or None)
        self.shutdown = GracefulShutdown()
        self.flops_per_token = flops_per_token(self.raw_model.num_params(), cfg.n_layer, cfg.n_embd,
                                               cfg.block_size)
        self.peak_flops, self.peak_source = self._peak_flops()
        self.tokenizer = get_tokenizer(self.index.tokenizer_name) if cfg.sample_tokens else None

    # -- setup -----------------------------------------------------------------------------

    def _make_checkpointer(self, cfg: TrainConfig) -> Checkpointer:
        return Checkpointer(cfg.checkpoint_dir, keep_rolling=cfg.keep_rolling, keep_epoch=cfg.keep_epoch,
                            async_save=cfg.async_checkpoint, enabled=self.ctx.is_main)

    def _resolve_resume(self, cfg: TrainConfig) -> Path | None:
        """Rank 0 picks (and validates) the checkpoint; every rank then loads the same file."""
        def choose() -> str | None:
            checkpointer = self._make_checkpointer(cfg)
            if cfg.resume:
                path = checkpointer.resolve(cfg.resume)
                return str(path) if path is not None else None
            if checkpointer.list():
                # A fresh run would overwrite latest.pt of the run already there: refuse instead.
                raise UserError(f"{cfg.checkpoint_dir} already holds checkpoints; continue that run with "
                                "--resume latest (or --resume auto), or start fresh with another --checkpoint_dir")
            return None

        path = rank0_decides(choose, self.ctx)
        return Path(path) if path is not None else None

    def _restore(self, ckpt: dict[str, Any], path: Path | None) -> None:
        model_state = ckpt["model"]
        if self.spec.adapt_state_dict is not None:
            model_state = self.spec.adapt_state_dict(model_state, self.raw_model)
        self.raw_model.load_state_dict(model_state)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["data_state"])
        self.step = int(ckpt["step"])
        self.best_val_loss = float(ckpt.get("best_val_loss") or math.inf)
        self.last_val_loss = ckpt.get("val_loss")
        self.tokens_seen = int(ckpt["meta"].get("tokens_seen", self.step * self.cfg.total_batch_size))
        rng_states = ckpt.get("rng") or []
        if self.ctx.rank < len(rng_states):
            restore_rng_state(rng_states[self.ctx.rank])
        else:
            # More ranks than when saved: a fresh, reproducible stream for the new rank.
            seed_everything(self.cfg.seed + self.ctx.rank + 1_000_003 * self.step)
        saved_world = ckpt["meta"].get("world_size")
        if saved_world != self.ctx.world_size:
            log.info("resume: world size changed from %s to %d; each step still consumes the same "
                     "%d samples", saved_world, self.ctx.world_size, self.cfg.total_batch_size // self.cfg.block_size)
        log.info("resumed from %s at step %d (epoch %.2f, val_loss %s)", path, self.step, self.loader.epoch_progress(),
                 f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "n/a")

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        use_compile = self.cfg.compile if self.cfg.compile is not None else self.ctx.device.type == "cuda"
        if use_compile and not self.spec.allow_compile:
            log.info("torch.compile disabled for this model (see the precision log line above)")
            use_compile = False
        if use_compile:
            model = torch.compile(model)
        if self.ctx.distributed:
            device_ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            # Gradients live in DDP's buckets: no copy between them and .grad.
            model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
        return model

    def _peak_flops(self) -> tuple[float | None, str]:
        peak = gpu_peak_flops(self.ctx.device)
        if peak is not None:
            return peak, "bf16 table peak of the GPU"
        if self.ctx.device.type == "cpu":
            # Measured with the same thread budget the rank trains with: the CPU's own MFU.
            return measure_matmul_peak(self.ctx.device, n=1024, repeats=8), "measured fp32 matmul peak"
        return None, "unknown"

    # -- state -----------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any] | None:
        """Collective: every rank contributes its RNG state; rank 0 gets the full dict."""
        rng_states = gather_objects(capture_rng_state(), self.ctx)
        if not self.ctx.is_main:
            return None
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epochs_completed(),
            "val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "config": config_to_dict(self.cfg),
            "data_state": self.loader.state_dict(),
            "rng": rng_states,
            "scheduler": {"step": self.step, "max_steps": self.max_steps, "warmup_steps": self.cfg.warmup_steps},
            "logger": self.run_logger.state_dict(),
            "meta": {
                "version": __version__,
                "git_commit": git_commit(),
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "torch_version": str(torch.__version__),
                "world_size": self.ctx.world_size,
                "tokens_seen": self.tokens_seen,
                "precision": self.spec.precision,
                **self.spec.meta,
            },
        }

    def _wait_for_writes(self) -> None:
        if self.ctx.is_main:
            try:
                self.checkpointer.wait()
            except CheckpointError as err:
                raise RunFailed(str(err)) from None

    def save(self, tiers: set[str], wait: bool = False) -> None:
        if "latest" in tiers:
            self.latest_saved_step = self.step
        state = self._checkpoint_state()
        if state is not None:
            try:
                self.checkpointer.save(state, step=self.step, epoch=self.epochs_completed(),
                                       val_loss=self.last_val_loss, tiers=tiers)
            except CheckpointError as err:
                raise RunFailed(str(err)) from None
            if wait:
                self._wait_for_writes()

    # -- evaluation ------------------------------------------------------------------------

    def _autocast(self) -> ContextManager:
        if self.spec.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.spec.autocast_dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        reader = ValReader(self.cfg.data_dir, block_size=self.cfg.block_size, micro_batch_size=self.cfg.batch_size,
                           rank=self.ctx.rank, world_size=self.ctx.world_size, max_batches=self.cfg.eval_batches,
                           device=self.ctx.device)
        total = torch.zeros((), device=self.ctx.device)
        batches = 0
        for x, y in reader:
            with self._autocast(), self.spec.forward_context():
                _, loss = self.model(x, y)
            total += loss.detach().float()
            batches += 1
        self.model.train()
        if batches == 0:
            raise UserError(f"{self.cfg.data_dir} has no validation windows of block_size {self.cfg.block_size}")
        return all_reduce_mean(total / batches, self.ctx).item()

    def sample_text(self) -> str | None:
        if not (self.ctx.is_main and self.tokenizer is not None):
            return None
        self.raw_model.eval()
        prompt = self.tokenizer.encode_ordinary(self.cfg.sample_prompt) or [self.index.eot_token]
        idx = torch.tensor([prompt], dtype=torch.long, device=self.ctx.device)
        generator = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.seed + self.step)
        with self._autocast():
            out = self.raw_model.generate(idx, self.cfg.sample_tokens, generator=generator)
        self.raw_model.train()
        return self.tokenizer.decode(out[0].tolist())

    def _evaluate_and_log(self) -> bool:
        """Evaluate, log, sample; True when the val loss is the best so far."""
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.run_logger.log_eval(self.step, val_loss)
        log.info("step %d | val_loss %.4f | best %.4f%s", self.step, val_loss, self.best_val_loss,
                 " (new best)" if improved else "")
        text = self.sample_text()
        if text is not None:
            self.run_logger.log_sample(self.step, text)
        return improved

    # -- the loop --------------------------------------------------------------------------

    def _train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.ctx.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            # Gradients are all-reduced only on the last micro-step.
            last = micro == self.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.model.no_sync()
            with sync:
                with self._autocast(), self.spec.forward_context():
                    _, loss = self.model(x, y)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        next_step = self.step + 1
        if self.cfg.histogram_freq and next_step % self.cfg.histogram_freq == 0:
            self.run_logger.log_histograms(next_step, self.raw_model)  # while the gradients exist
        return all_reduce_mean(loss_sum / self.grad_accum, self.ctx), grad_norm

    def _log_step(self, loss: float, grad_norm: float, lr: float, step_time: float, timer: StepTimer,
                  progress: _Progress) -> None:
        tokens_per_sec = self.cfg.total_batch_size / step_time
        mfu = (self.flops_per_token * tokens_per_sec / (self.peak_flops * self.ctx.world_size)
               if self.peak_flops else None)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                   "step_time": step_time, "time": time.time(), "tokens": self.tokens_seen,
                   "epoch": self.loader.epoch_progress(),
                   **({"mfu": mfu} if mfu is not None else {}), **memory_stats(self.ctx.device)}
        self.run_logger.log_step(self.step, metrics)
        eta = format_duration(timer.eta_seconds(self.max_steps - self.step))
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        summary = (f"loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | "
                   f"mfu {mfu_text} | eta {eta}")
        progress.update(self.step, summary, {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_sec:,.0f}",
                                             "eta": eta})

    def run(self) -> int:
        cfg = self.cfg
        if self.step >= self.max_steps:
            log.info("checkpoint is at step %d and max_steps is %d: nothing left to train", self.step, self.max_steps)
            return 0
        estimate = estimate_state_bytes(self.raw_model, self.optimizer)
        rank0_decides(lambda: self.checkpointer.prepare(estimate), self.ctx)
        self._log_start()
        timer = StepTimer()
        progress = _Progress(self.ctx.is_main, self.step, self.max_steps, cfg.log_freq)
        stopped_by_signal = False
        with self.shutdown:
            try:
                while self.step < self.max_steps:
                    lr = lr_at(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                               max_steps=self.max_steps, min_lr_ratio=cfg.min_lr_ratio)
                    epochs_before = self.epochs_completed()
                    loss_t, grad_norm_t = self._train_step(lr)
                    loss, grad_norm = loss_t.item(), grad_norm_t.item()
                    if not math.isfinite(loss):
                        raise RunFailed(f"loss is {loss} at step {self.step + 1}; no checkpoint was written "
                                        f"after step {self.step}. Resume from the last good one with a lower "
                                        "--learning_rate or more --warmup_steps")
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.tokens_seen += cfg.total_batch_size
                    step_time = timer.lap()
                    self._log_step(loss, grad_norm, lr, step_time, timer, progress)
                    self._after_step(epochs_before)
                    if self.ctx.is_main:
                        self._raise_if_write_failed()
                    if self.shutdown.should_stop(self.ctx.device):
                        stopped_by_signal = True
                        break
                    timer.lap(skip_average=True)  # eval and checkpoint time stays out of the ETA
            finally:
                progress.close()
            if stopped_by_signal:
                self._shutdown_save()
                return 0
        self._finish()
        return 0

    def epochs_completed(self) -> int:
        return math.floor(self.loader.epoch_progress())

    def _after_step(self, epochs_before: int) -> None:
        """Evaluation, histograms and checkpoints due after this step. Every name a step earns
        is saved in one write (the other names are hard links to it)."""
        cfg, step = self.cfg, self.step
        tiers: set[str] = set()
        if step % cfg.eval_freq == 0 or step == self.max_steps:
            if self._evaluate_and_log():
                tiers.add("best")
        if step % cfg.checkpoint_freq == 0:
            tiers |= {"latest", "rolling"}
        if self.epochs_completed() != epochs_before:
            tiers.add("epoch")  # an epoch ended inside this step (decided alike on every rank)
        if step == self.max_steps:
            tiers |= {"latest", "final"}
        if tiers:
            self.save(tiers, wait="final" in tiers)
        if cfg.viz_freq and step % cfg.viz_freq == 0 and self.ctx.is_main:
            self._write_plots()

    def _write_plots(self) -> None:
        from common.plots import write_plots  # matplotlib only when charts are asked for
        try:
            write_plots(Path(self.cfg.log_dir))
        except Exception as err:  # a chart must never end a run
            log.warning("could not write the PNG charts: %s", err)

    def _raise_if_write_failed(self) -> None:
        try:
            self.checkpointer.check_failed()
        except CheckpointError as err:
            raise RunFailed(str(err)) from None

    def _shutdown_save(self) -> None:
        log.warning("received %s: saving step %d to %s/latest.pt", self.shutdown.signal_name or "a signal",
                    self.step, self.cfg.checkpoint_dir)
        if self.latest_saved_step == self.step:
            self._wait_for_writes()  # this step's latest.pt is already being written
        else:
            self.save({"latest"}, wait=True)
        log.warning("saved. Resume with: torchrun --standalone --nproc_per_node=%d %s --resume latest "
                    "(plus the same --config/flags)", self.ctx.world_size, Path(sys.argv[0]).name)

    def _finish(self) -> None:
        self.run_logger.log_hparams(
            {**config_to_dict(self.cfg), "precision": self.spec.precision, "world_size": self.ctx.world_size},
            {"hparam/best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else float("nan"),
             "hparam/final_val_loss": self.last_val_loss if self.last_val_loss is not None else float("nan")})
        log.info("done: %d steps, final val_loss %s, checkpoints in %s", self.step,
                 f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "n/a", self.cfg.checkpoint_dir)

    def _log_start(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        log.info("world size %d (%s) on %s, precision %s", ctx.world_size, ctx.backend or "single process",
                 ctx.device, self.spec.precision)
        log.info("model: %s parameters (%d layers, %d heads, %d dims), %.3g FLOPs/token (6N + 12*L*H*Q*T, PaLM)",
                 f"{self.raw_model.num_params():,}", cfg.n_layer, cfg.n_head, cfg.n_embd, self.flops_per_token)
        log.info("batch: %d tokens/step = %d micro-batches x %d seqs x %d tokens x %d ranks; %d steps "
                 "(%.2f epochs of %s train tokens)", cfg.total_batch_size, self.grad_accum, cfg.batch_size,
                 cfg.block_size, ctx.world_size, self.max_steps,
                 self.max_steps * cfg.total_batch_size / max(1, self.index.expected_train_tokens()),
                 f"{self.index.expected_train_tokens():,}")
        if self.peak_flops:
            log.info("MFU against %s: %.3g FLOP/s per rank", self.peak_source, self.peak_flops)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.checkpointer.wait()
        self.run_logger.close()
        self.loader.close()


def train(cfg: TrainConfig, make_spec: Callable[[TrainConfig, DistContext], ModelSpec],
          explicit: set[str] | None = None) -> int:
    """Run a training job: the entry scripts' whole `main`.

    `explicit` names the fields the user set (in --config or as flags); on resume every other
    field comes from the checkpoint's config.
    """
    ctx = init_distributed(cfg.device, cfg.cpu_threads)
    # A resumed run writes its log where it did before (its log_dir is in the checkpoint): until
    # that is known, log to the console only, unless --log_dir was given.
    resuming_elsewhere = bool(cfg.resume) and "log_dir" not in (explicit or set())
    setup_logging(None if resuming_elsewhere else Path(cfg.log_dir), is_main=ctx.is_main, rank=ctx.rank)
    trainer: Trainer | None = None
    try:
        trainer = Trainer(cfg, ctx, make_spec, explicit if explicit is not None else set())
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        destroy(ctx)
