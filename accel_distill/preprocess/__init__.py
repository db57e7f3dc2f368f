"""Data preparation: users' videos, images and prompts -> the project's parquet format.

``python -m accel_distill.preprocess`` (or ``accel-distill-preprocess``) with four sub-commands:

* ``videos``: media + captions -> ``part-NNNNN.parquet`` shards of un-normalised VAE
  latents (posterior mode), text embeddings and metadata (:mod:`.jobs`, :mod:`.media`);
* ``prompts``: a prompt list -> text-only shards (``rollout_mode: simulate``);
* ``negative``: one prompt -> ``[L, D]`` .safetensors (``pipeline_config.negative_prompt_embeds``);
* ``validation``: prompts -> ``validation.json`` + embeddings (``training.validation_dataset_file``).

Sharding, resume and the skipped-input report are described in :mod:`.shards`.
"""

from .encode import make_encoder
from .jobs import MediaJob, Report, preprocess_media, preprocess_prompts, write_negative, write_validation
from .manifest import Item, discover, read_prompts
from .media import Clip, MediaError, load_clip
from .shards import ShardStore

__all__ = [
    "Clip",
    "Item",
    "MediaError",
    "MediaJob",
    "Report",
    "ShardStore",
    "discover",
    "load_clip",
    "make_encoder",
    "preprocess_media",
    "preprocess_prompts",
    "read_prompts",
    "write_negative",
    "write_validation",
]
