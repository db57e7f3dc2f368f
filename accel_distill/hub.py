"""Publish an export folder on the Hugging Face Hub, with a model card that says how to sample it.

``push_export`` writes ``README.md`` (a diffusers-style model card built from
``accel_distill_export.json``), creates the repo and uploads the export folder
only: training checkpoints, optimizer / RNG state and temporary folders that
may sit inside it are excluded, so a push never leaks resumable training state.

The token is never taken on the command line (it would land in shell history
and the process list); it comes from ``token=`` or whatever ``huggingface_hub``
resolves (``HF_TOKEN``, the cached ``hf auth login``), and is never printed,
logged or written to a file.

Command line: ``python -m accel_distill.hub FOLDER --repo-id owner/name [--private]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accel_distill.errors import UserError
from accel_distill.model_card import (  # noqa: F401  (re-exported: the push API and its card)
    _HUB_ID_RE,
    EXPORT_INFO_FILE,
    is_hub_id,
    model_card_text,
    read_export_info,
    write_model_card,
)

# Never uploaded, wherever they sit in the folder (fnmatch: "*" also matches "/").
UPLOAD_IGNORE_PATTERNS: list[str] = [
    # training checkpoints (accelerate save_state folders) and their parents
    "checkpoint-*",
    "*/checkpoint-*",
    "checkpoints/*",
    "*/checkpoints/*",
    # optimizer / lr-scheduler / RNG state, pickles, torch state dicts
    "optimizer*",
    "*/optimizer*",
    "scheduler.bin",
    "*/scheduler.bin",
    "random_states*",
    "*/random_states*",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.ckpt",
    # temporary / half-written / hidden folders and files (.tmp-*, .old-*, .git, ...)
    ".*",
    "*/.*",
    "*.tmp",
    "*.tmp-*",
    "*.tmp/*",
    # run logs that are not part of the model
    "wandb/*",
    "*/wandb/*",
    "logs/*",
    "__pycache__/*",
    "*/__pycache__/*",
]


def files_to_upload(folder: str | Path) -> list[str]:
    """Relative paths in ``folder`` that :func:`push_export` uploads (after the ignore patterns)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder).expanduser()
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def public_export_info(folder: str | Path) -> bytes:
    """The export info as published: a local ``source`` path (this machine's layout) is left out."""
    info = read_export_info(folder)
    source = info.get("source")
    if source and not is_hub_id(str(source)):
        info = {**info, "source": None, "source_is_local": True}
    return (json.dumps(info, indent=2) + "\n").encode()


def public_file(folder: Path, rel: str) -> str | bytes:
    """What the push sends for ``rel``: the file, less this machine's paths (export info, configs' local
    ``_name_or_path``, which diffusers and transformers write and ignore when loading)."""
    if rel == EXPORT_INFO_FILE:
        return public_export_info(folder)
    path = folder / rel
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return str(path)
        name = data.get("_name_or_path") if isinstance(data, dict) else None
        if isinstance(name, str) and name and not is_hub_id(name):
            return (json.dumps({k: v for k, v in data.items() if k != "_name_or_path"}, indent=2) + "\n").encode()
    return str(path)


def _scrub(text: str, token: str | None) -> str:
    """``text`` with the token (if any) masked, for error messages."""
    from huggingface_hub import get_token

    for secret in {token, get_token()}:
        if secret:
            text = text.replace(secret, "***")
    return text


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Write the model card, create ``repo_id`` (if needed) and upload the export ``folder``; return the repo URL.

    ``token`` None lets huggingface_hub resolve it (``HF_TOKEN`` or the cached login).
    Hub refusals (no/invalid token, no write access, bad repo id) raise :class:`UserError`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    folder = Path(folder).expanduser()
    read_export_info(folder)
    if not _HUB_ID_RE.match(repo_id or ""):
        raise UserError(f"--repo-id {repo_id!r}: expected a Hub repo id 'owner/name'")
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    if token is None and get_token() is None:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (needs write access)")

    write_model_card(folder, repo_id)
    try:
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        # one commit: the folder as upload_folder would send it, but the info file without local paths
        operations = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=public_file(folder, rel))
            for rel in files_to_upload(folder)
        ]
        api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.name} (accel_distill export)",
        )
    except HFValidationError as e:
        raise UserError(f"--repo-id {repo_id!r}: {_scrub(str(e), token)}") from None
    except HfHubHTTPError as e:
        first = _scrub(str(e), token).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push to {repo_id} failed: {first}") from None
    except Exception as e:
        # huggingface_hub 1.x raises httpx's TransportError, 2.x httpx2's: match either by name
        if not any(c.__name__ == "TransportError" for c in type(e).__mro__):
            raise
        raise UserError(f"cannot reach the Hub at {constants.ENDPOINT}: {_scrub(str(e), token)}") from None
    return str(url)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m accel_distill.hub",
        description="Push an accel_distill export folder to the Hugging Face Hub with a model card. "
        "The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("folder", help="export folder (holds accel_distill_export.json)")
    parser.add_argument("--repo-id", required=True, help="Hub repo id, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default=None, help="commit message of the upload")
    parser.add_argument(
        "--dry-run", action="store_true", help="write README.md and list the files that would be uploaded; no network"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and return 2, success prints the repo URL."""
    args = parse_args(argv)
    try:
        if args.dry_run:
            read_export_info(args.folder)
            write_model_card(args.folder, args.repo_id)
            print("\n".join(files_to_upload(args.folder)))
            return 0
        url = push_export(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
