"""Command line: ``python -m accel_distill.generate --model TEACHER (--prompts FILE | --data PARQUET) ...``.

Also installed as ``accel-distill-generate``; runs under ``accelerate launch`` as well (each
rank samples its own shards). User mistakes print one ``error:`` line and exit 2, before any
model loads where the mistake is in the arguments.
"""

from __future__ import annotations

import argparse
import functools

import torch

from accel_distill.errors import ConfigError
from accel_distill.preprocess.cli import distributed, model_args, positive, shard_args

DEFAULT_STEPS = 48  # FastVideo's teacher trajectories


def _number_list(kind: type, what: str):
    """An argparse type: ``"a,b,..."`` -> a non-empty list of ``kind``."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


_steps_list = _number_list(int, "step indices N,N,...")
_timesteps = _number_list(float, "timesteps T,T,...")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m accel_distill.generate",
        description="Sample a teacher with classifier-free guidance for every prompt and write parquet shards in "
        "the project's schema: the final x0 as the latent (finetune and dmd2 rollout_mode: data read it unchanged) "
        "plus the trajectory (traj_latents at the saved steps, traj_timesteps, noise) that method kd reads. "
        "Re-runs skip finished shards.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help=".txt (one per line), .json or .jsonl prompt list (encoded here)")
    source.add_argument(
        "--data", help="parquet with text embeddings (training.data_path syntax), e.g. text-only shards"
    )
    model_args(p)
    shard_args(p, rows_per_shard=8)  # a killed run loses at most its shards in progress: keep them short
    p.add_argument("--height", type=positive(int), required=True, help="video height in pixels")
    p.add_argument("--width", type=positive(int), required=True, help="video width in pixels")
    p.add_argument("--num-frames", type=positive(int), required=True, help="frames per video (4k+1 for Wan)")
    p.add_argument(
        "--steps", type=positive(int), default=DEFAULT_STEPS, help=f"teacher steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="CFG scale in diffusers' convention v_neg + g (v_cond - v_neg) (default 5.0; 1: no CFG)",
    )
    p.add_argument(
        "--flow-shift", type=positive(float), default=None, help="timestep shift (default: the model's scheduler)"
    )
    p.add_argument(
        "--save-steps",
        type=_steps_list,
        default=None,
        help="indices (0 .. steps-1) of the steps whose starting sample is stored in traj_latents (default: all)",
    )
    p.add_argument(
        "--student-steps",
        type=_timesteps,
        default=None,
        help="instead of --save-steps: store the teacher's samples at exactly these timesteps, fitted as method kd "
        "fits method_config.kd_denoising_steps (e.g. 1000,937,833,624): kd then reads them without interpolating",
    )
    p.add_argument("--step-tolerance", type=float, default=1.0, help="as kd's method_config.step_tolerance")
    p.add_argument("--seed", type=int, default=0, help="row i starts from the noise of seed (seed, i) (default 0)")
    p.add_argument("--batch-size", type=positive(int), default=1, help="rows sampled together (default 1)")
    p.add_argument("--negative-prompt", default="", help='the unconditional prompt for CFG (default "")')
    p.add_argument("--negative-embeds", default=None, help="a [L, D] .safetensors instead of --negative-prompt")
    return p.parse_args(argv)


def settings(args: argparse.Namespace, digest: str, count: int) -> dict:
    """What the shards depend on: a re-run with other settings into the same folder is refused."""
    keys = ["model", "family", "revision", "dtype", "text_max_length", "rows_per_shard", "store_dtype", "prompts"]
    keys += ["data", "height", "width", "num_frames", "steps", "guidance_scale", "flow_shift", "save_steps", "seed"]
    keys += ["student_steps", "step_tolerance", "batch_size", "negative_prompt", "negative_embeds"]
    return {"command": "generate", **{k: getattr(args, k) for k in keys}, "inputs": count, "inputs_digest": digest}


def check_args(args: argparse.Namespace) -> None:
    """Argument errors that need no model."""
    if args.student_steps is not None and args.save_steps is not None:
        raise ConfigError("--student-steps replaces --save-steps: give one or the other")
    if args.save_steps is None and args.student_steps is None:
        args.save_steps = list(range(args.steps))
    bad = [s for s in args.save_steps or () if not 0 <= s < args.steps]
    if bad:
        raise ConfigError(
            f"--save-steps {bad[0]}: step indices must lie in 0 .. {args.steps - 1} (--steps {args.steps})"
        )
    if args.save_steps is not None and sorted(set(args.save_steps)) != args.save_steps:
        raise ConfigError(f"--save-steps {args.save_steps}: must be increasing, without repeats")
    if args.guidance_scale < 1.0:
        raise ConfigError(f"--guidance-scale {args.guidance_scale}: must be >= 1 (1: no guidance)")
    if args.negative_embeds is not None and args.negative_prompt:
        raise ConfigError("--negative-embeds replaces --negative-prompt: give one or the other")


def run(args: argparse.Namespace) -> int:
    from accel_distill.precision import dtype_of
    from accel_distill.preprocess.encode import make_encoder, resolve_dtype
    from accel_distill.preprocess.shards import ShardStore
    from accel_distill.prompts import load_embedding_file, pad_tokens
    from accel_distill.registry import FAMILIES

    from .inputs import ParquetInputs, PromptInputs
    from .job import GenerateJob, generate
    from .teacher import Teacher, teacher_adapter, teacher_config

    check_args(args)
    dist = distributed()
    dtype = resolve_dtype(args.dtype, dist.device)
    encoder = make_encoder(args.family, args.model, dtype=dtype, device=dist.device, revision=args.revision)
    encoder.check_video_size(args.height, args.width, args.num_frames)
    cfg = teacher_config(
        args.family,
        args.model,
        revision=args.revision,
        dtype=dtype,
        flow_shift=args.flow_shift,
        text_max_length=args.text_max_length,
        output=args.output,
    )
    student_timesteps = ()
    if args.student_steps is not None:  # the timesteps a kd run with these steps trains at, exactly
        fit = FAMILIES[args.family].few_step_schedule(
            cfg, args.student_steps, key="--student-steps", tolerance=args.step_tolerance, kind="ode"
        )
        student_timesteps = fit.timesteps
    store_dtype = dtype_of(args.store_dtype)
    if args.prompts is not None:
        inputs = PromptInputs(args.prompts, encoder, text_max_length=args.text_max_length, store_dtype=store_dtype)
    else:
        text_dim = getattr(teacher_adapter(cfg), "text_dim", None)  # the data's embeddings are checked against it
        inputs = ParquetInputs(args.data, text_max_length=args.text_max_length, text_dim=text_dim)
    store = ShardStore(args.output, settings(args, inputs.digest, len(inputs)))
    store.check_settings(write=dist.rank == 0)

    def bad_negative(message: str):
        raise ConfigError(f"--negative-embeds {message}")

    @functools.cache
    def negative() -> torch.Tensor | None:
        if args.guidance_scale == 1.0:
            return None
        if args.negative_embeds is not None:
            return load_embedding_file(args.negative_embeds, args.text_max_length, bad_negative)
        (emb,) = encoder.encode_text([args.negative_prompt], args.text_max_length)
        return pad_tokens(emb, args.text_max_length)

    job = GenerateJob(
        latent_shape=tuple(encoder.latent_shape(args.num_frames, args.height, args.width)),
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        guidance_scale=args.guidance_scale,
        save_steps=args.save_steps or (),
        save_timesteps=student_timesteps,
        seed=args.seed,
        batch_size=args.batch_size,
        text_max_length=args.text_max_length,
        rows_per_shard=args.rows_per_shard,
        row_group_size=args.row_group_size,
        store_dtype=store_dtype,
    )
    teacher = functools.cache(lambda: Teacher(cfg, steps=args.steps, device=dist.device))
    report = generate(
        inputs, teacher, negative, job, store, rank=dist.rank, world_size=dist.world_size, barrier=dist.barrier
    )
    if dist.rank == 0:
        print(report.summary(args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and return 2."""
    from accel_distill.cli import user_errors_as_exit_code

    args = parse_args(argv)
    return user_errors_as_exit_code(lambda: run(args))
