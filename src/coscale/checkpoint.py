"""HF-layout DeepSeek checkpoints: streaming load, sharded save, FP8 block dequantisation.

Layout (the published DeepSeek-V2 / V2-Lite / V3 repositories, and what HF transformers writes)::

    config.json                          ModelConfig.to_dict() (+ quantization_config when FP8)
    model-00001-of-0000N.safetensors     tensors, HF names
    model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

A single ``model.safetensors`` without an index loads too.

Names: HF names are mapped to the model's by its state-dict adapter (coscale.model.state_dict: stacked
routed experts, MTP layers at index num_hidden_layers, the MTP layers' copies of the shared embedding
and head). This module reads and writes safetensors through that adapter and never touches module
internals.

MTP: HF transformers never saves the MTP layers, and many fine-tuned checkpoints ship without them
while their config still declares num_nextn_predict_layers. A checkpoint with no tensor of any MTP
layer loads as the main model: one warning line, and the model's MTP depth becomes 0. A checkpoint
that lacks any other tensor (part of an MTP layer included) is an error.

FP8 (DeepSeek-V3's published format): a weight W [N, K] is stored as float8_e4m3fn together with
``<name>_scale_inv`` [ceil(N/128), ceil(K/128)] float32, one scale per 128x128 block (edge blocks may be
ragged), and W = W_fp8 * scale_inv broadcast over its block. Every tensor with a ``_scale_inv`` partner
is dequantised on load (to ``dtype`` or bfloat16), with the block size of the config's
quantization_config. ``save_pretrained(fp8=True)`` quantises with coscale.kernels.quant's 128x128
reference quantizer (the one the FP8 recipe uses) the 2D ``*proj*.weight`` tensors inside
``self_attn`` and ``mlp`` (experts and shared experts included; not the router ``mlp.gate``,
embeddings, the head, norms or ``eh_proj``), as the published V3 files do.

Streaming: the model is built on the meta device, the headers of all shards are read and checked
against it (missing, unexpected and mis-shaped tensors are reported before any data is read), every
parameter is then allocated once on the target device and filled tensor by tensor (an expert into its
slice), so at most the model plus one checkpoint tensor are in memory. Buffers that checkpoints do not
hold (RoPE tables, expert-load counters) are recomputed by the model's ``init_buffers()``.

Saving writes into a temporary directory beside the target and renames it into place: a failed save
(a full disk, an unwritable target) leaves nothing behind and raises a one-line CheckpointError that
names the path and the cause. Files and directories get the modes the process umask gives.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from coscale.config import ModelConfig
from coscale.errors import CheckpointError, CoscaleError
from coscale.kernels.quant import weight_quant_128x128_ref
from coscale.model.state_dict import (
    StateDictAdapter,
    is_mtp_layer,
    is_mtp_shared_copy,
    is_stacked_expert,
    local_expert_index,
)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
_FP8_WEIGHT_RE = re.compile(r"\.(self_attn|mlp)\.(.+\.)?[a-z_]*proj[a-z_]*\.weight$")
_log = logging.getLogger(__name__)


def is_fp8_weight_name(name: str) -> bool:
    """HF names that the published DeepSeek-V3 files store in FP8 (Linear weights of attention / FFN)."""
    return _FP8_WEIGHT_RE.search(name) is not None


# ---- FP8 block scaling ----------------------------------------------------------------------------

def _check_block_scale(w_shape: torch.Size, s_shape: torch.Size, block: int) -> None:
    expected = tuple(math.ceil(d / block) for d in w_shape)
    if len(w_shape) != 2 or tuple(s_shape) != expected:
        raise ValueError(
            f"scale_inv of shape {tuple(s_shape)} does not match weight {tuple(w_shape)} in "
            f"{block}x{block} blocks (expected {expected})"
        )


def dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] (FP8) with scale_inv [ceil(N/block), ceil(K/block)] -> W * scale in `dtype`.

    The product is formed in float32 and then cast, so equal inputs give equal bits.
    """
    _check_block_scale(w.shape, scale_inv.shape, block)
    n, k = w.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (w.float() * scale).to(dtype)


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (W_fp8 [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] float32).

    coscale.kernels.quant's reference 128x128 quantizer (each block's absolute maximum maps to 448),
    cut from its padded layout to the checkpoint's ragged one.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8_block expects a 2D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    q, scale_inv = weight_quant_128x128_ref(w)
    return q[:n, :k].contiguous(), scale_inv


def _block_size(cfg: ModelConfig) -> int:
    """The FP8 block edge of a checkpoint (ModelConfig has checked that the block is square)."""
    qc = cfg.quantization_config or {}
    return int(qc.get("weight_block_size", [FP8_BLOCK])[0])


# ---- reading a checkpoint ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its shard's header."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def load_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (CheckpointError when missing or not DeepSeek)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} not found: a checkpoint directory needs its config.json")
    try:
        return ModelConfig.from_json(config_path)
    except CoscaleError as e:  # its messages name the file already
        raise CheckpointError(str(e) if config_path in str(e) else f"{config_path}: {e}") from None


def _open_shard(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{file} is not a valid safetensors file ({e})") from None


def checkpoint_weight_map(path: str | os.PathLike, open_shard=_open_shard) -> dict[str, str]:
    """{tensor name: shard path} from model.safetensors.index.json, or from a single model.safetensors
    (whose header, opened with `open_shard`, lists the names)."""
    path = os.fspath(path)
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index_path):
        single = os.path.join(path, SINGLE_FILE)
        if not os.path.isfile(single):
            raise CheckpointError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        return dict.fromkeys(open_shard(single).keys(), single)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: {e!r}") from None
    result = {}
    for name, shard in weight_map.items():
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path} maps {name} to {shard}, which does not exist")
        result[name] = shard_path
    return result


def read_tensor_infos(weight_map: dict[str, str], open_shard=_open_shard) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor, from the shard headers opened with `open_shard` (no tensor
    data is read)."""
    infos: dict[str, TensorInfo] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        shard = open_shard(file)
        present = set(shard.keys())
        for name in names:
            if name not in present:
                raise CheckpointError(f"index maps {name} to {file}, but that shard has no such tensor")
            s = shard.get_slice(name)
            dtype = _ST_DTYPES.get(s.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{name} in {file} has unsupported dtype {s.get_dtype()}")
            infos[name] = TensorInfo(file, tuple(s.get_shape()), dtype)
    return infos


class _TensorReader:
    """The tensors of checkpoint `path`, each shard opened once: the handle that lists its names and
    shapes (``infos``) also reads its data. `read` is the single point where checkpoint data enters
    memory, one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self._handles: dict[str, object] = {}
        self.infos = read_tensor_infos(checkpoint_weight_map(path, self._shard), self._shard)

    def _shard(self, file: str):
        if file not in self._handles:
            self._handles[file] = _open_shard(file)
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        file = self.infos[name].file
        try:
            return self._shard(file).get_tensor(name)
        except Exception as e:  # a shard truncated or rewritten after its header was read
            raise CheckpointError(f"cannot read {name} from {file} ({e})") from None

    def close(self) -> None:
        self._handles.clear()


# ---- load plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadItem:
    """Copy checkpoint tensor `hf_name` (dequantised with `scale_name` if set) into `target`
    (into slice `expert` of a stacked expert weight when set)."""

    hf_name: str
    target: str
    expert: int | None
    scale_name: str | None


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def plan_load(infos: dict[str, TensorInfo], adapter: StateDictAdapter,
              expert_range: range | None = None) -> list[LoadItem]:
    """Match checkpoint tensors to the adapter's model; raise CheckpointError for any mismatch."""
    cfg, expected = adapter.cfg, adapter.tensors
    block = _block_size(cfg)
    scales = {n[: -len(SCALE_SUFFIX)]: n for n in infos if n.endswith(SCALE_SUFFIX)}
    plan, unexpected, filled = [], [], {}
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in infos:
                unexpected.append(name)
            continue
        target, expert = adapter.target(name)
        if is_mtp_shared_copy(name, cfg) and adapter.hf_names(target)[0] in infos:
            continue  # the main model's copy is loaded instead
        if expert is not None:
            expert = local_expert_index(expert, expert_range)
            if expert is None:
                continue  # another rank's expert
        if target not in expected:
            unexpected.append(name)
            continue
        _check_shape(name, info, expected[target], expert)
        scale = scales.get(name)
        _check_scale(name, info, infos.get(scale), block)
        filled.setdefault(target, set()).add(expert)
        plan.append(LoadItem(name, target, expert, scale))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the model does not have: "
                              f"{_first(unexpected)}")
    missing = _missing(adapter, filled, expert_range)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs: {_first(missing)}")
    return plan


def _check_shape(name: str, info: TensorInfo, param: torch.Tensor, expert: int | None) -> None:
    want = tuple(param.shape)
    if expert is not None:
        if expert >= want[0]:
            raise CheckpointError(
                f"{name}: expert {expert} (local index) is beyond the model's {want[0]} experts per layer"
            )
        want = want[1:]
    if info.shape != want:
        raise CheckpointError(f"{name} has shape {list(info.shape)} in {info.file}, the model expects "
                              f"{list(want)}")


def _check_scale(name: str, info: TensorInfo, scale: TensorInfo | None, block: int) -> None:
    if scale is None:
        if info.dtype in FP8_DTYPES:
            raise CheckpointError(f"{name} is {info.dtype} in {info.file} but has no {name}{SCALE_SUFFIX}")
        return
    try:
        _check_block_scale(torch.Size(info.shape), torch.Size(scale.shape), block)
    except ValueError as e:
        raise CheckpointError(f"{name}{SCALE_SUFFIX}: {e}") from None


def _missing(adapter: StateDictAdapter, filled: dict[str, set], expert_range: range | None) -> list[str]:
    """HF names of the tensors no checkpoint entry fills."""
    missing = []
    for name, t in adapter.tensors.items():
        got = filled.get(name, set())
        if not is_stacked_expert(name):
            missing += [] if got else adapter.hf_names(name)
            continue
        offset = expert_range.start if expert_range is not None else 0
        missing += adapter.hf_names(name, [j + offset for j in range(t.shape[0]) if j not in got])
    return missing


def _drop_mtp_if_absent(adapter: StateDictAdapter, infos: dict[str, TensorInfo], path: str) -> None:
    """No tensor of any MTP layer (HF transformers saves none): load the main model, MTP depth 0."""
    depth = len(getattr(adapter.model, "mtp", ()))
    if depth == 0 or any(is_mtp_layer(name, adapter.cfg) for name in infos):
        return
    _log.warning("%s holds no MTP weights (HF transformers saves none) though the config declares "
                 "num_nextn_predict_layers %d: loading the main model only, MTP depth set to 0", path, depth)
    adapter.drop_mtp()


# ---- filling the model ------------------------------------------------------------------------

def _target_dtype(name: str, ckpt_dtype: torch.dtype, scaled: bool, dtype: torch.dtype | None):
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    if not (ckpt_dtype.is_floating_point or scaled):
        return ckpt_dtype
    if dtype is not None:
        return dtype
    return torch.bfloat16 if scaled or ckpt_dtype in FP8_DTYPES else ckpt_dtype


def _prepare_targets(adapter: StateDictAdapter, plan: list[LoadItem], infos: dict[str, TensorInfo],
                     dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Real tensors to fill, by canonical name: meta tensors are allocated now (dtype from the
    checkpoint, see `_target_dtype`), real ones are filled in place in their own dtype."""
    first = {}
    for item in plan:
        first.setdefault(item.target, item)
    targets = {}
    for name, t in list(adapter.tensors.items()):
        if t.device.type != "meta":
            targets[name] = t
            continue
        item = first[name]
        d = _target_dtype(name, infos[item.hf_name].dtype, item.scale_name is not None, dtype)
        targets[name] = adapter.materialize(name, d, device)
    return targets


def _load_item(item: LoadItem, reader: _TensorReader, dest: torch.Tensor, block: int) -> None:
    t = reader.read(item.hf_name).to(dest.device)
    if item.scale_name is not None:
        scale = reader.read(item.scale_name).to(dest.device)
        t = dequant_fp8_block(t, scale, block, dtype=dest.dtype)
    with torch.no_grad():
        (dest if item.expert is None else dest[item.expert]).copy_(t)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise CheckpointError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. 'bfloat16')")
    return resolved


def _as_range(expert_range) -> range | None:
    if expert_range is None or isinstance(expert_range, range):
        return expert_range
    start, stop = expert_range
    return range(start, stop)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, expert_range=None,
                    cfg: ModelConfig | None = None) -> nn.Module:
    """Stream checkpoint `path` into `model` tensor by tensor and return it.

    Tensors on the meta device are allocated on `device` (default CPU) in the checkpoint's dtype, or
    `dtype` when given (FP8 weights: `dtype` or bfloat16; `e_score_correction_bias`: float32);
    tensors already materialised are filled in place. `expert_range` (a range or (start, stop)) loads
    only those routed experts, renumbered from 0, into a model built with that many experts per layer
    (expert parallelism). A checkpoint without MTP weights loads into the main model and removes the
    model's MTP modules (one warning). Everything is checked before any tensor data is read.
    """
    cfg = cfg or getattr(model, "config", None) or load_checkpoint_config(path)
    device = torch.device(device or "cpu")
    dtype = _as_dtype(dtype)
    expert_range = _as_range(expert_range)
    adapter = StateDictAdapter(model, cfg)
    reader = _TensorReader(path)
    try:
        infos = reader.infos
        _drop_mtp_if_absent(adapter, infos, os.fspath(path))
        plan = plan_load(infos, adapter, expert_range)
        targets = _prepare_targets(adapter, plan, infos, dtype, device)
        block = _block_size(adapter.cfg)
        for item in sorted(plan, key=lambda i: (infos[i.hf_name].file, i.hf_name)):
            _load_item(item, reader, targets[item.target], block)
    finally:
        reader.close()
    adapter.init_buffers(device)
    return model


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Build a DeepseekForCausalLM from an HF-layout checkpoint directory (see `load_checkpoint`)."""
    from coscale.model.transformer import DeepseekForCausalLM

    cfg = load_checkpoint_config(path)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    load_checkpoint(model, path, dtype=dtype, device=device, cfg=cfg)
    return model.eval()


# ---- saving --------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB" (10^9) or "512MiB" (2^20)."""
    if isinstance(size, int) and size > 0:
        return size
    m = _SIZE_RE.match(str(size))
    if not m or float(m[1]) <= 0:
        raise CheckpointError(f"invalid max_shard_size {size!r}; use bytes or a string like '2GB'")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "B").upper()])


def _saved_nbytes(t: torch.Tensor, quantize: bool) -> int:
    if not quantize:
        return t.numel() * t.element_size()
    return t.numel() + 4 * math.ceil(t.shape[0] / FP8_BLOCK) * math.ceil(t.shape[1] / FP8_BLOCK)


def _plan_shards(entries, limit: int, fp8: bool) -> list[list[tuple[str, torch.Tensor, bool]]]:
    shards, current, size = [], [], 0
    for name, t in entries:
        quantize = fp8 and t.ndim == 2 and t.is_floating_point() and is_fp8_weight_name(name)
        nbytes = _saved_nbytes(t, quantize)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t, quantize))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _shard_tensors(shard) -> dict[str, torch.Tensor]:
    """CPU copies of one shard's tensors (quantised where marked); own storage, as safetensors needs."""
    out = {}
    for name, t, quantize in shard:
        t = t.detach()
        if quantize:  # on the tensor's own device, which may be a GPU
            q, scale_inv = quantize_fp8_block(t)
            out[name], out[name + SCALE_SUFFIX] = q.cpu(), scale_inv.cpu()
        else:
            out[name] = t.to("cpu", copy=True).contiguous()
    return out


def _check_target(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; pass overwrite=True to replace it")


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temporary directory into place (renames: never a half-written checkpoint)."""
    _check_target(path, overwrite)
    if not os.path.isdir(path):
        os.rename(tmp, path)
        return
    if not os.listdir(path):
        os.rmdir(path)
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(old, "checkpoint"))
    os.rename(tmp, path)
    shutil.rmtree(old)


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
                    fp8: bool = False, overwrite: bool = False) -> None:
    """Write `model` as an HF-layout checkpoint: config.json, model-0000i-of-0000N.safetensors and
    model.safetensors.index.json. `fp8=True` writes the published FP8 layout (128x128 block scales).
    The directory appears atomically; a non-empty one is replaced only with overwrite=True. A disk
    that fills up or a target that cannot be written raises CheckpointError and leaves nothing."""
    cfg: ModelConfig = model.config
    path = os.path.abspath(os.fspath(path))
    _check_target(path, overwrite)
    limit = parse_size(max_shard_size)
    shards = _plan_shards(StateDictAdapter(model, cfg).hf_tensors(), limit, fp8)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        dir_mode, file_mode = _umask_modes(tmp)
        _write_files(tmp, shards, cfg, fp8, file_mode)
        os.chmod(tmp, dir_mode)
        _publish(tmp, path, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise _cannot_write(path, e) from None
        raise


def _cannot_write(path: str, e: Exception) -> CheckpointError:
    """One line naming the checkpoint and the cause (a full disk, a read-only or missing target)."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:
        cause = f"{e.filename} is not a directory"
    elif isinstance(e, OSError):
        cause = e.strerror or str(e)
        where = os.fspath(e.filename) if e.filename else path
        if os.path.dirname(where) != os.path.dirname(path):  # not the target or a temporary beside it
            cause += f" ({where})"
    else:  # safetensors reports "Error while serializing: I/O error: No space left on device (os error 28)"
        cause = re.sub(r"^Error while serializing: (I/O error: )?", "", str(e))
    return CheckpointError(" ".join(f"cannot write checkpoint {path}: {cause}".split()))


def _umask_modes(directory: str) -> tuple[int, int]:
    """(directory mode, file mode) the process umask gives: tempfile and safetensors create theirs
    owner-only, so they are set explicitly. Read from a probe directory (os.umask would have to change
    the process-wide mask to read it)."""
    probe = os.path.join(directory, ".umask-probe")
    os.mkdir(probe, 0o777)
    try:
        mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    return mode, mode & 0o666


def _write_json(file: str, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_files(directory: str, shards, cfg: ModelConfig, fp8: bool, file_mode: int) -> None:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _shard_tensors(shard)
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        os.chmod(os.path.join(directory, file), file_mode)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    _write_json(os.path.join(directory, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = cfg.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8 else None).to_dict()
    config["torch_dtype"] = _dominant_dtype(shards)
    _write_json(os.path.join(directory, CONFIG_FILE), config)  # open() honours the umask itself


def _dominant_dtype(shards) -> str:
    """HF's `torch_dtype`: the dtype of most (unquantised) parameters."""
    counts: dict[torch.dtype, int] = {}
    for shard in shards:
        for _, t, _ in shard:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "float32"
