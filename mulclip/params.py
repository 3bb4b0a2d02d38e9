"""Command-line flags of `python -m mulclip.train`, in open_clip_train's style, validated at the end."""
import argparse
import os

import open_clip

from mulclip_kernels import backends

from . import model as _model  # noqa: F401  (registers the mulclip-* model configs with open_clip)
from .data import SYNTHETIC
from .data.captions import DEFAULT_MAX_SUBCAPTIONS
from .data.shards import check_urls, expand_urls
from .loss import LossConfig

KERNEL_OPS = ("word_patch_reconstruction", "subcaption_patch_align", "subcaption_patch_scores")
OPS_CHOICES = ("auto", "reference", "torch", "triton", "cuda", "cpp")
DEFAULT_TRAIN_SAMPLES = 4096
DEFAULT_VAL_SAMPLES = 512


def parse_args(argv):
    """Parse and validate the flags; errors exit through argparse with a message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="python -m mulclip.train",
        description="Train MulCLIP (global + word-patch + subcaption alignment) on an open_clip model.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=SYNTHETIC,
                      help="webdataset shards ('a-{000..009}.tar', '::'-separated, or a folder of .tar) "
                           "or 'synthetic' (default: the built-in drawn scenes)")
    data.add_argument("--val-data", default=SYNTHETIC,
                      help="held-out data for retrieval at the end of each epoch: shards, 'synthetic' (default) or ''")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help=f"samples per epoch (synthetic: its size, default {DEFAULT_TRAIN_SAMPLES}; shards: "
                           "default from sizes.json)")
    data.add_argument("--val-num-samples", type=int, default=None,
                      help=f"held-out samples (synthetic default {DEFAULT_VAL_SAMPLES}; shards: from sizes.json)")
    data.add_argument("--val-negatives", type=int, default=3, help="attribute-swapped captions per synthetic held-out image")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes (not of the training order)")
    data.add_argument("--max-subcaptions", type=int, default=DEFAULT_MAX_SUBCAPTIONS, help="subcaptions per sample (M)")
    data.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mulclip-tiny", help="open_clip model name (e.g. ViT-B-16) or mulclip-tiny")
    model.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file")
    model.add_argument("--calibration-tokens", type=int, default=0, help="N_s of the token calibration module (0: off)")
    model.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda-wpr", type=float, default=1.0, help="weight of the word-patch reconstruction loss")
    loss.add_argument("--lambda-sap", type=float, default=1.0, help="weight of the subcaption alignment loss")
    loss.add_argument("--sap-mode", choices=("slot", "all", "cross"), default="slot")
    loss.add_argument("--topk", type=int, default=16, help="patches per subcaption region (k of SAP)")
    loss.add_argument("--ops", choices=OPS_CHOICES, default="auto",
                      help="mulclip_kernels backend of WPR and SAP; an op without that backend uses auto")
    loss.add_argument("--recon-temperature", type=float, default=LossConfig.recon_temperature)
    loss.add_argument("--contrast-temperature", type=float, default=LossConfig.contrast_temperature)
    loss.add_argument("--sap-temperature", type=float, default=LossConfig.sap_temperature)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=64, help="per process")
    optim.add_argument("--epochs", type=int, default=2)
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (fine-tuning CLIP: ~1e-5)")
    optim.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on gains, biases, embeddings)")
    optim.add_argument("--warmup", type=int, default=20, help="linear warm-up steps before the cosine decay")
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.98)
    optim.add_argument("--eps", type=float, default=1e-6)
    optim.add_argument("--grad-clip-norm", type=float, default=None)
    optim.add_argument("--precision", choices=("fp32", "amp", "amp_bf16"), default="fp32",
                       help="amp: float16 autocast + loss scaling on CUDA (bfloat16 autocast on CPU)")

    run = parser.add_argument_group("run")
    run.add_argument("--logs", "--logs-dir", dest="logs", default="./logs",
                     help="folder of the runs (each in logs/NAME); under torchrun write --logs-dir, since torchrun "
                          "takes --logs for an abbreviation of its own --logs-specs")
    run.add_argument("--name", default=None, help="run name (default: date, model, batch size, lr)")
    run.add_argument("--resume", default=None,
                     help="'latest' (logs/NAME/checkpoints/latest.pt; starts fresh if absent) or a checkpoint file")
    run.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends only)")
    run.add_argument("--stop-at-step", type=int, default=None,
                     help="checkpoint and exit after this many steps in total (preemptible jobs, tests)")
    run.add_argument("--val-frequency", type=int, default=1, help="evaluate every N epochs (and after the last)")
    run.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=True,
                     help="evaluate the initial model too (not when resuming)")
    run.add_argument("--log-every-n-steps", type=int, default=20)
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when available")
    run.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    run.add_argument("--dist-url", default="env://")
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def op_backends(ops: str):
    """(WPR backend, SAP backend) for --ops: the named backend where the op has it, "auto" elsewhere."""
    wpr = ops if ops in backends("word_patch_reconstruction") else "auto"
    sap = ops if all(ops in backends(op) for op in KERNEL_OPS[1:]) else "auto"
    return wpr, sap


def _validate(parser, args) -> None:
    for flag in ("batch_size", "epochs", "topk", "max_subcaptions", "log_every_n_steps", "val_frequency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup", "save_every", "calibration_tokens", "workers", "val_negatives", "lambda_wpr", "lambda_sap", "wd"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("lr", "recon_temperature", "contrast_temperature", "sap_temperature"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        parser.error("--stop-at-step must be >= 1")

    if args.model not in open_clip.list_models():
        parser.error(f"--model: unknown model {args.model!r}; known: {', '.join(open_clip.list_models())}")
    config = open_clip.get_model_config(args.model)
    vision = config["vision_cfg"]
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)) or config.get("custom_text") \
            or "hf_model_name" in config["text_cfg"]:
        parser.error(f"--model {args.model}: MulCLIP needs an open_clip ViT with the built-in CLIP text tower")
    grid = vision.get("image_size", 224) // vision.get("patch_size", 16)
    patches = args.calibration_tokens or grid * grid
    if args.topk > patches:
        parser.error(f"--topk {args.topk} exceeds the {patches} {'calibrated tokens' if args.calibration_tokens else 'patches'} "
                     f"per image of {args.model}")
    if args.pretrained and not os.path.isfile(args.pretrained) \
            and not open_clip.get_pretrained_cfg(args.model, args.pretrained):
        parser.error(f"--pretrained: {args.pretrained!r} is neither a file nor a pretrained tag of {args.model} "
                     f"(tags: {open_clip.list_pretrained_tags_by_model(args.model)})")

    for flag in ("train_data", "val_data"):
        spec = getattr(args, flag)
        if spec and spec != SYNTHETIC:
            try:
                check_urls(expand_urls(spec), f"--{flag.replace('_', '-')}")
            except FileNotFoundError as exc:
                parser.error(str(exc))
    if args.train_data == SYNTHETIC and args.train_num_samples is None:
        args.train_num_samples = DEFAULT_TRAIN_SAMPLES
    if args.val_data == SYNTHETIC and args.val_num_samples is None:
        args.val_num_samples = DEFAULT_VAL_SAMPLES

    installed = {op: backends(op) for op in KERNEL_OPS}
    if not any(args.ops in names for names in installed.values()):
        parser.error(f"--ops {args.ops}: no op has this backend installed "
                     f"({'; '.join(f'{op}: {names}' for op, names in installed.items())})")
    if args.resume not in (None, "latest") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no such checkpoint file: {args.resume}")
    if args.resume == "latest" and args.name is None:
        parser.error("--resume latest needs --name (the run to continue)")
