"""Teacher data generation: ``python -m accel_distill.generate`` (or ``accel-distill-generate``).

A teacher samples every prompt of a prompt list (or of a parquet of embedded prompts) with
classifier-free guidance in the project's own sampler (:mod:`.teacher`), and each row is
written in the project's parquet schema with its latent = the teacher's final x0 (so
``finetune`` and ``dmd2`` with ``rollout_mode: data`` read it unchanged) plus the trajectory
method ``kd`` reads (:data:`accel_distill.data.schema.TRAJ_LATENTS` and friends). Shards,
resume and multi-rank work as preprocessing's (:mod:`accel_distill.preprocess.shards`);
every row's noise comes from its own seed, so the output does not depend on the world size.
"""

from .job import GENERATE_STREAM, GenerateJob, generate
from .teacher import Teacher, teacher_config

__all__ = ["GENERATE_STREAM", "GenerateJob", "Teacher", "generate", "teacher_config"]
