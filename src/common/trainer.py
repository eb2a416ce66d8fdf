"""The training loop shared by train_improved.py and train_fp8.py.

    train(): process group -> resolve the run (config + checkpoint) -> Trainer -> run()

One optimizer step: micro-batches -> forward/backward under autocast (DDP all-reduces the
gradients on the last one) -> clip -> one small all-reduce of [loss, grad norm, stop, failed]
-> skip-or-step decided on the device (a non-finite or outlying step changes nothing) -> the
host reads the step's numbers one step later (metrics rows, skips, rollbacks, stop requests)
-> evaluation, text sample and checkpoints at the steps they are due.

The entry scripts differ only in how the model is built and which precision context wraps the
forward pass (`ModelSpec`); everything else is here, written once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import __version__
from common.background_charts import BackgroundCharts
from common.checkpoint import Checkpointer, estimate_state_bytes, validate_checkpoint
from common.config import C, TrainConfig, config_to_dict, git_commit, handle_config_actions, parse_args
from common.data import DatasetIndex, ShardedTrainLoader, ValReader
from common.dcp_checkpoint import DCPCheckpointer
from common.dist import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
    destroy,
    gather_objects,
    init_distributed,
    is_collective_failure,
    rank0_decides,
    seed_everything,
    seed_step,
    tighten_timeout,
)
from common.errors import RunFailed, UserError
from common.evals import Example, load_task, score
from common.faults import FaultPlan, Heartbeat, Recovery, SpikeGuard, describe_skip
from common.hf import config_for_init, read_hf_model
from common.logger import RunLogger, log_to_file, setup_logging
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
from common.parallel import (
    LocalShards,
    checkpoint_weights,
    clip_grad_norm,
    gradient_sync,
    is_sharded,
    load_full_state,
    load_weights,
    local_tensor,
    wrap_model,
)
from common.resume import RunPlan, resolve_run
from common.rng import capture_rng_state, restore_rng_state
from common.signals import GracefulShutdown
from common.stepsync import DelayedReadout, Report, StepAgreement
from common.tokenizer import Tokenizer, dataset_tokenizer

log = logging.getLogger("train")

# The per-step report the host reads one step late (common.stepsync), in this order.
REPORT_FIELDS = ("loss", "grad_norm", "skipped", "z_loss", "z_grad", "stop", "failed")


@dataclass
class ModelSpec:
    """What an entry script decides about the model: how to build it and in which precision."""

    build: Callable[[GPTConfig], torch.nn.Module]
    precision: str  # "bf16", "fp32", "fp8-hybrid-delayed"...: recorded in log, meta and hparams
    autocast_dtype: torch.dtype | None  # torch.autocast dtype around the forward, None for fp32
    # Wraps one forward pass (e.g. TE's FP8 autocast). Its argument: True on the first micro-step
    # of an optimizer step, False on the others, None in evaluation and generation.
    forward_context: Callable[[bool | None], ContextManager] = contextlib.nullcontext
    allow_compile: bool = True
    meta: dict[str, Any] = field(default_factory=dict)  # extra facts for the checkpoint's meta
    # Loads a checkpoint's model state into the unwrapped model, strictly. The bool: the file's
    # sha256 was verified against the sidecar the suite wrote (FP8 scaling state is a pickle).
    load_state: Callable[[torch.nn.Module, Mapping[str, Any], bool], None] = (
        lambda model, state, trusted: load_full_state(model, state))


def resolve_autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; fp32 on CPU and MPS unless asked (bf16 matmuls are emulated and
    hundreds of times slower on CPUs without native support)."""
    choice = cfg.dtype
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": None, "bfloat16": torch.bfloat16}[choice]


def plain_model_spec(cfg: TrainConfig, ctx: DistContext) -> ModelSpec:
    dtype = resolve_autocast_dtype(cfg, ctx.device)
    return ModelSpec(build=GPT, autocast_dtype=dtype, precision="fp32" if dtype is None else "bf16")


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_step:
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size x block_size x "
            f"world_size = {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_step}; "
            f"use a multiple of {per_step}")
    return cfg.total_batch_size // per_step


def with_dataset_vocab(cfg: C, index: DatasetIndex) -> C:
    """The config with the model's vocabulary set to the dataset's when --vocab_size is left at 0
    (the model pads it to a multiple of 64 itself)."""
    return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=index.vocab_size)


def planned_steps(cfg: TrainConfig, index: DatasetIndex) -> int:
    """max_steps, or enough steps for `epochs` passes over the tokens the dataset will hold
    (meta.json's expected total, so a cache still being written sizes the schedule right)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * index.expected_train_tokens() / cfg.total_batch_size))


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
            self.bar.update(step - self.bar.n)
        elif step % self.log_freq == 0 or step == self.total or step == 1:
            log.info("step %d/%d | %s", step, self.total, summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    def __init__(self, plan: RunPlan, ctx: DistContext, make_spec: Callable[[Any, DistContext], ModelSpec]) -> None:
        self.index = DatasetIndex.open(plan.cfg.data_dir)
        self.cfg = cfg = with_dataset_vocab(plan.cfg, self.index)
        self.ctx = ctx
        self.spec = spec = make_spec(cfg, ctx)
        if self.index.vocab_size > cfg.vocab_size:
            raise UserError(f"the dataset's tokenizer has {self.index.vocab_size} tokens but --vocab_size is "
                            f"{cfg.vocab_size}; set --vocab_size {self.index.vocab_size}")
        self.grad_accum = gradient_accumulation_steps(cfg, ctx.world_size)
        # Built once, now: a data directory without validation windows is refused before any step.
        self.val_reader = ValReader(self.index, block_size=cfg.block_size, micro_batch_size=cfg.batch_size,
                                    rank=ctx.rank, world_size=ctx.world_size, max_batches=cfg.eval_batches,
                                    device=ctx.device, vocab_size=cfg.vocab_size) if cfg.eval_freq else None
        self.hellaswag = self._load_hellaswag() if cfg.hellaswag_path else None  # checked now, like the above

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.raw_model = spec.build(GPTConfig.from_train_config(cfg)).to(ctx.device)
        if cfg.init_from and plan.checkpoint is None:
            _, hf_state = read_hf_model(cfg.init_from, block_size=cfg.block_size)
            spec.load_state(self.raw_model, hf_state, False)
            log.info("weights from the Hugging Face model in %s (continued pretraining)", cfg.init_from)
        self.model = self._wrap(self.raw_model)  # under fsdp the same object, its parameters now shards
        self.optimizer = build_adamw(self.raw_model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     betas=(cfg.beta1, cfg.beta2))
        self.loader = ShardedTrainLoader(cfg.data_dir, block_size=cfg.block_size,
                                         micro_batch_size=cfg.batch_size, grad_accum_steps=self.grad_accum,
                                         rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                         device=ctx.device, vocab_size=cfg.vocab_size, ctx=ctx)
        self.checkpointer = DCPCheckpointer(cfg.checkpoint_dir, ctx=ctx, keep_rolling=cfg.keep_rolling,
                                            keep_epoch=cfg.keep_epoch, async_save=cfg.async_checkpoint) \
            if cfg.parallel == "fsdp" else \
            Checkpointer(cfg.checkpoint_dir, keep_rolling=cfg.keep_rolling, keep_epoch=cfg.keep_epoch,
                         async_save=cfg.async_checkpoint, enabled=ctx.is_main)
        self.guard = SpikeGuard(zscore=cfg.spike_zscore, window=cfg.spike_window, device=ctx.device)
        self.recovery = Recovery(cfg.max_consecutive_skips, cfg.max_rollbacks)
        self.agreement = StepAgreement(ctx)
        self.readout = DelayedReadout(ctx.device)
        self.faults = FaultPlan(cfg.inject_fault, ctx.rank)
        self.heartbeat = Heartbeat(cfg.log_dir, ctx.rank, ctx.world_size)

        self.step = 0
        self.max_steps = planned_steps(cfg, self.index)
        self.best_val_loss = math.inf
        self.last_val_loss: float | None = None
        self.tokens_seen = 0
        self.latest_saved_step: int | None = None
        self.last_good: tuple[str, int] | None = None  # (checkpoint, step) to name when the run fails
        self.stopping = False
        self._failure: tuple[str, str] | None = None  # ("user" | "failed", line) to share with the others
        self._epochs_before_step = 0
        self._rng_to_restore: dict[str, Any] | None = None
        if plan.checkpoint is not None:
            self._restore(plan.checkpoint, plan.path, plan.verified)
        self.run_logger = RunLogger(Path(cfg.log_dir), enabled=ctx.is_main, use_tensorboard=cfg.use_tensorboard,
                                    use_wandb=cfg.use_wandb, config=config_to_dict(cfg),
                                    resume_step=self.step if plan.checkpoint is not None else None,
                                    state=(plan.checkpoint or {}).get("logger"), wandb_project=cfg.wandb_project,
                                    run_name=cfg.run_name or None)
        self.shutdown = GracefulShutdown(watch_launcher="TORCHELASTIC_RUN_ID" in os.environ)
        self.timer = StepTimer()
        self.flops_per_token = flops_per_token(self.raw_model.num_params(), cfg.n_layer, cfg.n_embd,
                                               cfg.block_size)
        self.peak_flops, self.peak_source = self._peak_flops()
        self.tokenizer = self._load_tokenizer()
        self.charts = BackgroundCharts(Path(cfg.log_dir)) if cfg.viz_freq and ctx.is_main else None
        self.finished = False  # the run reached its end (not stopped, not failed)

    # -- setup -----------------------------------------------------------------------------

    def _restore(self, ckpt: dict[str, Any], path: Path | None, verified: bool) -> None:
        self._load_weights(ckpt, verified)
        self.loader.load_state_dict(ckpt["data_state"])
        self.step = int(ckpt["step"])
        self.best_val_loss = float(ckpt.get("best_val_loss") or math.inf)
        self.last_val_loss = ckpt.get("val_loss")
        self.tokens_seen = int(ckpt["meta"].get("tokens_seen", self.step * self.cfg.total_batch_size))
        self.latest_saved_step = self.step
        self.last_good = (str(path), self.step)
        saved_horizon = (ckpt.get("scheduler") or {}).get("max_steps")
        if self.cfg.max_steps == 0 and saved_horizon:
            # An epochs-sized run keeps the horizon it had: a dataset that grew or finished
            # preparing meanwhile must not move the schedule because the run was restarted.
            self.max_steps = int(saved_horizon)
        elif saved_horizon and saved_horizon != self.max_steps:
            log.info("resume: the schedule's horizon changes from %d to %d steps (--max_steps)",
                     saved_horizon, self.max_steps)
        self.recovery.load_state_dict(ckpt.get("recovery") or {})
        # The saved run's stop request or failure ended that run; they must not end this one.
        transient = [REPORT_FIELDS.index("stop"), REPORT_FIELDS.index("failed")]
        self.readout.load_state_dict([{"step": r["step"], "values": [0.0 if i in transient else v
                                                                     for i, v in enumerate(r["values"])]}
                                      for r in ckpt.get("pending_reports") or []])
        rng_states = ckpt.get("rng") or []
        if self.ctx.rank < len(rng_states):
            self._rng_to_restore = rng_states[self.ctx.rank]  # restored last, right before the first step
        saved_world = ckpt["meta"].get("world_size")
        if saved_world != self.ctx.world_size:
            log.info("resume: world size changed from %s to %d; each step still consumes the same "
                     "%d samples", saved_world, self.ctx.world_size, self.cfg.total_batch_size // self.cfg.block_size)
        log.info("resumed from %s at step %d (epoch %.2f, val_loss %s)", path, self.step, self.loader.epoch_progress(),
                 f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "n/a")

    def _load_weights(self, ckpt: dict[str, Any], verified: bool) -> None:
        """Model, optimizer and skip-window state of a checkpoint (a resume or a rollback)."""
        load_weights(self.raw_model, self.optimizer, ckpt, lambda state: self.spec.load_state(self.raw_model, state,
                                                                                              verified))
        if ckpt.get("guard"):
            self.guard.load_state_dict(ckpt["guard"])

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        use_compile = self.cfg.compile if self.cfg.compile is not None else self.ctx.device.type == "cuda"
        if use_compile and not self.spec.allow_compile:
            log.info("torch.compile disabled for this model (see the precision log line above)")
            use_compile = False
        return wrap_model(model, parallel=self.cfg.parallel, ctx=self.ctx, use_compile=use_compile,
                          activation_checkpointing=self.cfg.activation_checkpointing,
                          bf16_compute=self.spec.autocast_dtype == torch.bfloat16)

    def _peak_flops(self) -> tuple[float | None, str]:
        peak = gpu_peak_flops(self.ctx.device)
        if peak is not None:
            return peak, "bf16 table peak of the GPU"
        if self.ctx.device.type == "cpu":
            # Measured with the same thread budget the rank trains with: the CPU's own MFU.
            return measure_matmul_peak(self.ctx.device, n=1024, repeats=8), "measured fp32 matmul peak"
        return None, "unknown"

    def _load_hellaswag(self) -> list[Example]:
        """HellaSwag's examples in the dataset's tokens (missing or malformed data: UserError now)."""
        def encoder() -> Callable[[str], list[int]]:
            return dataset_tokenizer(self.index).encode_ordinary
        return load_task("hellaswag", self.cfg.hellaswag_path, encoder, self.cfg.vocab_size, self.ctx)

    def _load_tokenizer(self) -> Tokenizer | None:
        """The dataset's tokenizer, for text samples only: the training data is already tokenized,
        so a tokenizer that cannot be loaded costs the run its samples, never the run."""
        if not (self.cfg.sample_tokens and self.cfg.eval_freq and self.ctx.is_main):
            return None
        try:
            return dataset_tokenizer(self.index)
        except UserError as err:
            log.warning("no text samples in this run: %s", err)
            return None

    # -- state -----------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any] | None:
        """Collective: every rank contributes its RNG state; rank 0 gets the full dict (and under
        fsdp every other rank its shards of the model and optimizer state)."""
        rng_states = gather_objects(capture_rng_state(), self.ctx)
        sharded = self.checkpointer.collective
        if not (self.ctx.is_main or sharded):
            return None
        weights = checkpoint_weights(self.raw_model, self.optimizer, sharded=sharded)
        if not self.ctx.is_main:
            return weights
        return {
            **weights,
            "step": self.step,
            "epoch": self.epochs_completed(),
            "val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "config": config_to_dict(self.cfg),
            "data_state": self.loader.state_dict(),
            "rng": rng_states,
            "scheduler": {"step": self.step, "max_steps": self.max_steps, "warmup_steps": self.cfg.warmup_steps},
            "guard": self.guard.state_dict(),
            "recovery": self.recovery.state_dict(),
            "pending_reports": self.readout.state_dict(),
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

    def save(self, tiers: set[str], wait: bool = False) -> None:
        """Save this step under the names of `tiers`. Every rank takes part; a failure on rank 0
        (a full disk on a synchronous save) ends every rank with the same line."""
        self._log_pending_reports()  # metrics.jsonl holds every step up to the checkpoint's
        if not self._weights_finite():
            where = f"; the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})" \
                if self.last_good else ""
            raise RunFailed(f"the weights hold non-finite values at step {self.step}: not saved{where}")
        if "latest" in tiers:
            self.latest_saved_step = self.step
        state = self._checkpoint_state()
        self._on_saving_ranks(lambda: self.checkpointer.save(state, step=self.step, epoch=self.epochs_completed(),
                                                             val_loss=self.last_val_loss, tiers=tiers, wait=wait))
        suffix = self.checkpointer.suffix
        name = next(f"{tier}{suffix}" for tier in ("latest", "final", "best") if tier in tiers) \
            if tiers & {"latest", "final", "best"} else f"epoch_{self.epochs_completed():03d}{suffix}"
        self.last_good = (str(Path(self.cfg.checkpoint_dir) / name), self.step)

    def _on_saving_ranks(self, work: Callable[[], None]) -> None:
        """A checkpointer call: on every rank for sharded checkpoints (their failures reach every
        rank inside), else on rank 0 with its failure handed to every rank."""
        if self.checkpointer.collective:
            work()
        else:
            rank0_decides(work, self.ctx)

    def _weights_finite(self) -> bool:
        bad = torch.zeros((), device=self.ctx.device)
        for p in self.raw_model.parameters():
            bad += (~torch.isfinite(local_tensor(p.detach()))).any().float()
        return all_reduce_sum(bad, self.ctx).item() == 0

    # -- evaluation ------------------------------------------------------------------------

    def _autocast(self) -> ContextManager:
        if self.spec.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.spec.autocast_dtype)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss and next-token accuracy (top-1 prediction == target), means over every
        rank's batches."""
        assert self.val_reader is not None
        self.model.eval()
        totals = torch.zeros(2, device=self.ctx.device)  # loss, accuracy
        batches = 0
        for x, y in self.val_reader:
            with self._eval_forward():
                logits, loss = self.model(x, y)
            totals[0] += loss.detach().float()
            totals[1] += (logits.argmax(dim=-1) == y).float().mean()
            batches += 1
        self.model.train()
        loss, accuracy = all_reduce_mean(totals / batches, self.ctx).tolist()
        return loss, accuracy

    def sample_text(self) -> str | None:
        """A text sample (rank 0's tokenizer). Under fsdp every rank calls this and runs the same
        forward passes (each gathers the weights); rank 0 returns the text."""
        sharded = is_sharded(self.raw_model)
        prompt = None
        if self.tokenizer is not None:
            prompt = self.tokenizer.encode(self.cfg.sample_prompt) or [self.index.eot_token]
        if sharded:
            prompt = broadcast_object(prompt, self.ctx)
        if prompt is None:
            return None
        self.raw_model.eval()
        idx = torch.tensor([prompt], dtype=torch.long, device=self.ctx.device)
        generator = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.seed + self.step)
        with self._autocast():
            out = self.raw_model.generate(idx, self.cfg.sample_tokens, generator=generator)
        self.raw_model.train()
        return self.tokenizer.decode(out[0].tolist()) if self.tokenizer is not None else None

    def _evaluate_and_log(self) -> bool:
        """Evaluate, log, sample; True when the val loss is the best so far."""
        started = time.perf_counter()
        val_loss, accuracy = self.evaluate()
        seconds = time.perf_counter() - started
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.run_logger.log_eval(self.step, val_loss, accuracy, seconds)
        log.info("step %d | val_loss %.4f | val_accuracy %.4f | best %.4f%s | %.2f s", self.step, val_loss,
                 accuracy, self.best_val_loss, " (new best)" if improved else "", seconds)
        return improved

    def _hellaswag_due(self, step: int) -> bool:
        freq = self.cfg.hellaswag_freq or self.cfg.eval_freq
        return self.hellaswag is not None and (step % freq == 0 or step == self.max_steps)

    @contextlib.contextmanager
    def _eval_forward(self) -> Iterator[None]:
        with self._autocast(), self.spec.forward_context(None):
            yield

    def _hellaswag_and_log(self) -> None:
        """Every rank scores its share of HellaSwag; rank 0 logs eval/hellaswag_acc(_norm)."""
        assert self.hellaswag is not None
        started = time.perf_counter()
        scores = score(self.raw_model, self.hellaswag, self.ctx, forward_context=self._eval_forward)
        values = {"eval/hellaswag_acc": scores.acc, "eval/hellaswag_acc_norm": scores.acc_norm}
        self.run_logger.log_event(self.step, "hellaswag", {**values, "examples": scores.examples}, values)
        log.info("step %d | hellaswag acc %.4f | acc_norm %.4f | %d examples in %.1f s", self.step, scores.acc,
                 scores.acc_norm, scores.examples, time.perf_counter() - started)

    def _rank0_extras(self) -> None:
        """Work rank 0 does alone at an evaluation (text sample, charts), the others waiting on the
        control group (long timeout). Under fsdp the sample is generated by every rank first."""
        sample_due = bool(self.cfg.eval_freq and self.step % self.cfg.eval_freq == 0)
        sharded = is_sharded(self.raw_model)
        started = time.perf_counter()
        sharded_text = self.sample_text() if sample_due and sharded else None

        def work() -> None:
            if sample_due:
                text = sharded_text if sharded else self.sample_text()
                if text is not None:
                    self.run_logger.log_sample(self.step, text, prompt=self.cfg.sample_prompt,
                                               seconds=time.perf_counter() - started)
            if self.charts is not None and self.step % self.cfg.viz_freq == 0:
                self.charts.request()
        rank0_decides(work, self.ctx)

    # -- one step --------------------------------------------------------------------------

    def _train_step(self) -> None:
        """Compute step `self.step + 1` and apply it unless the guard skips it; no host sync."""
        cfg, step = self.cfg, self.step + 1
        self.faults.before_step(step)
        self._epochs_before_step = self.epochs_completed()
        seed_step(cfg.seed, self.ctx.rank, step)
        lr = lr_at(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps, max_steps=self.max_steps,
                   min_lr_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.ctx.device)
        for micro in range(self.grad_accum):
            x, y = self._next_batch()
            # Gradients are all-reduced only on the last micro-step.
            with gradient_sync(self.model, last_micro_step=micro == self.grad_accum - 1):
                with self._autocast(), self.spec.forward_context(micro == 0):
                    _, loss = self.model(x, y)
                loss = self.faults.loss(step, loss)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        self.faults.after_backward(step, self.raw_model)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), clip)
        if cfg.histogram_freq and step % cfg.histogram_freq == 0:
            model = LocalShards(self.raw_model) if is_sharded(self.raw_model) else self.raw_model
            self.run_logger.log_histograms(step, model)  # while the gradients exist
        failure = self._local_failure()
        agreed = self.agreement.reduce(loss_sum / self.grad_accum, grad_norm, stop=self.shutdown.requested,
                                       failed=failure is not None)
        # A failure on any rank vetoes the step; every rank stops with its reason one step later.
        skip, z = self.guard.decide(agreed.loss, agreed.grad_norm, veto=agreed.failed)
        self.optimizer.found_inf = skip  # fused AdamW: a skipped step changes no weight, moment or count
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens_seen += cfg.total_batch_size
        report = torch.stack([agreed.loss, agreed.grad_norm, skip, z[0], z[1], agreed.stop, agreed.failed])
        self.readout.push(step, report, {"lr": lr, "step_time": self.timer.lap(), "time": time.time(),
                                         "tokens": self.tokens_seen, "epoch": self.loader.epoch_progress(),
                                         **memory_stats(self.ctx.device)})

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch. A damaged shard (a UserError from the loader) does not end
        this rank alone, leaving the others in a collective: it is reported through the step's
        agreement, and a batch of zeros keeps the ranks in step until they stop together."""
        if self._failure is None:
            try:
                return self.loader.next_batch()
            except UserError as err:
                self._failure = ("user", str(err))
        zeros = torch.zeros(self.cfg.batch_size, self.cfg.block_size, dtype=torch.long, device=self.ctx.device)
        return zeros, zeros

    def _local_failure(self) -> tuple[str, str] | None:
        """A failure this rank must report to the others (a damaged shard, a failed background
        checkpoint write)."""
        if self._failure is None:
            try:
                self.checkpointer.check_failed()
            except RunFailed as err:
                self._failure = ("failed", str(err))
        return self._failure

    # -- the host's side, one step late -------------------------------------------------------

    def _log_report(self, report: Report) -> None:
        """The step's metrics row, TensorBoard scalars and progress line (once per step)."""
        if report.logged:
            return
        report.logged = True
        values = dict(zip(REPORT_FIELDS, report.values()))
        info = report.info
        tokens_per_sec = self.cfg.total_batch_size / info["step_time"]
        mfu = (self.flops_per_token * tokens_per_sec / (self.peak_flops * self.ctx.world_size)
               if self.peak_flops else None)
        metrics = {"loss": values["loss"], "lr": info["lr"], "grad_norm": values["grad_norm"],
                   "tokens_per_sec": tokens_per_sec, "step_time": info["step_time"], "time": info["time"],
                   "tokens": info["tokens"], "epoch": info["epoch"], **({"mfu": mfu} if mfu is not None else {}),
                   **({"skipped": 1} if values["skipped"] else {}),
                   **{k: v for k, v in info.items() if k.startswith("mem_")}}
        self.run_logger.log_step(report.step, metrics)
        eta = format_duration(self.timer.eta_seconds(self.max_steps - report.step))
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        summary = (f"loss {values['loss']:.4f} | lr {info['lr']:.2e} | grad_norm {values['grad_norm']:.3f} | "
                   f"{tokens_per_sec:,.0f} tok/s | mfu {mfu_text} | eta {eta}"
                   + (" | SKIPPED" if values["skipped"] else ""))
        self.progress.update(report.step, summary, {"loss": f"{values['loss']:.3f}",
                                                    "tok/s": f"{tokens_per_sec:,.0f}", "eta": eta})

    def _log_pending_reports(self) -> None:
        for report in self.readout.pending():
            self._log_report(report)

    def _act_on(self, report: Report) -> None:
        """What a step's numbers call for, decided at the end of the next step on every rank:
        skip bookkeeping, a rollback, a failure to share, a stop."""
        self._log_report(report)
        values = dict(zip(REPORT_FIELDS, report.values()))
        if values["failed"]:
            self._fail_together()
        roll_back = self.recovery.record(report.step, bool(values["skipped"]))
        if values["skipped"]:
            why = describe_skip(values, self.cfg.spike_zscore)
            log.warning("step %d skipped: %s (no update; its data is consumed)", report.step, why)
            # Rows and scalars of a decision carry the step it is taken at (the next one), so a
            # resume from the skipped step's checkpoint neither loses nor repeats them.
            self.run_logger.log_event(self.step, "skip", {"skipped_step": report.step, "reason": why,
                                                          "skipped_steps": self.recovery.skipped},
                                      {"train/skipped_steps": self.recovery.skipped})
        if roll_back:
            self._rollback()
        if values["stop"] and not self.stopping:
            self.stopping = True
            self.shutdown.announce(local=self.shutdown.requested)

    def _fail_together(self) -> None:
        failures = [f for f in all_gather_objects(self._failure, self.ctx) if f]
        kind, message = failures[0] if failures else ("failed", "another rank failed")
        raise (UserError if kind == "user" else RunFailed)(message)

    def _rollback(self) -> None:
        """Back to the newest valid checkpoint from before the skips; the data stays where it is."""
        streak = list(self.recovery.streak or [])
        if self.recovery.exhausted:
            where = f"; the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})" \
                if self.last_good else ""
            raise RunFailed(f"{len(streak)} steps skipped in a row after {len(self.recovery.rollbacks or [])} "
                            f"rollbacks ({self.recovery.history()}): the run does not heal itself{where}. "
                            "Lower --learning_rate or check the data, then resume")
        chosen = rank0_decides(lambda: self._rollback_target(streak[0]), self.ctx)
        if chosen is None:
            raise RunFailed(f"{len(streak)} steps skipped in a row ({self.recovery.history()}) and no valid "
                            f"checkpoint from before step {streak[0]} to roll back to; lower --learning_rate "
                            "or --checkpoint_freq and start again")
        ckpt = self.checkpointer.load(Path(chosen))
        self._load_weights(ckpt, verified=True)  # a sidecar'd file whose sha256 was just checked
        to_step = int(ckpt["step"])
        self.recovery.rolled_back(at=self.step, to=to_step)
        count = len(self.recovery.rollbacks or [])
        log.warning("rollback %d/%d at step %d: weights and optimizer of %s (step %d); the data of steps %d-%d "
                    "is not replayed", count, self.cfg.max_rollbacks, self.step, Path(chosen).name, to_step,
                    to_step + 1, self.step)
        self.run_logger.log_event(self.step, "rollback", {"to_step": to_step, "checkpoint": Path(chosen).name,
                                                          "skipped": streak, "rollbacks": count},
                                  {"train/rollbacks": count})

    def _rollback_target(self, before_step: int) -> str | None:
        candidates = [i for i in self.checkpointer.list() if i.valid and isinstance(i.step, int)
                      and i.step < before_step]
        for info in sorted(candidates, key=lambda i: i.step, reverse=True):
            if validate_checkpoint(info.path, full=True)[0]:
                return str(info.path)
        return None

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        if self.step >= self.max_steps:
            log.info("nothing left to train: the checkpoint is at step %d and max_steps is %d; train further "
                     "with a larger --max_steps (make train ARGS='--max_steps %d')", self.step, self.max_steps,
                     max(2 * self.step, self.step + 100))
            return 0
        estimate = self.checkpointer.total_bytes(estimate_state_bytes(self.raw_model, self.optimizer))
        rank0_decides(lambda: self.checkpointer.prepare(estimate), ctx)
        self._log_start()
        self.progress = _Progress(ctx.is_main, self.step, self.max_steps, cfg.log_freq)
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)  # the last thing before the first resumed step
        first_step = self.step + 1
        with self.shutdown:
            try:
                while self.step < self.max_steps:
                    self.heartbeat.beat(self.step)
                    self._train_step()
                    if self.step == first_step:
                        tighten_timeout(ctx)  # start-up is over: a silent rank now ends the run
                    for report in self.readout.due():
                        self._act_on(report)
                    if self._after_step():
                        self.timer.lap(skip_average=True)  # evaluations and saves stay out of tok/s and ETA
                    if self.stopping:
                        break
            except Exception as err:
                if ctx.distributed and is_collective_failure(err):
                    raise RunFailed(self._stall_message(err)) from None
                raise
            finally:
                self.progress.close()
        if self.stopping and self.step < self.max_steps:
            self._shutdown_save()
        else:
            self._finish()
        return 0

    def epochs_completed(self) -> int:
        return math.floor(self.loader.epoch_progress())

    def _after_step(self) -> bool:
        """Evaluation, charts and checkpoints due after this step (True if any was). Every name a
        step earns is saved in one write (the other names are hard links to it)."""
        cfg, step = self.cfg, self.step
        tiers: set[str] = set()
        if cfg.eval_freq and (step % cfg.eval_freq == 0 or step == self.max_steps):
            self._log_pending_reports()
            if self._evaluate_and_log():
                tiers.add("best")
        hellaswag = self._hellaswag_due(step)
        if hellaswag:
            self._log_pending_reports()
            self._hellaswag_and_log()
        if step % cfg.checkpoint_freq == 0:
            tiers |= {"latest", "rolling"}
        if self.epochs_completed() != self._epochs_before_step:
            tiers.add("epoch")  # an epoch ended inside this step (decided alike on every rank)
        if step == self.max_steps:
            tiers |= {"latest", "final"}
        # The sample before the save: an async save's write then overlaps the next training steps
        # instead of competing with the sample for the CPU (a 64-token sample on 2 cores: 0.62 s
        # instead of 0.86 s, medians of 3 alternated runs).
        extras = bool(cfg.eval_freq and step % cfg.eval_freq == 0) or bool(cfg.viz_freq and step % cfg.viz_freq == 0)
        if extras:
            self._rank0_extras()
        if tiers:
            self.heartbeat.beat(step, "checkpoint")
            self.save(tiers, wait="final" in tiers)
        return bool(tiers) or extras or hellaswag

    def _stall_message(self, err: BaseException) -> str:
        good = f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good else "none yet"
        return (f"rank {self.ctx.rank}: a collective did not complete during step {self.step + 1} (timeout "
                f"{self.ctx.timeout_s:g} s after start-up): another rank stopped answering (hung or died): "
                f"{' '.join(str(err).split())[:200]}; last good checkpoint: {good}; continue with --resume latest")

    def _shutdown_save(self) -> None:
        self.heartbeat.beat(self.step, "shutdown save")
        log.warning("stopping: saving step %d to %s/latest%s", self.step, self.cfg.checkpoint_dir,
                    self.checkpointer.suffix)
        if self.latest_saved_step == self.step:
            self._on_saving_ranks(self.checkpointer.settle)  # this step's latest is already being written
        else:
            self.save({"latest"}, wait=True)
        self.heartbeat.beat(self.step, "stopped")  # the save is complete (a job script may requeue now)
        log.warning("saved. Resume with: torchrun --standalone --nproc_per_node=%d %s --resume latest "
                    "(plus the same --config/flags)", self.ctx.world_size, Path(sys.argv[0]).name)

    def _finish(self) -> None:
        for report in self.readout.pending():  # the last step's numbers: logged, nothing left to act on
            self._log_report(report)
        self.run_logger.log_hparams(
            {**config_to_dict(self.cfg), "precision": self.spec.precision, "world_size": self.ctx.world_size},
            {"hparam/best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else float("nan"),
             "hparam/final_val_loss": self.last_val_loss if self.last_val_loss is not None else float("nan")})
        self.heartbeat.beat(self.step, "done")
        self.finished = True
        log.info("done: %d steps, final val_loss %s, checkpoints in %s", self.step,
                 f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "n/a", self.cfg.checkpoint_dir)

    def _log_start(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        log.info("world size %d (%s) on %s, precision %s", ctx.world_size, ctx.backend or "single process",
                 ctx.device, self.spec.precision)
        log.info("model: %s parameters (%d layers, %d heads, %d dims), %.3g FLOPs/token (6N + 12*L*H*Q*T, PaLM)",
                 f"{self.raw_model.num_params():,}", cfg.n_layer, cfg.n_head, cfg.n_embd, self.flops_per_token)
        chunked = getattr(self.raw_model, "uses_fused_ce", lambda device: False)(ctx.device)
        log.info("loss: %s linear + cross-entropy (--fused_ce %s)", "chunked" if chunked else "plain", cfg.fused_ce)
        log.info("batch: %d tokens/step = %d micro-batches x %d seqs x %d tokens x %d ranks; %d steps "
                 "(%.2f epochs of %s train tokens)", cfg.total_batch_size, self.grad_accum, cfg.batch_size,
                 cfg.block_size, ctx.world_size, self.max_steps,
                 self.max_steps * cfg.total_batch_size / max(1, self.index.expected_train_tokens()),
                 f"{self.index.expected_train_tokens():,}")
        if self.peak_flops:
            log.info("MFU against %s: %.3g FLOP/s per rank", self.peak_source, self.peak_flops)

    def close(self) -> None:
        if self.charts is not None:  # a finished run's last charts are drawn; a stopping run's are dropped
            self.charts.close(wait=self.finished)
        with contextlib.suppress(Exception):
            self.checkpointer.close()
        self.run_logger.close()
        self.loader.close()


def main(argv: Sequence[str], config_cls: type[TrainConfig], make_spec: Callable[[Any, DistContext], ModelSpec]) -> int:
    """An entry script's whole main: flags -> config -> --version / --print_config / --save_config,
    or a training run."""
    cfg, actions = parse_args(argv, config_cls)
    if handle_config_actions(cfg, actions):
        return 0
    return train(cfg, make_spec, actions["explicit"])


def train(cfg: TrainConfig, make_spec: Callable[[Any, DistContext], ModelSpec],
          explicit: set[str] | None = None) -> int:
    """Run a training job: the entry scripts' whole `main`.

    `explicit` names the fields the user set (in --config or as flags); on resume every other
    field comes from the checkpoint's config.
    """
    ctx = init_distributed(cfg.device, cfg.cpu_threads, cfg.collective_timeout_s, cfg.log_dir)
    setup_logging(is_main=ctx.is_main, rank=ctx.rank)
    trainer: Trainer | None = None
    try:
        plan = resolve_run(cfg, explicit or set(), ctx)
        if plan.cfg.init_from and plan.checkpoint is None:  # a fresh run takes the model's shape from there
            plan.cfg = config_for_init(plan.cfg, explicit or set())
        log_to_file(Path(plan.cfg.log_dir))  # a resumed run logs where it did before
        trainer = Trainer(plan, ctx, make_spec)
        return trainer.run()
    except (RunFailed, UserError) as err:
        if trainer is not None:  # monitors (and tests) see on every rank why it ended
            trainer.heartbeat.beat(trainer.step, "failed", reason=str(err))
        raise
    finally:
        if trainer is not None:
            trainer.close()
        destroy(ctx)
