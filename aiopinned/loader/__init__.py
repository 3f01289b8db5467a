"""Loading model weights and data shards from disk through pool buffers: ``FileReader`` reads
file ranges into pinned memory (page cache or ``O_DIRECT``, per range), and
``load_safetensors`` / ``stream_safetensors`` bring safetensors checkpoints to a device."""

from ._format import MAX_HEADER_BYTES
from ._pipeline import Loaded, load_safetensors, stream_safetensors
from ._reader import ALIGN, FileReader, ReadReport

__all__ = [
    "ALIGN",
    "MAX_HEADER_BYTES",
    "FileReader",
    "Loaded",
    "ReadReport",
    "load_safetensors",
    "stream_safetensors",
]
