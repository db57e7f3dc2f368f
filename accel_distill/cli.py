"""Command line: ``train_distill.py --config run.yaml [--dry-run] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import yaml

from accel_distill.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_distill.py",
        description="Distill or finetune a diffusion model with one YAML recipe (recipe, roles, training, "
        "pipeline_config, method_config).",
    )
    parser.add_argument("--config", required=True, help="run YAML")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, then exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the YAML")
    return parser.parse_args(argv)


def end_progress_bars() -> None:
    """Close the tqdm bars still drawn (an error raised mid-training): what is printed next starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def user_errors_as_exit_code(run: Callable[[], int]) -> int:
    """``run()``; a user mistake closes the progress bars, prints one ``error:`` line and returns its exit code."""
    try:
        return run()
    except UserError as e:
        end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and return 2."""
    args = parse_args(argv)
    try:
        from accel_distill.config import load_config, resolved_dict

        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from accel_distill.builder import describe_plan

            print(yaml.safe_dump(resolved_dict(cfg), sort_keys=False), end="")
            print("# plan")
            print("\n".join(describe_plan(cfg)))
            return 0
        from accel_distill.run import train

        out = train(cfg)
        print(f"exported student to {out}")
    except UserError as e:
        end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BaseException:
        end_progress_bars()  # a traceback or KeyboardInterrupt, too
        raise
    return 0
