"""What to generate for: a prompt list (encoded here) or a parquet of already-embedded prompts.

Both give rows ``{"id", "caption", "text_embedding"}`` by position, so a shard ``[lo, hi)``
reads only its own inputs and every row's position (its seed) is fixed by the input alone.
"""

from __future__ import annotations

import torch

from accel_distill.data import CAPTION, ID, LATENT_COLUMNS, TEXT_COLUMNS, LatentStream, bytes_to_tensor, dtype_name
from accel_distill.data.reader import Reader
from accel_distill.families.base import MediaEncoder
from accel_distill.preprocess.jobs import inputs_digest, prompt_id
from accel_distill.preprocess.manifest import read_prompts


class PromptInputs:
    """A ``.txt`` / ``.json`` / ``.jsonl`` prompt list, encoded shard by shard with the family's text encoder."""

    def __init__(self, path: str, encoder: MediaEncoder, *, text_max_length: int, store_dtype: torch.dtype):
        self.prompts = read_prompts(path)
        self.encoder, self.text_max_length, self.store_dtype = encoder, text_max_length, store_dtype
        self.digest = inputs_digest(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, lo: int, hi: int) -> list[dict]:
        embeds = self.encoder.encode_text(self.prompts[lo:hi], self.text_max_length)
        return [
            {"id": prompt_id(i), "caption": p, "text_embedding": e.to(self.store_dtype)}
            for i, p, e in zip(range(lo, hi), self.prompts[lo:hi], embeds)
        ]


class ParquetInputs:
    """Every row of parquet data (``training.data_path`` syntax), in file order; ids, captions and embeddings kept.

    Opened with the training reader, so a wrong text width or length is one line naming the file and row.
    """

    def __init__(self, data_path: str, *, text_max_length: int, text_dim: int | None):
        self.stream = LatentStream(
            data_path,
            batch_size=1,
            seed=0,
            shuffle=False,
            text_max_length=text_max_length,
            require_latents=False,
            expected_text_dim=text_dim,
            prefetch=0,
        )
        self.columns = [ID, CAPTION, *TEXT_COLUMNS, *(LATENT_COLUMNS if self.stream.has_latents else ())]
        files = [str(f) for f in self.stream._files]
        self.digest = inputs_digest([*files, str(self.stream.num_samples)])

    def __len__(self) -> int:
        return self.stream.num_samples

    def rows(self, lo: int, hi: int) -> list[dict]:
        reader = Reader(self.stream, columns=self.columns)
        try:
            out = []
            for g in range(lo, hi):
                r = reader.row(g)
                text = bytes_to_tensor(r.text, r.text_shape, dtype_name(r.text_dtype))
                out.append({"id": r.id, "caption": r.caption, "text_embedding": text})
            return out
        finally:
            reader.close()
