"""How a checkpoint holds the model and the optimizer: the one difference between plain and sharded.

`PlainWeights` writes the weights as ``model.safetensors`` (rank 0) and the optimizer into the
training state; `ShardedWeights` (``parallelism: fsdp``) writes both through
`torch.distributed.checkpoint` into ``shards/``, every rank its own shard, loadable on any number
of ranks. Everything else -- the temporary directory, checksums, the training state, errors -- is
the one save path of `bigbatch.train.checkpoint`. Reading never executes code from the files
(docs/design.md, invariant 5): the shards' metadata is unpickled through a list of allowed classes
and every item is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import datetime
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from bigbatch.core import distributed
from bigbatch.train.checkpoint_files import copy_weights_only, fsync_file
from bigbatch.train.checkpoint_shards import SavePlans, recording_writer

MODEL_FILE = "model.safetensors"
SHARDS_DIR = "shards"
SHARDS_METADATA = f"{SHARDS_DIR}/.metadata"
SHARDED_STATE = "the sharded model and optimizer state"

_METADATA_CLASSES = frozenset(
    {
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
    }
)


class Weights(Protocol):
    """Where the model and optimizer of a checkpoint go, and how they come back."""

    sharded: bool

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What of the model and optimizer goes into the training state (rank 0's is kept)."""
        ...

    def write(self, directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Write the weights (and optimizer) into the temporary checkpoint directory; every rank."""
        ...

    def stage(self, model: torch.nn.Module, optimizer: Any) -> Any:
        """A copy in CPU memory of what `write` writes, which training may no longer change;
        every rank (rank 0's alone when only rank 0 writes)."""
        ...

    def write_staged(self, directory: Path, staged: Any) -> Callable[[], None]:
        """Start writing ``staged`` into the temporary checkpoint directory; every rank. The
        returned call finishes the write (run it in a background thread): on return, this
        rank's files are written, or it raises why not."""
        ...

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        """The weights (or meta tensors of their shapes) for checks; raises if damaged."""
        ...

    def load(
        self,
        path: Path,
        model_state: dict[str, torch.Tensor],
        training_state: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Load a validated checkpoint's weights and optimizer into this run's; every rank."""
        ...


def weights_format(sharded: bool, collective_timeout_s: float = 600.0) -> Weights:
    """The strategy that writes (or reads) plain or sharded checkpoints."""
    return ShardedWeights(collective_timeout_s) if sharded else PlainWeights()


class PlainWeights:
    """``model.safetensors`` written by rank 0, the optimizer's state_dict in the training state."""

    sharded: bool = False

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict()}

    def write(self, directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
        if distributed.is_main_process():
            write_safetensors(directory / MODEL_FILE, model.state_dict())

    def stage(self, model: torch.nn.Module, optimizer: Any) -> Any:
        return (
            cpu_copy(model.state_dict(), "model_state") if distributed.is_main_process() else None
        )

    def write_staged(self, directory: Path, staged: Any) -> Callable[[], None]:
        if not distributed.is_main_process():
            return lambda: None
        return lambda: write_safetensors(directory / MODEL_FILE, staged)

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(str(path / MODEL_FILE), device="cpu")

    def load(
        self,
        path: Path,
        model_state: dict[str, torch.Tensor],
        training_state: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(training_state["optimizer"])


def cpu_copy(value: Any, where: str = "state") -> Any:
    """``value`` with every tensor copied into fresh CPU memory (dicts, lists and tuples copied
    along): a snapshot that training, which updates tensors in place, cannot change. The same
    walk refuses what ``torch.load(weights_only=True)`` could not read back (`check_weights_only`,
    a TypeError naming ``where``), so a state copied here needs no second check."""
    with torch.no_grad():  # copies that require no gradient, as detach() would make them
        return copy_weights_only(value, where, _fresh_cpu_tensor)


def _fresh_cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.is_cpu else tensor.to("cpu")  # clone: half the time of to()


def write_safetensors(path: Path, model_state: dict[str, torch.Tensor]) -> None:
    """The weights as one safetensors file, fsynced (tied weights stored as copies)."""
    safetensors.torch.save_file(storable_model_state(model_state), str(path))
    fsync_file(path)


def storable_model_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as safetensors accepts them: dense, contiguous, no two sharing memory.

    Tied weights (one tensor under two names) would make safetensors refuse the file, so every
    tensor whose storage was already seen is stored as a copy; loading then fills both names.
    """
    seen: set[tuple[str, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model_state[{name!r}] is a {type(tensor).__name__}; only tensors are allowed "
                "(put other values into training_state)"
            )
        tensor = tensor.detach()
        storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
        if storage in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor.contiguous()
    return tensors


class ShardedWeights:
    """``shards/`` written by `torch.distributed.checkpoint`, each rank its own shard."""

    sharded: bool = True

    def __init__(self, collective_timeout_s: float = 600.0) -> None:
        self._timeout = datetime.timedelta(seconds=collective_timeout_s)
        self._upload_group: Any = None  # the background uploads' own gloo group, made once
        self._plans = SavePlans()  # DCP's save plan, kept from one save of the run to the next

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer": {"sharded": True}}  # the optimizer is in the shards

    def write(self, directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        # Refuse what would not load back weights-only, as `stage` does (a walk with no copy).
        copy_weights_only(state, SHARDED_STATE, lambda tensor: tensor)
        self._save(state, directory, None)

    def stage(self, model: torch.nn.Module, optimizer: Any) -> Any:
        """Every local shard copied into fresh CPU memory, still a DTensor of the same mesh and
        placements: one walk of `cpu_copy`, which also refuses what would not load back
        weights-only, as the plain format's optimizer state is refused (DCP's DefaultStager
        deep-copies every DTensor whole: about ten times the CPU time on tinylm)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        return cpu_copy({"model": model_state, "optimizer": optimizer_state}, SHARDED_STATE)

    def write_staged(self, directory: Path, staged: Any) -> Callable[[], None]:
        """DCP's save of the staged copy, run by the caller's background thread: its
        collectives go over a gloo group of their own, so they never interleave with
        training's on the default group."""
        import torch.distributed as dist

        if self._upload_group is None and distributed.is_initialized():
            # Every rank, at the same save; a rank that never joins an upload is noticed as
            # soon as training's own collectives would notice it, not after torch's 30 minutes.
            self._upload_group = dist.new_group(backend="gloo", timeout=self._timeout)
        return lambda: self._save(staged, directory, self._upload_group)

    def _save(self, state: dict[str, Any], directory: Path, group: Any) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        world_size = dist.get_world_size(group) if distributed.is_initialized() else 1
        failed_writes: list[OSError] = []
        try:
            dcp.save(
                state,
                storage_writer=recording_writer(directory / SHARDS_DIR, failed_writes),
                planner=self._plans.planner(world_size),
                process_group=group,
            )
        except BaseException as error:
            _raise_failed_write(failed_writes, error)
            raise

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = read_shards_metadata(path / SHARDS_DIR)
        check_shards(path / SHARDS_DIR, metadata)
        shapes = {}
        for key, item in metadata.state_dict_metadata.items():
            if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
                shapes[key[len("model.") :]] = torch.empty(
                    tuple(item.size), dtype=item.properties.dtype, device="meta"
                )
        return shapes

    def load(
        self,
        path: Path,
        model_state: dict[str, torch.Tensor],
        training_state: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Resharded to this run's ranks (a collective when distributed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_now, optimizer_now = get_state_dict(model, optimizer)
        dcp.load(
            {"model": model_now, "optimizer": optimizer_now},
            storage_reader=_safe_reader(path / SHARDS_DIR),
            planner=_weights_only_planner(),
        )  # in place
        set_state_dict(model, optimizer, model_state_dict=model_now, optim_state_dict=optimizer_now)


def _raise_failed_write(failed_writes: list[OSError], error: BaseException) -> None:
    """Raise the I/O error underneath ``error`` if a write failed: torch.save inside DCP
    reports a failed write (a full disk) as its own RuntimeError."""
    if failed_writes:
        cause = failed_writes[0]
        cause.strerror = f"{cause.strerror or cause} (rank {distributed.get_rank()})"
        raise cause from error


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata, refusing every class but the few it is made of."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise pickle.UnpicklingError(
                f"{SHARDS_METADATA} refers to {module}.{name}, which is never unpickled"
            )
        return super().find_class(module, name)


def read_shards_metadata(shards: Path) -> Any:
    """The `Metadata` of a DCP checkpoint, read without executing code from the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(shards / ".metadata", "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    if not isinstance(metadata, Metadata):
        raise TypeError(f"{SHARDS_METADATA} holds a {type(metadata).__name__}, not a Metadata")
    return metadata


def check_shards(shards: Path, metadata: Any) -> None:
    """Read every item of every shard with ``weights_only=True``: damage is found now, and the
    previous checkpoint used, rather than an UnpicklingError in the middle of a restore."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in metadata.storage_data.items():
        if info.transform_descriptors:
            raise ValueError(f"{SHARDS_DIR}/{info.relative_path} uses storage transforms")
        with open(shards / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        if len(data) != info.length:
            raise ValueError(f"{SHARDS_DIR}/{info.relative_path} is truncated")
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any parser error of damaged bytes
            raise ValueError(
                f"{SHARDS_DIR}/{info.relative_path}: the item of {index.fqn} does not load "
                f"weights-only ({type(error).__name__}: {str(error)[:120]})"
            ) from error
        expected = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(expected, TensorStorageMetadata):
            sizes = {tuple(chunk.offsets): tuple(chunk.sizes) for chunk in expected.chunks}
            size = sizes.get(tuple(index.offset or ()))
            if not isinstance(value, torch.Tensor) or size not in (None, tuple(value.shape)):
                raise ValueError(
                    f"{SHARDS_DIR}/{info.relative_path} holds no tensor of shape {size} for "
                    f"{index.fqn}"
                )


def _safe_reader(shards: Path) -> Any:
    """DCP's file reader, with the metadata read by `read_shards_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_shards_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(shards))


def _weights_only_planner() -> Any:
    """DCP's default load planner, reading non-tensor items with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                path = self.mappings[read_item.dest_index.fqn]
                set_element(self.original_state_dict, path, loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full weights on rank 0's CPU (empty elsewhere); call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]
