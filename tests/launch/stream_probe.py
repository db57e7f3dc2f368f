"""TEST-ONLY: read batches of a LatentStream in this process and write what each rank saw as JSON.

Run directly (one process) or under ``accelerate launch`` (rank and world size from
accelerate, as the trainer gets them). Writes ``OUT/rank<r>.json``: per step the ids,
sample keys, a digest of every sample's tensors, and the position after it. A user
error is one ``error:`` line on stderr and exit 2, as in the CLIs.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from accel_distill.data import LatentStream
from accel_distill.errors import UserError


def sample_digests(batch: dict) -> list[str]:
    out = []
    for i in range(len(batch["ids"])):
        h = hashlib.sha256()
        for key in ("latents", "text_embeds"):
            if key in batch:
                h.update(batch[key][i].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest()[:16])
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-max-length", type=int, default=8)
    p.add_argument("--load-state", default=None, help="a JSON position to resume from")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    state = PartialState(cpu=True)
    try:
        stream = LatentStream(
            args.data[0] if len(args.data) == 1 else args.data,
            batch_size=args.batch_size,
            seed=args.seed,
            rank=state.process_index,
            world_size=state.num_processes,
            text_max_length=args.text_max_length,
            prefetch=2,
        )
        if args.load_state:
            stream.load_state_dict(json.loads(Path(args.load_state).read_text()))
        seen: dict = {"ids": [], "keys": [], "digests": [], "states": [], "buckets": stream.describe_buckets()}
        it = iter(stream)
        for _ in range(args.steps):
            batch = next(it)
            seen["ids"].append(batch["ids"])
            seen["keys"].append([list(k) for k in batch["sample_keys"]])
            seen["digests"].append(sample_digests(batch))
            seen["states"].append(stream.state_dict())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
