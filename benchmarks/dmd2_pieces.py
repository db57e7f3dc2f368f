"""The framework pieces of ``Trainer.step`` timed against plain-torch equivalents (benchmarks/dmd2_overhead.py's
last table: where T_iter - T_parts goes)."""

from __future__ import annotations

import torch

from benchmarks.common import median, timed


class Pieces:
    """Framework pieces of ``Trainer.step`` against their plain-torch equivalents, alternating A/B order.

    Not part of the ratio: this says where T_iter - T_parts goes. Uses the critic role
    (grads from one forward + backward) and the trainer's own data iterator.
    """

    def __init__(self, bench):  # a dmd2_overhead.Bench
        from accel_distill.trainer.loop import move_to

        rt, trainer, method = bench.rt, bench.trainer, bench.method
        acc, h = rt.accelerator, rt.bundle["critic"]
        raw_opt = getattr(h.optimizer, "optimizer", h.optimizer)
        self.bench, self.device = bench, method.device
        metrics = [torch.tensor(float(i), device=self.device) for i in range(5)]  # a student iteration logs 5
        self.pairs: dict[str, tuple] = {
            "AdamW step (AcceleratedOptimizer / torch)": (h.optimizer.step, raw_opt.step),
            "LR scheduler step (LambdaLR / none)": (h.lr_scheduler.step, lambda: None),
            "next batch + move_to (LatentStream / none)": (
                lambda: move_to(next(trainer.batches), acc.device),
                lambda: None,
            ),
        }
        from accel_distill.data.finite import finite_probes

        guard_batch = move_to(next(trainer.batches), acc.device)
        norms = metrics[:2]  # a student iteration clips 2 modules

        def guard() -> None:  # the input probes and the one sync, as Trainer.step runs them
            trainer._finite(metrics, norms, finite_probes(guard_batch))

        self.pairs["non-finite guard: inputs + 5 metrics + 2 norms (Trainer / one stacked check)"] = (
            guard,
            lambda: bool(torch.isfinite(torch.stack(metrics + norms)).all().item()),
        )
        if hasattr(method, "sample_noise"):
            batch = move_to(next(trainer.batches), acc.device)
            x, b, n = bench.parts.x, bench.parts.x.shape[0], len(method.timesteps)
            gen = torch.Generator(self.device).manual_seed(0)

            def per_sample() -> None:  # the draws of a data-mode student-update iteration
                rng = method.sample_noise(batch)
                rng.randint(n), rng.randn_like(x), rng.rand(), rng.randn_like(x), rng.rand(), rng.randn_like(x)

            def one_generator() -> None:
                torch.randint(n, (b,), generator=gen, device=self.device)
                for _ in range(3):
                    torch.randn(x.shape, generator=gen, device=self.device)
                for _ in range(2):
                    torch.rand(b, generator=gen, device=self.device)

            self.pairs["noise of one iteration (per-sample SampleNoise / one generator)"] = (per_sample, one_generator)
        self.times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in self.pairs}
        self.n = 0

    def run(self) -> None:
        self.bench.parts.fn("critic_fwd_bwd")()  # gradients for the optimizer step
        first = self.n % 2  # alternate which side goes first
        for name, fns in self.pairs.items():
            for side in (first, 1 - first):
                self.times[name][side].append(timed(fns[side], self.device))
        self.bench.rt.bundle["critic"].optimizer.zero_grad(set_to_none=True)
        self.n += 1

    def rows(self) -> list[list[str]]:
        out = []
        for name, (a, b) in self.times.items():
            ma, mb = median(a), median(b)
            out.append([name, f"{1e6 * ma:.0f}", f"{1e6 * mb:.0f}", f"{1e6 * (ma - mb):+.0f}"])
        return out
