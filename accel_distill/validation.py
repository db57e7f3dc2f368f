"""Validation sampling: the student renders fixed prompts every ``training.validation_steps`` iterations.

Enabled by ``training.log_validation``; nothing here is imported otherwise, so
training never needs the text encoder or the VAE weights because of it.

* Prompts come from ``training.validation_dataset_file`` (FastVideo's
  ``{"data": [{"caption": ...}]}``, a list of strings, or a list of
  ``{"caption"|"prompt": ..., "prompt_embeds": file}``). Prompts without a
  precomputed embedding are encoded once, by the main process, and cached in
  ``<output_dir>/validation_prompt_embeds.safetensors``.
* Sampling uses the student (its EMA weights when its EMA spec says
  ``validate``) through the adapter, so DDP / FSDP / LoRA wrapping is handled.
  A few-step student samples with its own schedule (the stock scheduler of the
  export, with ``set_timesteps(n)`` for other step counts); a many-step student
  with its noise schedule's many-step scheduler (rectified flow:
  ``FlowMatchEulerDiscreteScheduler`` and the family's flow shift).
  Each prompt has a fixed seed (``training.seed`` and its index), so it gets
  the same noise at every validation and with any number of processes.
* Prompts are split across processes (padded so every process runs the same
  forwards: FSDP forwards are collective); latents are gathered to the main
  process, which decodes them with the student source's VAE, writes
  ``<output_dir>/validation/step-<N>/<i>_<n>steps_g<g>.png`` (first frame) and
  ``.gif`` (all frames) and logs them to the trackers.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.training_utils import free_memory

from accel_distill.config.schema import RunConfig
from accel_distill.config.validate import fail, looks_local
from accel_distill.context_parallel import Parallelism
from accel_distill.errors import ConfigError
from accel_distill.methods.base import derived_seed
from accel_distill.prompts import encode_cached, load_embedding_file
from accel_distill.schedule import StockSchedule, with_step_count
from accel_distill.trainer.callbacks import Callback

logger = get_logger(__name__)

KEY = "training.validation_dataset_file"
# derived_seed stream of validation noise (methods use 0 = shared, 1 = per sample).
VALIDATION_STREAM = 2
MANY_STEP_DEFAULT = 50
GIF_FPS = 16
CACHE_NAME = "validation_prompt_embeds.safetensors"


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation prompt: its caption and, optionally, a precomputed ``[L, D]`` embedding file."""

    caption: str
    embeds_file: str | None = None


def read_prompts(path: str, source: str = "<config>") -> list[ValidationPrompt]:
    """Parse the validation JSON; every problem is a :class:`ConfigError` naming the key and the file."""

    def bad(message: str):
        fail(source, KEY, f"{path}: {message}")

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        bad(f"cannot read ({e.strerror or e})")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        bad(f"not valid JSON ({e})")
    if isinstance(data, dict):
        if not isinstance(data.get("data"), list):
            bad('expected {"data": [...]}, a list of captions, or a list of {"caption": ...} objects')
        data = data["data"]
    if not isinstance(data, list) or not data:
        bad("holds no prompts" if isinstance(data, list) else f"expected a list of prompts, got {type(data).__name__}")
    base = Path(os.path.expanduser(path)).parent
    prompts = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"caption": item}
        if not isinstance(item, dict):
            bad(f"item {i}: expected a caption string or an object, got {type(item).__name__}")
        caption = item.get("caption", item.get("prompt"))
        embeds = item.get("prompt_embeds")
        if embeds is not None and not isinstance(embeds, str):
            bad(f"item {i}: prompt_embeds must be a file path, got {type(embeds).__name__}")
        if caption is None and embeds is None:
            bad(f'item {i}: needs "caption" (or "prompt") or "prompt_embeds"')
        if caption is not None and not isinstance(caption, str):
            bad(f"item {i}: caption must be a string, got {type(caption).__name__}")
        if embeds is not None:
            embeds = os.path.expanduser(embeds)
            embeds = embeds if os.path.isabs(embeds) else str(base / embeds)
        prompts.append(ValidationPrompt(caption if caption is not None else f"prompt {i}", embeds))
    return prompts


def load_embedding(file: str, max_length: int, source: str, path: str) -> torch.Tensor:
    """A precomputed prompt embedding named in the validation file, padded to ``max_length`` tokens."""

    def bad(message: str) -> NoReturn:
        fail(source, KEY, f"{path}: prompt_embeds {message}")

    return load_embedding_file(file, max_length, bad)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """A decoded video ``[3, F, H, W]`` in [-1, 1] -> uint8 frames ``[F, H, W, 3]`` (VideoProcessor's rounding)."""
    x = (video.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)


def write_media(frames: np.ndarray, stem: Path, fps: int = GIF_FPS) -> tuple[Path, Path]:
    """``stem.png`` (first frame) and ``stem.gif`` (all frames, looping)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    png, gif = stem.with_suffix(".png"), stem.with_suffix(".gif")
    images[0].save(png)
    images[0].save(gif, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return png, gif


def variant_label(steps: int, guidance: float) -> str:
    return f"{steps}steps_g{guidance:g}"


class ValidationCallback(Callback):
    """Samples the validation prompts with the student and writes / logs the videos.

    ``cfg``: the run config; ``rt``: the built :class:`~accel_distill.builder.Runtime`;
    ``ema``: the run's EMA callback, if any. Construction is collective (every
    process must build it): it may encode prompts on the main process.
    """

    name = "validation"

    def __init__(self, cfg: RunConfig, rt, ema=None):
        self.cfg, self.rt, self.ema = cfg, rt, ema
        self.acc = rt.accelerator
        t = cfg.training
        self.every = t.validation_steps
        self.out = Path(t.output_dir) / "validation"
        self.last_step: int | None = None
        self._vae = None

        if t.validation_dataset_file is None:
            fail(cfg.source, KEY, "required when training.log_validation is true")
        self.prompts = read_prompts(t.validation_dataset_file, cfg.source)

        method = rt.method
        self.latent_shape = tuple(method.latent_shape) if method.latent_shape is not None else None
        if self.latent_shape is None:
            fail(
                cfg.source,
                "pipeline_config.num_frames",
                "validation (training.log_validation) needs the video size: set pipeline_config.num_frames, "
                "height and width",
            )

        role = method.export_role()
        self.role_name = role.name
        self.source = os.path.expanduser(role.source) if looks_local(role.source) else role.source
        self.schedule: StockSchedule | None = method.export_schedule()
        default_steps = self.schedule.num_inference_steps if self.schedule is not None else MANY_STEP_DEFAULT
        self.steps = list(t.validation_sampling_steps) or [default_steps]
        self.guidance = list(t.validation_guidance_scale) or [1.0]
        for i, g in enumerate(self.guidance):
            if g < 1.0:
                fail(cfg.source, f"training.validation_guidance_scale[{i}]", f"must be >= 1, got {g}")
        self.schedules = {n: self.schedule_for(n) for n in self.steps}
        self.variants = [(n, g) for n in self.steps for g in self.guidance]

        self.embeds = self._prompt_embeds()  # [N, L, D] float32, CPU
        self.neg = self._negative() if any(g != 1.0 for g in self.guidance) else None
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            index = [{"index": i, "caption": pr.caption} for i, pr in enumerate(self.prompts)]
            (self.out / "prompts.json").write_text(json.dumps(index, indent=2, ensure_ascii=False))

    # --- set-up -------------------------------------------------------------------------
    def schedule_for(self, num_steps: int) -> StockSchedule:
        """The sampler schedule for ``num_steps``: the student's own, or its scheduler's ``set_timesteps(n)``.

        Many-step students get their noise schedule's ``many_step_schedule()`` (rectified flow:
        ``FlowMatchEulerDiscreteScheduler`` with the family's flow shift).
        """
        if self.schedule is not None and num_steps == self.schedule.num_inference_steps:
            return self.schedule
        schedule = with_step_count(self.schedule or self.rt.adapter.noise.many_step_schedule(), num_steps)
        if schedule is None:
            fail(
                self.cfg.source,
                "training.validation_sampling_steps",
                f"the student's scheduler cannot produce {num_steps} finite timesteps",
            )
        return schedule

    def _prompt_embeds(self) -> torch.Tensor:
        """Every prompt's ``[text_max_length, D]`` embedding: given files, else encoded once and cached."""
        cfg, acc = self.cfg, self.acc
        max_length = cfg.pipeline_config.text_max_length
        embeds: dict[int, torch.Tensor] = {}
        for i, pr in enumerate(self.prompts):
            if pr.embeds_file is not None:
                embeds[i] = load_embedding(pr.embeds_file, max_length, cfg.source, cfg.training.validation_dataset_file)
        todo = [i for i in range(len(self.prompts)) if i not in embeds]
        if todo:
            cache = Path(cfg.training.output_dir) / CACHE_NAME
            captions = [self.prompts[i].caption for i in todo]
            encoded = encode_cached(self.rt.family, self.source, captions, max_length, acc, cache)
            for k, i in enumerate(todo):
                embeds[i] = encoded[k]
        dims = {e.shape[1] for e in embeds.values()}
        if len(dims) != 1:
            fail(
                cfg.source,
                KEY,
                f"{cfg.training.validation_dataset_file}: prompt embeddings differ in width {sorted(dims)}",
            )
        return torch.stack([embeds[i] for i in range(len(self.prompts))])

    def _negative(self) -> torch.Tensor:
        """The unconditional embedding for CFG: the method's, else the configured one (encoded once, cached)."""
        if self.rt.method.neg_cond is not None:
            return self.rt.method.neg_cond.detach().float().cpu()
        from accel_distill.builder import load_negative

        return load_negative(self.cfg, self.rt.family, self.acc).float()

    # --- sampling -----------------------------------------------------------------------
    def prompt_seed(self, index: int) -> int:
        return derived_seed(self.cfg.training.seed, VALIDATION_STREAM, index)

    def _use_ema(self) -> bool:
        return self.ema is not None and self.role_name in self.ema.specs and self.ema.specs[self.role_name].validate

    @torch.no_grad()
    def sample_prompt(self, index: int) -> torch.Tensor:
        """Latents ``[V, C, T, H, W]`` of prompt ``index`` for every (steps, guidance) variant.

        Call inside :meth:`student_context` (eval mode, EMA weights, autocast).
        """
        role, adapter, device = self.rt.method.export_role(), self.rt.adapter, self.acc.device
        cond = adapter.conditioning({"text_embeds": self.embeds[index : index + 1].to(device)})
        neg = adapter.negative(cond, self.neg.to(device)) if self.neg is not None else None
        out = []
        for n, g in self.variants:
            gen = torch.Generator().manual_seed(self.prompt_seed(index))  # CPU: same noise on any device
            noise = torch.randn((1, *self.latent_shape), generator=gen).to(device)

            def predict(x, t, g=g):
                return adapter.predict_cfg(role, x, t, cond, neg, g)

            out.append(adapter.noise.sample(predict, self.schedules[n], noise, generator=gen)[0].float())
        return torch.stack(out)

    @contextlib.contextmanager
    def student_context(self):
        """Student in eval mode (EMA weights if asked), no grad, the accelerator's autocast; train mode restored."""
        modules = list(self.rt.method.export_role().modules.values())
        was_training = [m.training for m in modules]
        ema = self.ema.averaged(self.role_name) if self._use_ema() else contextlib.nullcontext()
        for m in modules:
            m.eval()
        try:
            with ema, torch.no_grad(), self.acc.autocast():
                yield
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)

    def generate(self) -> torch.Tensor | None:
        """Latents ``[N, V, C, T, H, W]`` of all prompts, on the main process (None elsewhere). Collective."""
        # Prompts split over data-parallel ranks: a context-parallel group samples its prompts together.
        par = self.rt.parallel or Parallelism(self.acc.num_processes, self.acc.process_index)
        world, rank, n = par.dp_size, par.dp_rank, len(self.prompts)
        per_rank = -(-n // world)
        # Prompt k * world + rank on this rank; past the end, a repeat whose result is dropped.
        mine = [(k * world + rank) % n for k in range(per_rank)]
        with self.student_context():
            local = torch.stack([self.sample_prompt(i) for i in mine])  # [K, V, C, T, H, W]
        gathered = self.acc.gather(local.contiguous()) if self.acc.num_processes > 1 else local
        if not self.acc.is_main_process:
            return None
        # processes are (data rank, context rank), context innermost; a group's ranks hold the same latents
        gathered = gathered.reshape(world, par.cp_size, per_rank, *local.shape[1:])[:, 0].cpu()
        return torch.stack([gathered[i % world, i // world] for i in range(n)])

    # --- decoding and output ------------------------------------------------------------
    def vae(self):
        if self._vae is None:
            try:
                vae = self.rt.family.load_vae(self.source)
            except OSError as e:
                raise ConfigError(
                    f"{self.cfg.source}: roles.{self.role_name}.path: cannot load the VAE for validation from "
                    f"{self.source!r} ({str(e).splitlines()[0]})"
                ) from None
            self._vae = vae
        return self._vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Normalised latents ``[B, C, T, H, W]`` -> uint8 frames ``[F, H, W, 3]`` per sample."""
        vae, device = self.vae(), self.acc.device
        vae.to(device)
        try:
            frames = []
            for x in latents:
                raw = self.rt.adapter.denormalize_latents(x.unsqueeze(0).to(device))
                video = self.rt.family.decode(vae, raw)
                frames.append(to_frames(video[0]))
        finally:
            vae.to("cpu")
            free_memory()
        return frames

    def run(self, step: int) -> float:
        """One validation at ``step`` (every process calls); returns its wall time in seconds."""
        start = time.perf_counter()
        latents = self.generate()
        if self.acc.is_main_process:
            folder = self.out / f"step-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            media: dict[str, list[tuple[int, Path, Path, int]]] = {}
            for v, (n, g) in enumerate(self.variants):
                label = variant_label(n, g)
                for i, frames in enumerate(self.decode(latents[:, v])):
                    png, gif = write_media(frames, folder / f"{i}_{label}")
                    media.setdefault(label, []).append((i, png, gif, len(frames)))
            self._log_trackers(step, media)
            logger.info(f"validation at step {step}: {len(self.prompts)} prompts x {len(self.variants)} in {folder}")
        self.acc.wait_for_everyone()
        self.last_step = step
        return time.perf_counter() - start

    def _log_trackers(self, step: int, media: dict[str, list[tuple[int, Path, Path, int]]]) -> None:
        """wandb: a Video (GIF) per prompt, an Image for one-frame samples; tensorboard: first frames."""
        started = {tracker.name for tracker in self.acc.trackers}
        for name in self.cfg.training.trackers:
            if name not in started:
                continue
            tracker = self.acc.get_tracker(name, unwrap=True)
            if name == "wandb":
                import wandb

                logs = {}
                for label, items in media.items():
                    logs[f"validation/{label}"] = [
                        wandb.Video(str(gif), caption=self._caption(i))
                        if num_frames > 1
                        else wandb.Image(str(png), caption=self._caption(i))
                        for i, png, gif, num_frames in items
                    ]
                tracker.log(logs, step=step)
            elif name == "tensorboard":
                from PIL import Image

                for label, items in media.items():
                    images = np.stack([np.asarray(Image.open(png).convert("RGB")) for _, png, _, _ in items])
                    tracker.add_images(f"validation/{label}", images, step, dataformats="NHWC")
                    captions = "\n\n".join(self._caption(i) for i, *_ in items)
                    tracker.add_text(f"validation/{label}/captions", captions, step)

    def _caption(self, index: int) -> str:
        return f"{index}: {self.prompts[index].caption}"

    # --- callback hooks -------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.cfg.training.validation_at_start and trainer.state.iteration == 0 and self.last_step is None:
            self.run(0)

    def on_step_end(self, trainer, iteration: int, stepped: list[str]) -> dict[str, float]:
        step = trainer.state.iteration
        if step % self.every != 0 or step == self.last_step:
            return {}
        # Every process returns the same keys: the trainer reduces metrics across processes.
        return {"validation_seconds": self.run(step)}

    def on_train_end(self, trainer) -> None:
        self._vae = None

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state.get("last_step")
