"""Pre-training entry point.

    deepspeed mixfast/train.py --config configs/in1k_mixmask.json [--set key.path=value ...]
    python -m mixfast.train --config configs/demo.json          # one process, no launcher

Restarting the same command resumes from the newest checkpoint in `train.output_dir`.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script (`deepspeed mixfast/train.py`): Python put mixfast/ itself on sys.path,
    # where its sub-packages (data, eval, ...) would shadow top-level names. Use the package.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import time

import mixfast  # noqa: F401  (torchvision compatibility shim first)
import torch

from mixfast.config import ConfigError, RunConfig, dump_config, load_config, to_deepspeed_config
from mixfast.data import build_datasets, build_eval_loader, build_pretrain_loader
from mixfast.engine import checkpoint
from mixfast.engine import distributed as dist_utils
from mixfast.engine.checkpoint import TrainState
from mixfast.engine.images import save_mix_grid
from mixfast.engine.logging import MetricsLogger, info
from mixfast.engine.progress import Progress
from mixfast.engine.schedule import lr_multiplier
from mixfast.eval.knn import knn_accuracy
from mixfast.methods import build_method
from mixfast.methods.base import check_config as check_method_config
from mixfast.methods.base import StepResult
from mixfast.models import export_torchvision_state_dict, param_groups_no_decay


class NonFiniteLoss(RuntimeError):
    pass


def build_optimizer(module: torch.nn.Module, cfg):
    """SGD with momentum (MoCo, SimSiam, MixSiam), Adam (SimCLR/BYOL, paper Table 8) or AdamW (MAE).
    Weight decay applies to every parameter, as in the contrastive papers' code, unless
    `optim.no_decay_1d` (MAE: none on biases, norms, tokens and positions)."""
    params = param_groups_no_decay(module, cfg.weight_decay) if cfg.no_decay_1d else module.parameters()
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


ENCODER_PARTS = ("backbone", "head", "predictor")


def compile_encoders(*roots: torch.nn.Module) -> list[str]:
    """torch.compile every encoder part below `roots` in place (train.compile); returns their names.

    Parts, not whole modules: the query encoder runs through the DeepSpeed engine, but the key
    and target encoders are called by the method through their own methods (`encode`), which a
    compiled `forward` would miss; every part is called as a module, so compiling its `__call__`
    in place (`nn.Module.compile`) covers both. In place also keeps parameter names and
    state_dict keys, so checkpoints, the EMA updates and the backbone export see the same modules."""
    names = []
    for root in roots:
        for name, module in root.named_modules():
            if name.rsplit(".", 1)[-1] in ENCODER_PARTS:
                module.compile()
                names.append(name)
    return names


def check_parameter_layout(module: torch.nn.Module) -> None:
    """DeepSpeed needs plain contiguous parameters: `initialize` broadcasts each as
    `p.data.view(torch.uint8)`, and ZeRO 1/2 flatten them into one buffer and reduce
    `grad.view(-1)` (a channels_last parameter gets channels_last gradients). So a conv
    weight stays NCHW under model.channels_last, which applies to the activations."""
    bad = [name for name, p in module.named_parameters() if not p.is_contiguous()]
    if bad:
        raise ValueError(f"parameters handed to DeepSpeed must be contiguous (NCHW), not: {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run configuration (JSON)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=3 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Trainer:
    """Owns the run: data, model + DeepSpeed engine, the method's state, logs, checkpoints."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        import deepspeed

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.per_rank_batch = cfg.train.batch_size // self.world
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.data = build_datasets(cfg.data, run_dir=cfg.train.output_dir)  # the run dir lists skipped files
        # torch DataLoader or DALI pipeline (data.loader); the DALI one has state_dict() for the checkpoint
        self.train_loader = build_pretrain_loader(cfg, self.data, self.per_rank_batch, self.rank, self.world, device)
        self.steps_per_epoch = len(self.train_loader.sampler) // self.per_rank_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the data set "
                              f"({len(self.data.train)} images over {self.world} ranks)")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch

        trained, self.method = build_method(cfg, self.rank, self.world)
        trained.to(device)
        self.method.to(device)
        self.method.set_total_steps(self.total_steps)  # schedules span the epochs, like the LR
        check_parameter_layout(trained)
        optimizer = build_optimizer(trained, cfg.optim)
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(self.total_steps, warmup, cfg.optim))
        self.engine, _, _, _ = deepspeed.initialize(
            model=trained, optimizer=optimizer, lr_scheduler=scheduler, config=to_deepspeed_config(cfg, self.world))
        if self.world == 1 and self.engine.zero_optimization_stage() == 0:
            # One rank: the gradient all-reduce is the identity, yet DeepSpeed still flattens every
            # gradient into a bucket, all-reduces it over the 1-rank group and copies it back after
            # each backward (2-3 ms of the demo's ~45 ms CPU step, bench_peers.py). ZeRO >= 1 reduces
            # in its optimizer, not here.
            self.engine.enable_backward_allreduce = False
        if cfg.train.compile:
            compile_encoders(self.engine.module, self.method)

        self.logger = MetricsLogger(cfg.train.output_dir, cfg.log.tensorboard)
        self._finite: torch.Tensor | None = None  # all losses since the last read finite (device flag)
        self._last_result: StepResult | None = None
        self._last_read_step = 0
        self._skipped_pending = 0  # images this rank's loader skipped since the last read
        self.state = checkpoint.resume(self.engine, self.method, cfg.train.output_dir, cfg.train.resume,
                                       loader=self.train_loader) or TrainState()

    # --- evaluation -------------------------------------------------------------------
    def knn(self) -> float:
        bs = max(self.per_rank_batch, 64)
        shard = lambda ds: torch.utils.data.Subset(ds, range(self.rank, len(ds), self.world))  # noqa: E731
        bank = build_eval_loader(shard(self.data.knn_train), bs, self.cfg.data.num_workers)
        test = build_eval_loader(shard(self.data.knn_test), bs, self.cfg.data.num_workers)
        module = self.engine.module
        encoder = module.backbone if self.cfg.eval.knn_features == "backbone" else torch.nn.Sequential(
            module.backbone, module.head)
        return knn_accuracy(encoder, bank, test, self.data.num_classes, self.cfg.eval.knn_k, self.cfg.eval.knn_t,
                            self.device, self.cfg.model.channels_last)

    def _run_knn(self, epoch: int) -> float:
        top1 = self.knn()
        self.state.knn_history.append((epoch, top1))
        self.logger.log(self.state.step, {"knn_top1": top1, "epoch": epoch}, prefix="eval")
        info(f"epoch {epoch}: kNN top-1 {top1:.2f}%")
        return top1

    # --- training -----------------------------------------------------------------------
    def save(self, tag: str | None = None, save_latest: bool = True, checked: bool = True) -> str:
        """A checkpoint of the current state; unless `checked=False`, first make sure no loss
        since the last read was non-finite (a poisoned state is never saved as `latest`)."""
        if checked:
            self.check_finite()
        return checkpoint.save(self.engine, self.method, self.state, self.cfg.train.output_dir,
                               self.cfg.train.keep_checkpoints, tag, save_latest, loader=self.train_loader)

    def _budget(self) -> int:
        return min(self.total_steps, self.cfg.train.max_steps or self.total_steps)

    def _sequential_backward(self) -> bool:
        choice = self.cfg.train.sequential_backward
        return self.device.type == "cpu" if choice == "auto" else choice

    def _backward(self, loss: torch.Tensor, is_last: bool) -> None:
        if is_last or self.engine.zero_optimization_stage() > 0:
            self.engine.backward(loss)  # ZeRO >= 1: reduction deferred by coalesce_grad_reduction
        else:
            with self.engine.no_sync():  # ZeRO 0: reduce once, in the last part's backward
                self.engine.backward(loss)

    def train_step(self, batch: dict) -> StepResult:
        """One optimizer step, issued without a host sync: losses and statistics stay on the
        device until `read_metrics` (called every `log.every_steps` steps) reads them."""
        x1 = batch["x1"].to(self.device, non_blocking=True)
        x2 = batch["x2"].to(self.device, non_blocking=True)
        sequential = self._sequential_backward()
        coalesce = sequential and self.engine.zero_optimization_stage() > 0
        with self.engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
            result = self.method.training_step(self.engine, x1, x2, self.state.step, self._backward, sequential)
        # Non-finite losses are noticed at the next read (a device flag, not a host check per step).
        finite = torch.isfinite(result.loss)
        self._finite = finite if self._finite is None else self._finite & finite
        if self.state.step == 0 and self.cfg.log.image_grid and dist_utils.is_main():
            path = save_mix_grid(result.images, os.path.join(self.cfg.train.output_dir, "mix_grid.png"),
                                 self.cfg.data.augmentation)
            info(f"wrote {path}")
        self.engine.step()
        self.method.after_step(result)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self._last_result = StepResult(result.loss, result.stats)  # what a later read needs, not the images
        return result

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if a loss since the last read was NaN/inf (reads the device flag)."""
        if self._finite is not None and self._last_result is not None:
            self.read_metrics(self._last_result)

    def read_metrics(self, result: StepResult) -> dict:
        """The step's loss and statistics as floats: the one deliberate host read, made every
        `log.every_steps` steps and before each checkpoint. Raises NonFiniteLoss (after saving
        the state as a `nonfinite_step…` checkpoint) if any loss since the last read was NaN/inf."""
        names = [k for k, v in result.stats.items() if isinstance(v, torch.Tensor)]
        dev = result.loss.device
        flag = self._finite if self._finite is not None else torch.ones((), dtype=torch.bool, device=dev)
        # Summed over ranks (every rank reads at the same steps): the ranks with a non-finite loss, so that all ranks
        # stop together (one stopping alone would leave the others waiting in the next collective), and the images
        # each rank's loader skipped since the last read (each unreadable file is charged to one rank).
        shared = torch.stack([(~flag).float(), torch.tensor(float(self._skipped_pending), device=dev)])
        shared = dist_utils.all_reduce_sum(shared) if self.world > 1 else shared
        values = torch.stack([result.loss.float(), *shared] + [result.stats[k].float() for k in names]).tolist()
        self._finite, self._skipped_pending = None, 0
        self.state.skipped_images += int(values[2])
        if values[1] != 0.0:
            first = self._last_read_step + 1
            tag = self.save(tag=f"nonfinite_step{self.state.step:09d}", save_latest=False, checked=False)
            raise NonFiniteLoss(
                f"loss is {values[0]} on rank {self.rank}, non-finite on {int(values[1])} of {self.world} rank(s) "
                f"(the first non-finite loss came between steps {first} and {self.state.step}, epoch "
                f"{self.state.epoch}); state saved as checkpoint {tag!r} in "
                f"{checkpoint.checkpoint_dir(self.cfg.train.output_dir)}. Lower optim.lr or check the data.")
        self._last_read_step = self.state.step
        stats = {k: v for k, v in result.stats.items() if not isinstance(v, torch.Tensor)}
        stats.update(zip(names, values[3:]))
        return {"loss": values[0], "lr": self.engine.get_lr()[0], **stats}

    def fit(self) -> None:
        cfg, state = self.cfg, self.state
        budget = self._budget()
        info(f"{self.world} rank(s) on {self.device}; {self.data.describe_train()}, "
             f"{self.steps_per_epoch} steps/epoch, {budget} steps to run"
             + (f", resuming at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})" if state.step else ""))
        if cfg.eval.knn_at_start and state.knn_random_init is None:
            state.knn_random_init = self.knn()
            info(f"kNN top-1 of the randomly initialised encoder: {state.knn_random_init:.2f}%")
        progress = Progress(budget, state.step, enabled=cfg.log.progress and dist_utils.is_main())
        self.engine.train()
        self.method.train()
        while state.step < budget and state.epoch < cfg.train.epochs:
            self.train_loader.sampler.set_epoch(state.epoch, start=state.batch_in_epoch * self.per_rank_batch)
            for batch in self.train_loader:
                t0 = time.perf_counter()
                result = self.train_step(batch)
                # this rank's share of unreadable files (host data), summed over ranks at the next read
                self._skipped_pending += int(batch["skipped"])
                metrics = None
                if state.step % cfg.log.every_steps == 0:
                    metrics = self.read_metrics(result)
                    self.logger.log(state.step, {**metrics, "epoch": state.epoch,
                                                 "skipped_images": state.skipped_images})
                progress.update(metrics, images=cfg.train.batch_size, seconds=time.perf_counter() - t0,
                                epoch=state.epoch)
                if state.step % cfg.train.checkpoint_every_steps == 0:
                    self.save()
                if state.step >= budget:
                    break
            if state.batch_in_epoch >= self.steps_per_epoch:  # epoch completed
                state.epoch += 1
                state.batch_in_epoch = 0
                if cfg.eval.knn_every and state.epoch % cfg.eval.knn_every == 0 and state.epoch < cfg.train.epochs:
                    self._run_knn(state.epoch)
                every = cfg.train.checkpoint_every_epochs
                if every and state.epoch % every == 0:
                    self.save()
        progress.close()

    def finish(self) -> dict:
        """Final kNN, last checkpoint, backbone export; returns the summary."""
        self.check_finite()
        final = self._run_knn(self.state.epoch)
        self.save()
        summary = {"step": self.state.step, "epoch": self.state.epoch, "knn_top1": final,
                   "knn_random_init": self.state.knn_random_init, "skipped_images": self.state.skipped_images}
        if dist_utils.is_main():
            path = os.path.join(self.cfg.train.output_dir, "backbone_torchvision.pth")
            torch.save(export_torchvision_state_dict(self.engine.module.backbone), path)
            info(f"exported backbone (torchvision state_dict) to {path}")
            if self.state.skipped_images:
                info(f"skipped {self.state.skipped_images} unreadable images (each unreadable file once per epoch)")
            if self.state.knn_random_init is not None:
                print(f"kNN top-1: random-init {self.state.knn_random_init:.2f}% -> trained {final:.2f}%", flush=True)
            else:
                print(f"kNN top-1: trained {final:.2f}%", flush=True)
        self.logger.close()
        return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_method_config(cfg)  # the chosen framework's own rules, before any data is read
    except ConfigError as err:
        raise SystemExit(f"mixfast: config error in {args.config}:\n{err}") from None
    device = dist_utils.init_distributed()
    if dist_utils.is_main():
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        import json

        with open(os.path.join(cfg.train.output_dir, "config.json"), "w") as f:
            json.dump(dump_config(cfg), f, indent=2)
    try:
        trainer = Trainer(cfg, device)
    except ConfigError as err:  # a value that only turns out wrong against the data (batch > data set)
        raise SystemExit(f"mixfast: config error in {args.config}:\n{err}") from None
    try:
        trainer.fit()
        return trainer.finish()
    except NonFiniteLoss as err:
        raise SystemExit(f"mixfast: {err}") from None


if __name__ == "__main__":
    main()
