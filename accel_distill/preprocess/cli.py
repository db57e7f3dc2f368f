"""Command line: ``python -m accel_distill.preprocess {videos,prompts,negative,validation,check} ...``.

Also installed as the ``accel-distill-preprocess`` console script. ``videos`` and
``prompts`` run under ``accelerate launch`` as well (each rank encodes its own
shards); ``negative`` and ``validation`` write one small output and run on the
main process only; ``check`` reads data and loads no model. User mistakes print
one ``error:`` line and exit 2; ``check`` exits 1 when it found problems.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from accel_distill.errors import ConfigError

STORE_DTYPES = ("fp32", "bf16", "fp16")


def positive(kind):
    """An argparse type: ``kind(text)``, which must be > 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _counts(text: str) -> list[int]:
    """``"81"`` or ``"81,49,17"`` -> positive ints."""
    parse = positive(int)
    values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected N or N,N,..., got {text!r}")
    return values


def _sizes(text: str) -> list[tuple[int, int]]:
    from .buckets import parse_sizes

    try:
        return parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_args(p: argparse.ArgumentParser) -> None:
    """--model, --family, --revision, --dtype, --text-max-length (also ``python -m accel_distill.generate``'s)."""
    p.add_argument("--model", required=True, help="diffusers folder or Hub id of the model (its VAE / text encoder)")
    p.add_argument("--family", default="wan", help="model family (default: wan)")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="precision the models run in (auto: bf16 on an accelerator, fp32 on the CPU)",
    )
    p.add_argument(
        "--text-max-length",
        type=positive(int),
        default=512,
        help="tokens per prompt at most (<= the training config's pipeline_config.text_max_length; default 512)",
    )


def shard_args(p: argparse.ArgumentParser, *, rows_per_shard: int = 64) -> None:
    """--output, --rows-per-shard, --row-group-size, --store-dtype: the resumable shard folder's settings."""
    p.add_argument("--output", required=True, help="folder for part-NNNNN.parquet shards (re-runs resume)")
    p.add_argument(
        "--rows-per-shard",
        type=positive(int),
        default=rows_per_shard,
        help=f"rows per parquet file (default {rows_per_shard})",
    )
    p.add_argument(
        "--row-group-size",
        type=positive(int),
        default=None,
        help="rows per parquet row group (default: as many as hold ~8 MB of tensors, 1 to 64: one Wan-size video "
        "row, dozens of images; ranks then read disjoint groups)",
    )
    p.add_argument(
        "--store-dtype",
        choices=STORE_DTYPES,
        default="fp32",
        help="dtype the tensors are stored in, recorded in the *_dtype columns (default fp32, the only one "
        "FastVideo's reader understands; bf16 halves the size and accel_distill reads it)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m accel_distill.preprocess",
        description="Encode videos, images and prompts with a model family's own VAE and text encoder "
        "into the project's parquet format (and prompt embedding files).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser(
        "videos",
        help="videos/images + captions -> parquet shards of latents and text embeddings",
        description="Encode a folder (captions in same-name .txt files) or a CSV/JSONL manifest of videos and "
        "images. Frames are taken from the start of each video at --fps; each frame is resized to cover "
        "HEIGHTxWIDTH and centre-cropped; an image is a 1-frame clip. With several --sizes / --num-frames each "
        "input goes to the size closest to its aspect ratio and the longest length it can supply (one training "
        "bucket per latent shape). Unusable inputs are listed in OUTPUT/skipped.jsonl (--strict: an error).",
    )
    v.add_argument("--input", required=True, help="a folder, or a .csv / .jsonl manifest (path + caption)")
    model_args(v)
    shard_args(v)
    v.add_argument("--height", type=positive(int), default=None, help="output height in pixels")
    v.add_argument("--width", type=positive(int), default=None, help="output width in pixels")
    v.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="several output sizes HEIGHTxWIDTH,... instead of --height/--width: each input gets the one closest "
        "to its aspect ratio (e.g. 480x832,832x480,624x624)",
    )
    v.add_argument(
        "--num-frames",
        type=_counts,
        default=[81],
        help="frames per video, 4k+1 for Wan (default 81); several (81,49,17): each video gets the longest it can "
        "supply",
    )
    v.add_argument("--fps", type=positive(float), default=None, help="sampling frame rate (default: each video's own)")
    v.add_argument("--media", choices=["all", "video", "image"], default="all", help="which inputs to encode")
    v.add_argument("--strict", action="store_true", help="any unusable input is an error (exit 2)")
    v.add_argument("--allow-empty-captions", action="store_true", help="encode inputs whose caption is empty")
    v.add_argument("--vae-batch-size", type=positive(int), default=1, help="clips per VAE call (default 1)")
    v.add_argument(
        "--decode-workers", type=int, default=2, help="threads decoding media ahead of the encoder (0: none)"
    )

    pr = sub.add_parser("prompts", help="a prompt list -> text-only parquet shards (for rollout_mode: simulate)")
    pr.add_argument("--prompts", required=True, help=".txt (one per line), .json or .jsonl prompt list")
    model_args(pr)
    shard_args(pr)

    n = sub.add_parser(
        "negative", help="one prompt -> a [L, D] .safetensors for pipeline_config.negative_prompt_embeds"
    )
    n.add_argument("--prompt", default="", help='the negative prompt (default "")')
    n.add_argument("--output", required=True, help="file to write, e.g. neg.safetensors")
    model_args(n)

    va = sub.add_parser(
        "validation",
        help="validation prompts -> validation.json + per-prompt embeddings (training.validation_dataset_file)",
    )
    va.add_argument("--prompts", required=True, help=".txt (one per line), .json or .jsonl prompt list")
    va.add_argument("--output", required=True, help="folder for validation.json and embeds/")
    model_args(va)

    c = sub.add_parser(
        "check",
        help="scan parquet data and report every problem per file and row (exit 1 if any)",
        description="Reads every row of the data (as training.data_path: files, folders, patterns, "
        "hf://datasets/OWNER/NAME[@REVISION][/PATH]) and prints one line per problem: unreadable files, "
        "missing columns, null or non-4-D / non-2-D shapes, unknown dtypes, bytes that do not fit shape x dtype, "
        "NaN/inf, text longer than --text-max-length, and with --model the text width and latent channels "
        "the model expects.",
    )
    c.add_argument("data", nargs="+", help="parquet files, folders, patterns or Hub dataset references")
    c.add_argument("--model", default=None, help="diffusers folder or Hub id to check widths against")
    c.add_argument("--revision", default=None, help="Hub revision of --model")
    c.add_argument("--text-max-length", type=positive(int), default=None, help="pipeline_config.text_max_length")
    c.add_argument("--extra-tensor-columns", nargs="*", default=[], help="extra tensors the family reads")
    c.add_argument("--max-problems", type=int, default=100, help="lines printed at most (default 100; all: 0)")
    c.add_argument("--json", default=None, help="also write every problem to this JSON file")
    return parser.parse_args(argv)


@dataclass
class Dist:
    """This process's place in the launch."""

    rank: int
    world_size: int
    device: torch.device
    barrier: object


def distributed() -> Dist:
    """This process's rank, world and device from ``accelerate.PartialState`` (any accelerator, or the CPU)."""
    from accelerate import PartialState

    from accel_distill.precision import has_accelerator

    state = PartialState(cpu=not has_accelerator())  # a CPU host's multi-process launch needs cpu=True
    return Dist(state.process_index, state.num_processes, state.device, state.wait_for_everyone)


def _settings(args: argparse.Namespace, digest: str, count: int) -> dict:
    keys = ["command", "model", "family", "revision", "dtype", "text_max_length", "rows_per_shard", "store_dtype"]
    keys += ["height", "width", "num_frames", "fps", "media", "allow_empty_captions"]
    settings = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if settings.get("num_frames") is not None and len(settings["num_frames"]) == 1:
        settings["num_frames"] = settings["num_frames"][0]  # as recorded before lists were allowed
    if getattr(args, "sizes", None):
        settings["sizes"] = ["x".join(map(str, s)) for s in args.sizes]
    return {**settings, "inputs": count, "inputs_digest": digest}


def run_check(args: argparse.Namespace) -> int:
    """``check``: every problem on stdout (one line each, up to --max-problems), a summary; 1 if any."""
    import json

    from accel_distill.data.checks import Report, check_dataset, model_widths

    text_dim, channels = model_widths(args.model, revision=args.revision) if args.model else (None, None)
    report = Report()
    shown = 0
    found = check_dataset(
        args.data,
        text_max_length=args.text_max_length,
        text_dim=text_dim,
        latent_channels=channels,
        extra_tensor_columns=args.extra_tensor_columns,
        report=report,
    )
    for problem in found:
        if not args.max_problems or shown < args.max_problems:
            print(problem, flush=True)
            shown += 1
    if len(report.problems) > shown:
        print(f"... and {len(report.problems) - shown} more (--max-problems 0 prints all)")
    if args.json:
        rows = [{"file": p.file, "row": p.row, "id": p.id, "problem": p.message} for p in report.problems]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": report.rows, "files": report.files, "problems": rows}, f, indent=1)
    widths = f" against {args.model} (text width {text_dim}, latent channels {channels})" if args.model else ""
    print(report.summary() + widths)
    return 1 if report.problems else 0


def run(args: argparse.Namespace) -> int:
    from accel_distill.precision import dtype_of

    if args.command == "check":
        return run_check(args)

    from .encode import make_encoder, resolve_dtype
    from .jobs import MediaJob, inputs_digest, preprocess_media, preprocess_prompts, write_negative, write_validation
    from .manifest import discover, read_prompts
    from .shards import ShardStore

    if args.command == "videos":  # before any model loads
        if args.sizes and (args.height or args.width):
            raise ConfigError("--sizes replaces --height/--width: give one or the other")
        if not args.sizes and not (args.height and args.width):
            raise ConfigError("--height and --width (or --sizes HEIGHTxWIDTH,...) are required")
        sizes = args.sizes or [(args.height, args.width)]
    dist = distributed()
    if args.command in ("negative", "validation") and dist.rank != 0:
        return 0  # one small output: the main process writes it
    dtype = resolve_dtype(args.dtype, dist.device)
    encoder = make_encoder(args.family, args.model, dtype=dtype, device=dist.device, revision=args.revision)

    if args.command == "negative":
        path = write_negative(encoder, args.prompt, args.output, text_max_length=args.text_max_length)
        print(f"wrote {path} (pipeline_config.negative_prompt_embeds)")
        return 0
    if args.command == "validation":
        path = write_validation(encoder, read_prompts(args.prompts), args.output, text_max_length=args.text_max_length)
        print(f"wrote {path} (training.validation_dataset_file)")
        return 0

    store_dtype = dtype_of(args.store_dtype)
    if args.command == "prompts":
        prompts = read_prompts(args.prompts)
        store = ShardStore(args.output, _settings(args, inputs_digest(prompts), len(prompts)))
        store.check_settings(write=dist.rank == 0)
        report = preprocess_prompts(
            prompts,
            encoder,
            store,
            rows_per_shard=args.rows_per_shard,
            text_max_length=args.text_max_length,
            store_dtype=store_dtype,
            row_group_size=args.row_group_size,
            rank=dist.rank,
            world_size=dist.world_size,
            barrier=dist.barrier,
        )
    else:
        for height, width in sizes:
            for frames in args.num_frames:
                encoder.check_video_size(height, width, frames)
        items = discover(args.input, media=args.media, allow_empty_captions=args.allow_empty_captions)
        if not items:
            raise ConfigError(f"--input {args.input}: no {'media' if args.media == 'all' else args.media} files found")
        store = ShardStore(args.output, _settings(args, inputs_digest(items), len(items)))
        store.check_settings(write=dist.rank == 0)
        job = MediaJob(
            output=args.output,
            sizes=sizes,
            frame_counts=args.num_frames,
            fps=args.fps,
            rows_per_shard=args.rows_per_shard,
            row_group_size=args.row_group_size,
            text_max_length=args.text_max_length,
            store_dtype=store_dtype,
            strict=args.strict,
            vae_batch_size=args.vae_batch_size,
            decode_workers=max(0, args.decode_workers),
        )
        report = preprocess_media(
            items, encoder, job, store, rank=dist.rank, world_size=dist.world_size, barrier=dist.barrier
        )
    if dist.rank == 0:
        print(report.summary(args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and return 2."""
    from accel_distill.cli import user_errors_as_exit_code

    args = parse_args(argv)
    return user_errors_as_exit_code(lambda: run(args))
