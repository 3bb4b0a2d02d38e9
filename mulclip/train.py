"""Train MulCLIP: `python -m mulclip.train [flags]` (one process) or `torchrun --nproc_per_node N -m mulclip.train`.

With no flag it trains the small "mulclip-tiny" ViT on the built-in synthetic scenes on the
CPU and prints retrieval results on held-out scenes before and after training. Layout after
open_clip_train: `main(argv)` wires things up, `train_one_epoch` runs the steps, `evaluate`
scores held-out data; flags live in `mulclip.params`.
"""
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from typing import Dict, Optional

# OpenMP workers that spin while they wait slow a CPU run down several times over when the cores
# are shared with other processes (measured on a busy 2-core machine: 12 s against 2.5 s per
# step of the default run); sleeping waiters cost little on an idle machine. Read once, when
# torch loads, so it only applies when this module is imported first (python -m mulclip.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from . import checkpoint as ckpt  # noqa: E402
from .data import Collator, DataInfo, get_train_data, get_val_data
from .distributed import DistEnv, all_reduce_mean, barrier, cleanup, init_distributed
from .loss import LossConfig, mulclip_loss
from .model import MulCLIP, create_model, get_tokenizer, image_transform
from .params import KERNEL_OPS, op_backends, parse_args
from .retrieval import hard_negative_accuracy, recall_at_k

LOSS_KEYS = ("loss", "global_loss", "wpr_loss", "sap_loss")
MAX_LOGIT_SCALE = math.log(100)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""


def random_seed(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def setup_logging(log_file: Optional[str], is_master: bool) -> None:
    """INFO on the master (stdout and the run's out.log), warnings only on the other ranks."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and is_master:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO if is_master else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%H:%M:%S")


def get_autocast(precision: str, device: torch.device):
    """Autocast context for --precision: amp is float16 on CUDA, bfloat16 on CPU."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.float16 if precision == "amp" and device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def create_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, logit scale and embeddings (open_clip's rule).

    The text positional embedding is exempt too: its first rows are frozen by zeroing their
    gradient, which decoupled weight decay would otherwise still shrink.
    """

    def exclude(name, p):
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "positional_embedding"))

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.wd},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Linear warm-up to `base_lr`, then cosine decay to 0 at `total_steps` (open_clip's schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def unwrap(model) -> MulCLIP:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Run:
    """The paths of one run (logs/NAME/...) and its metric writers; only the master writes."""

    def __init__(self, logs: str, name: str, is_master: bool, tensorboard: bool):
        self.dir = os.path.join(logs, name)
        self.checkpoints = os.path.join(self.dir, "checkpoints")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.is_master = is_master
        self.writer = None
        if is_master and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: metrics.jsonl has the same scalars
                logging.warning("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(os.path.join(self.dir, "tensorboard"))

    def truncate_metrics(self, step: int) -> None:
        """Drop metric records at or after `step` (written by a run that died after its last checkpoint)."""
        if not (self.is_master and os.path.isfile(self.metrics_path)):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if "step" not in json.loads(line) or json.loads(line)["step"] < step]
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def record(self, values: Dict, step: int) -> None:
        if not self.is_master:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_checkpoint(path: str, model: MulCLIP, optimizer, scaler, step: int, num_batches: int, args) -> None:
    """Write a resumable checkpoint (every rank calls this: the random states are gathered)."""
    rng = ckpt.gather_rng_states()
    if not path:
        return
    state = {
        "step": step,
        "epoch": step // num_batches,
        "batch_in_epoch": step % num_batches,
        "num_batches": num_batches,
        "name": args.name,
        "model_name": args.model,
        "state_dict": model.clip.state_dict(),
        "calibration": model.calibration_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    ckpt.atomic_save(state, path)


def train_one_epoch(
    model,
    data: DataInfo,
    epoch: int,
    start_batch: int,
    optimizer: torch.optim.Optimizer,
    scaler,
    loss_cfg: LossConfig,
    args,
    env: DistEnv,
    run: Run,
    total_steps: int,
) -> bool:
    """Train the batches of one epoch from `start_batch`; True when --stop-at-step ends the run.

    Raises NonFiniteLossError (before the update) when any rank's loss is not finite.
    """
    from tqdm import tqdm

    model.train()
    autocast = get_autocast(args.precision, env.device)
    base = unwrap(model)
    skipped_epoch = 0
    batches = data.batches(epoch, start_batch)
    progress = tqdm(batches, total=data.num_batches - start_batch, initial=0, disable=None if env.is_master else True,
                    desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
    tic = time.time()
    for i, batch in enumerate(progress, start=start_batch):
        step = epoch * data.num_batches + i
        lr = cosine_lr(step, args.lr, args.warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = _to_device(batch, env.device)
        with autocast():
            out = model(batch["images"], batch["long_text"], batch["short_text"], batch["subcaption_text"],
                        batch["subcaption_mask"])
        losses = mulclip_loss(out, loss_cfg)
        logged = all_reduce_mean(torch.stack([losses[k].detach().float() for k in LOSS_KEYS] + [
            batch["skipped"].float() * env.world_size]))
        values = dict(zip(LOSS_KEYS, logged[:-1].tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}, batch {i}): {terms}; stopping")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["loss"].backward()
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            optimizer.step()
        with torch.no_grad():
            base.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

        skipped = int(round(logged[-1].item()))
        skipped_epoch += skipped
        values.update(lr=lr, logit_scale=base.clip.logit_scale.exp().item(), skipped=skipped, epoch=epoch)
        run.record(values, step)
        done = step + 1
        if env.is_master:
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            if done % args.log_every_n_steps == 0 or i + 1 == data.num_batches:
                rate = (i + 1 - start_batch) * args.batch_size * env.world_size / (time.time() - tic)
                logging.info(
                    "step %d/%d  loss %.4f (global %.4f, wpr %.4f, sap %.4f)  lr %.3g  scale %.1f  %.1f samples/s",
                    done, total_steps, values["loss"], values["global_loss"], values["wpr_loss"], values["sap_loss"],
                    lr, values["logit_scale"], rate,
                )
        if args.save_every and done % args.save_every == 0:
            save_checkpoint(os.path.join(run.checkpoints, ckpt.LATEST) if env.is_master else "", base, optimizer, scaler,
                            done, data.num_batches, args)
        if args.stop_at_step is not None and done >= args.stop_at_step:
            save_checkpoint(os.path.join(run.checkpoints, ckpt.LATEST) if env.is_master else "", base, optimizer, scaler,
                            done, data.num_batches, args)
            logging.info("stopping at step %d (--stop-at-step); resume with --resume latest", done)
            return True
    if skipped_epoch and env.is_master:
        logging.warning("epoch %d: skipped %d unreadable sample(s)", epoch, skipped_epoch)
    return False


@torch.no_grad()
def evaluate(model: MulCLIP, data: DataInfo, device: torch.device, precision: str = "fp32") -> Dict[str, float]:
    """Held-out retrieval: long and short caption Recall@1/5/10 both ways, hard-negative accuracy.

    Hard-negative accuracy (when the data has negatives): the percentage of images whose own
    long caption scores above each of its attribute-swapped captions.
    """
    model.eval()
    autocast = get_autocast(precision, device)
    images, longs, shorts, positives, negatives = [], [], [], [], []
    for batch in data.batches(0, 0):
        batch = _to_device(batch, device)
        with autocast():
            image = model.encode_image(batch["images"])[0]
            text = model.encode_text(batch["long_text"])[0]
            images.append(image.float())
            longs.append(text.float())
            shorts.append(model.encode_text(batch["short_text"])[0].float())
            if "negative_text" in batch:
                B, N, L = batch["negative_text"].shape
                negatives.append(model.encode_text(batch["negative_text"].view(B * N, L))[0].float().view(B, N, -1))
    images, longs, shorts = torch.cat(images), torch.cat(longs), torch.cat(shorts)
    metrics = {f"long/{k}": v for k, v in recall_at_k(images, longs).items()}
    metrics.update({f"short/{k}": v for k, v in recall_at_k(images, shorts).items()})
    if negatives:
        metrics["hard_negative_accuracy"] = hard_negative_accuracy(images, longs, torch.cat(negatives))
    metrics["num_images"] = images.shape[0]
    return metrics


def format_results(results: Dict[str, Dict[str, float]]) -> str:
    """A table: one row per metric, one column per evaluation (e.g. untrained / epoch 2)."""
    columns = list(results)
    keys = [k for k in results[columns[0]] if k != "num_images"]
    width = max(len(k) for k in keys) + 2
    lines = [" " * width + "".join(f"{c:>14}" for c in columns)]
    for key in keys:
        lines.append(f"{key:<{width}}" + "".join(f"{results[c].get(key, float('nan')):>14.2f}" for c in columns))
    return "\n".join(lines)


def check_backends(wpr_ops: str, sap_ops: str, device: torch.device) -> None:
    """Exit with the reason when a named kernel backend cannot run on this device."""
    from mulclip_kernels.dispatch import availability

    for op, backend in zip(KERNEL_OPS, (wpr_ops, sap_ops, sap_ops)):
        if backend != "auto":
            ok, reason = availability(op, backend, device)
            if not ok:
                raise SystemExit(f"error: --ops {backend} cannot run {op} on {device}: {reason}")
    logging.info("kernel backends: WPR %s, SAP %s", wpr_ops, sap_ops)


def default_name(args) -> str:
    stamp = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{stamp}-{args.model}-b{args.batch_size}-lr{args.lr:g}-{args.precision}"


def main(argv) -> Dict[str, Dict[str, float]]:
    """Run training; returns the evaluations by label ("untrained", "epoch N", ...)."""
    args = parse_args(argv)
    env = init_distributed(args.device, args.dist_backend, args.dist_url)
    if args.name is None:
        name = [default_name(args)]
        if env.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(name, src=0)
        args.name = name[0]
    run_dir = os.path.join(args.logs, args.name)
    if env.is_master:
        if os.path.exists(run_dir) and args.resume is None:
            print(f"error: run {run_dir} exists; pick another --name or pass --resume latest", file=sys.stderr)
            sys.exit(2)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    barrier()
    setup_logging(os.path.join(run_dir, "out.log"), env.is_master)
    run = Run(args.logs, args.name, env.is_master, args.tensorboard)
    logging.info("run %s on %s (%d process(es)); flags: %s", args.name, env.device, env.world_size,
                 " ".join(f"--{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items())))

    wpr_ops, sap_ops = op_backends(args.ops)
    check_backends(wpr_ops, sap_ops, env.device)

    random_seed(args.seed)  # the same initial weights on every rank
    model = create_model(args.model, args.pretrained, calibration_tokens=args.calibration_tokens, device=env.device)
    if args.lock_image:
        model.clip.lock_image_tower()
    if args.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    collate = Collator(get_tokenizer(args.model), image_transform(model), model.context_length, args.max_subcaptions)
    image_size = model.clip.visual.image_size[0]
    train_data = get_train_data(args, collate, image_size, env.rank, env.world_size)
    val_data = get_val_data(args, collate, image_size) if env.is_master else None
    total_steps = train_data.num_batches * args.epochs
    logging.info("training data: %s; %d steps per epoch, %d in total", train_data.description, train_data.num_batches,
                 total_steps)

    optimizer = create_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" and env.device.type == "cuda" else None
    start_step = 0
    resume_path = ckpt.find_resume(args.resume, run.checkpoints)
    random_seed(args.seed, env.rank)
    if resume_path is not None:
        state = ckpt.load(resume_path)
        model.clip.load_state_dict(state["state_dict"])
        if state["calibration"]:
            model.load_state_dict(state["calibration"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        if state["num_batches"] != train_data.num_batches:
            logging.warning("checkpoint had %d batches per epoch, now %d: the data order will differ",
                            state["num_batches"], train_data.num_batches)
        if len(state["rng"]) == env.world_size:
            ckpt.set_rng_state(state["rng"][env.rank])
        logging.info("resumed from %s at step %d", resume_path, start_step)
        run.truncate_metrics(start_step)
    elif args.resume == "latest":
        logging.info("no checkpoint in %s: starting from scratch", run.checkpoints)

    ddp_model = model
    if env.distributed:
        ddp_model = DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            find_unused_parameters=args.calibration_tokens > 0 and args.lambda_wpr == 0,
        )
    loss_cfg = LossConfig(
        lambda_wpr=args.lambda_wpr, lambda_sap=args.lambda_sap, sap_mode=args.sap_mode, topk=args.topk,
        wpr_ops=wpr_ops, sap_ops=sap_ops,
        recon_temperature=args.recon_temperature, contrast_temperature=args.contrast_temperature,
        sap_temperature=args.sap_temperature, gather_with_grad=env.distributed,
    )

    results: Dict[str, Dict[str, float]] = {}
    if val_data is not None and args.eval_at_start and start_step == 0:
        results["untrained" if args.pretrained is None else "pretrained"] = evaluate(model, val_data, env.device, args.precision)
    start_epoch, start_batch = divmod(start_step, train_data.num_batches)
    try:
        for epoch in range(start_epoch, args.epochs):
            stopped = train_one_epoch(ddp_model, train_data, epoch, start_batch if epoch == start_epoch else 0, optimizer,
                                      scaler, loss_cfg, args, env, run, total_steps)
            if stopped:
                break
            done = (epoch + 1) * train_data.num_batches
            path = os.path.join(run.checkpoints, f"epoch_{epoch + 1}.pt") if env.is_master else ""
            save_checkpoint(path, model, optimizer, scaler, done, train_data.num_batches, args)
            if env.is_master:
                ckpt.atomic_copy(path, os.path.join(run.checkpoints, ckpt.LATEST))
            if val_data is not None and ((epoch + 1) % args.val_frequency == 0 or epoch + 1 == args.epochs):
                metrics = evaluate(model, val_data, env.device, args.precision)
                results[f"epoch {epoch + 1}"] = metrics
                run.record({f"val/{k}": v for k, v in metrics.items()}, done)
    except NonFiniteLossError as exc:
        logging.error("%s", exc)
        run.close()
        cleanup()
        raise SystemExit(f"error: {exc}") from exc

    if results and env.is_master:
        title = f"held-out retrieval ({val_data.description}), percent:"
        print(f"\n{title}\n{format_results(results)}", flush=True)
        with open(os.path.join(run.dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    run.close()
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
