"""Request formats ("codecs"), one module each: `source` (a robot's own units, through its Source), `raw` (the
model's fields, as the authors name them) and `act` (the authors' HTTP `/act`). See `base` for the four steps."""

from xvla.serve.codecs.act import ACT
from xvla.serve.codecs.base import Codec, Prepared
from xvla.serve.codecs.raw import RAW
from xvla.serve.codecs.source import SOURCE

__all__ = ["ACT", "RAW", "SOURCE", "Codec", "Prepared"]
