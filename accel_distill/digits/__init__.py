"""The embedded default model: a tiny Wan pipeline trained on scikit-learn's handwritten digits.

``data`` loads and splits the digits, ``vae`` trains the small ``AutoencoderKLWan``,
``build`` assembles the pipeline, encodes the parquet and runs the project's own
``finetune`` recipe for the teacher (``python -m accel_distill.digits.build``).
"""

DIGIT_WORDS = [str(i) for i in range(10)]
TEXT_MAX_LENGTH = 16  # prompt tokens the digits models are trained and sampled with


def caption(label: int) -> str:
    """The caption of digit ``label``: "a handwritten digit N"."""
    return f"a handwritten digit {int(label)}"
