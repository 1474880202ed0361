"""Open a model by path (a GGUF file or a Hugging Face directory; none means the embedded default)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from engine.errors import ModelLoadError
from engine.loader import gguf_loader, hf_loader
from engine.loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from engine.model_spec import ModelSpec
from engine.tokenizer import Tokenizer


@dataclass
class ModelSource:
    """A model on disk whose metadata and tokenizer have been read; weights are streamed on demand."""

    path: Path
    spec: ModelSpec
    tokenizer: Tokenizer
    name: str
    gguf_reader: gguf.GGUFReader | None = None  # kept open: parsing a GGUF header is not free

    @property
    def linear_weights_are_q4_1(self) -> bool:
        return self.gguf_reader is not None and gguf_loader.linear_weights_are_q4_1(self.gguf_reader)

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (Hugging Face tensor name, tensor in ``dtype``)."""
        if self.gguf_reader is not None:
            return gguf_loader.iter_tensors(self.gguf_reader, self.spec, dtype, progress)
        return hf_loader.iter_tensors(self.path, dtype, progress)


def open_model(path: str | Path | None = None) -> ModelSource:
    if path is None:
        return _open_gguf(default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(path).expanduser()
    if path.is_dir():
        spec = hf_loader.read_spec(path)
        hf_loader.check_weight_files(path)
        try:
            tokenizer = Tokenizer.from_hf_dir(path)
        except Exception as exc:  # missing file, bad JSON, or whatever the tokenizers library rejects
            raise ModelLoadError(f"{path}: cannot load the tokenizer: {exc}") from exc
        return ModelSource(path, spec, tokenizer, path.name)
    if path.suffix == ".gguf" or path.is_file():
        return _open_gguf(path, path.stem)
    raise ModelLoadError(f"model path not found: {path} (expected a .gguf file or a Hugging Face model directory)")


def _open_gguf(path: Path, name: str) -> ModelSource:
    reader = gguf_loader.open_gguf(path)
    spec = gguf_loader.read_spec(reader, path)
    gguf_loader.check_tensor_types(reader, path)
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except Exception as exc:  # incomplete or inconsistent tokenizer metadata
        raise ModelLoadError(f"{path.name}: cannot build the tokenizer from the GGUF metadata: {exc}") from exc
    return ModelSource(path, spec, tokenizer, name, reader)
