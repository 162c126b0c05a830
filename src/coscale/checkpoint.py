"""HF-layout DeepSeek checkpoints: streaming load, sharded save, FP8 block dequantisation.

Layout (the published DeepSeek-V2 / V2-Lite / V3 repositories)::

    config.json                          ModelConfig.to_dict() (+ quantization_config when FP8)
    model-00001-of-0000N.safetensors     tensors, HF names
    model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

A single ``model.safetensors`` without an index loads too.

Name mapping (pure functions, reusable by expert parallelism): coscale stacks the routed experts of a
layer into ``mlp.experts.w_gate [E, I, H]`` (``w_up``, ``w_down [E, H, I]``) where HF stores
``mlp.experts.{j}.gate_proj.weight`` per expert; MTP module k is ``mtp.{k}.*`` in coscale and
``model.layers.{L+k}.*`` in HF (L = num_hidden_layers), with ``mtp.{k}.block.X`` <-> ``layers.{L+k}.X``,
``mtp.{k}.norm`` <-> ``layers.{L+k}.shared_head.norm`` and enorm/hnorm/eh_proj unchanged. HF also stores
per MTP layer copies of the shared ``embed_tokens.weight`` and ``shared_head.head.weight``: they are
written on save and ignored on load (used only when the main copy is absent).

FP8 (DeepSeek-V3's published format): a weight W [N, K] is stored as float8_e4m3fn together with
``<name>_scale_inv`` [ceil(N/128), ceil(K/128)] float32, one scale per 128x128 block (edge blocks may be
ragged), and W = W_fp8 * scale_inv broadcast over its block. Every tensor with a ``_scale_inv`` partner
is dequantised on load (to ``dtype`` or bfloat16). ``save_pretrained(fp8=True)`` quantises the 2D
``*proj*.weight`` tensors inside ``self_attn`` and ``mlp`` (experts and shared experts included; not the
router ``mlp.gate``, embeddings, the head, norms or ``eh_proj``), as the published V3 files do.

Streaming: the model is built on the meta device, the headers of all shards are read and checked
against it (missing, unexpected and mis-shaped tensors are reported before any data is read), every
parameter is then allocated once on the target device and filled tensor by tensor (an expert into its
slice), so at most the model plus one checkpoint tensor are in memory. Buffers that checkpoints do not
hold (RoPE tables, expert-load counters) are recomputed by the model's ``init_buffers()``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from coscale.config import ModelConfig
from coscale.errors import CheckpointError, CoscaleError

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

# ---- name mapping (pure) --------------------------------------------------------------------------

_EXPERT_PROJ_TO_STACK = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
_STACK_TO_EXPERT_PROJ = {v: k for k, v in _EXPERT_PROJ_TO_STACK.items()}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_RE = re.compile(r"^(.+\.mlp\.experts)\.(w_gate|w_up|w_down)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
_MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight",
                      "shared_head.head.weight": "lm_head.weight"}
_FP8_WEIGHT_RE = re.compile(r"\.(self_attn|mlp)\.(.+\.)?[a-z_]*proj[a-z_]*\.weight$")


def hf_to_coscale_name(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """HF tensor name -> (coscale state_dict name, global expert index or None).

    An MTP layer's copy of the shared embedding / head maps to the main model's name; see
    `is_mtp_shared_copy`. Names are mapped without checking that the model has them.
    """
    m = _LAYER_RE.match(name)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        k, rest = int(m[1]) - cfg.num_hidden_layers, m[2]
        if rest in _MTP_SHARED_COPIES:
            return _MTP_SHARED_COPIES[rest], None
        if rest in _MTP_OWN:
            name = f"mtp.{k}.{rest}"
        elif rest == "shared_head.norm.weight":
            name = f"mtp.{k}.norm.weight"
        else:
            name = f"mtp.{k}.block.{rest}"
    e = _HF_EXPERT_RE.match(name)
    if e:
        return f"{e[1]}.{_EXPERT_PROJ_TO_STACK[e[3]]}", int(e[2])
    return name, None


def coscale_to_hf_name(name: str, cfg: ModelConfig, expert: int | None = None) -> str:
    """coscale state_dict name (plus the expert index for stacked experts) -> HF tensor name."""
    s = _STACKED_RE.match(name)
    if (s is None) != (expert is None):
        raise ValueError(f"{name}: an expert index is needed exactly for stacked expert weights")
    if s:
        name = f"{s[1]}.{expert}.{_STACK_TO_EXPERT_PROJ[s[2]]}.weight"
    m = _MTP_RE.match(name)
    if m:
        layer, rest = cfg.num_hidden_layers + int(m[1]), m[2]
        if rest == "norm.weight":
            rest = "shared_head.norm.weight"
        elif rest.startswith("block."):
            rest = rest[len("block."):]
        name = f"model.layers.{layer}.{rest}"
    return name


def is_mtp_shared_copy(name: str, cfg: ModelConfig) -> bool:
    """True for an MTP layer's copy of the shared embedding or output head (HF name)."""
    m = _LAYER_RE.match(name)
    return bool(m) and int(m[1]) >= cfg.num_hidden_layers and m[2] in _MTP_SHARED_COPIES


def is_stacked_expert(name: str) -> bool:
    """True for a coscale stacked routed-expert weight (`...mlp.experts.w_gate` etc.)."""
    return _STACKED_RE.match(name) is not None


def is_fp8_weight_name(name: str) -> bool:
    """HF names that the published DeepSeek-V3 files store in FP8 (Linear weights of attention / FFN)."""
    return _FP8_WEIGHT_RE.search(name) is not None


def local_expert_index(expert: int, expert_range: range | None) -> int | None:
    """Index of a global expert inside the local range (None when the range excludes it)."""
    if expert_range is None:
        return expert
    return expert - expert_range.start if expert in expert_range else None


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


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK,
                       fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (W_fp8 [N, K], scale_inv [ceil(N/block), ceil(K/block)] float32).

    Each block's absolute maximum maps to the FP8 format's largest finite value; an all-zero block
    gets scale_inv 1 (its values stay zero).
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8_block expects a 2D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = w.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)  # (row block, row, col block, col)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / torch.finfo(fp8_dtype).max, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).view(nb * block, kb * block)[:n, :k]
    return q.to(fp8_dtype).contiguous(), scale_inv.contiguous()


def _block_size(cfg: ModelConfig) -> int:
    qc = cfg.quantization_config or {}
    size = qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if len(size) != 2 or size[0] != size[1]:
        raise CheckpointError(f"quantization_config weight_block_size {size} is not a square block")
    return int(size[0])


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
    except CoscaleError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


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


def _expected_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict tensors by canonical name, and {alias: canonical} for tied tensors."""
    tensors: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            alias[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t
    return tensors, alias


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def plan_load(infos: dict[str, TensorInfo], model: nn.Module, cfg: ModelConfig,
              expert_range: range | None = None) -> list[LoadItem]:
    """Match checkpoint tensors to the model's state_dict; raise CheckpointError for any mismatch."""
    expected, alias = _expected_tensors(model)
    block = _block_size(cfg)
    scales = {n[: -len(SCALE_SUFFIX)]: n for n in infos if n.endswith(SCALE_SUFFIX)}
    plan, unexpected, filled = [], [], {}
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in infos:
                unexpected.append(name)
            continue
        target, expert = hf_to_coscale_name(name, cfg)
        target = alias.get(target, target)
        if is_mtp_shared_copy(name, cfg) and coscale_to_hf_name(target, cfg) in infos:
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
    missing = _missing(expected, filled, cfg, expert_range)
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


def _missing(expected: dict[str, torch.Tensor], filled: dict[str, set], cfg: ModelConfig,
             expert_range: range | None) -> list[str]:
    """HF names of the tensors no checkpoint entry fills."""
    missing = []
    for name, t in expected.items():
        got = filled.get(name, set())
        if not is_stacked_expert(name):
            if not got:
                missing.append(coscale_to_hf_name(name, cfg))
            continue
        offset = expert_range.start if expert_range is not None else 0
        missing += [coscale_to_hf_name(name, cfg, j + offset) for j in range(t.shape[0]) if j not in got]
    return missing


# ---- filling the model ------------------------------------------------------------------------

def _target_dtype(name: str, ckpt_dtype: torch.dtype, scaled: bool, dtype: torch.dtype | None):
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    if not (ckpt_dtype.is_floating_point or scaled):
        return ckpt_dtype
    if dtype is not None:
        return dtype
    return torch.bfloat16 if scaled or ckpt_dtype in FP8_DTYPES else ckpt_dtype


def _materialize(model: nn.Module, names: list[str], like: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Allocate a meta tensor once on `device` and install it under all its (tied) names."""
    new = torch.empty(like.shape, dtype=dtype, device=device)
    if isinstance(like, nn.Parameter):
        new = nn.Parameter(new, requires_grad=like.requires_grad)
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
    return new


def _prepare_targets(model: nn.Module, plan: list[LoadItem], infos: dict[str, TensorInfo],
                     dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Real tensors to fill, by canonical name: meta tensors are allocated now (dtype from the
    checkpoint, see `_target_dtype`), real ones are filled in place in their own dtype."""
    expected, alias = _expected_tensors(model)
    names: dict[str, list[str]] = {n: [n] for n in expected}
    for a, canonical in alias.items():
        names[canonical].append(a)
    first = {}
    for item in plan:
        first.setdefault(item.target, item)
    targets = {}
    for name, t in expected.items():
        if t.device.type != "meta":
            targets[name] = t
            continue
        item = first[name]
        d = _target_dtype(name, infos[item.hf_name].dtype, item.scale_name is not None, dtype)
        targets[name] = _materialize(model, names[name], t, d, device)
    return targets


def _load_item(item: LoadItem, reader: _TensorReader, dest: torch.Tensor, block: int) -> None:
    t = reader.read(item.hf_name).to(dest.device)
    if item.scale_name is not None:
        scale = reader.read(item.scale_name).to(dest.device)
        t = dequant_fp8_block(t, scale, block, dtype=dest.dtype)
    with torch.no_grad():
        (dest if item.expert is None else dest[item.expert]).copy_(t)


def _init_leftover_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers outside the checkpoint (RoPE tables, load counters): allocate, then let the model
    recompute them with `init_buffers()` (the contract with coscale.model)."""
    allocated = []
    for module_name, module in model.named_modules():
        for attr, b in module._buffers.items():
            if b is not None and b.device.type == "meta":
                module._buffers[attr] = torch.empty(b.shape, dtype=b.dtype, device=device)
                allocated.append(f"{module_name}.{attr}")
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    elif allocated:
        raise RuntimeError(f"{type(model).__name__} has no init_buffers() to compute {_first(allocated)}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors still on the meta device after loading: {_first(left)}")


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
    (expert parallelism). Everything is checked before any tensor data is read.
    """
    cfg = cfg or getattr(model, "config", None) or load_checkpoint_config(path)
    device = torch.device(device or "cpu")
    dtype = _as_dtype(dtype)
    expert_range = _as_range(expert_range)
    reader = _TensorReader(path)
    try:
        infos = reader.infos
        plan = plan_load(infos, model, cfg, expert_range)
        targets = _prepare_targets(model, plan, infos, dtype, device)
        block = _block_size(cfg)
        for item in sorted(plan, key=lambda i: (infos[i.hf_name].file, i.hf_name)):
            _load_item(item, reader, targets[item.target], block)
    finally:
        reader.close()
    _init_leftover_buffers(model, device)
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

def iter_hf_tensors(model: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor or expert slice) for everything a published checkpoint holds, in order."""
    expected, _ = _expected_tensors(model)
    for name, t in expected.items():
        if is_stacked_expert(name):
            for j in range(t.shape[0]):
                yield coscale_to_hf_name(name, cfg, j), t[j]
        else:
            yield coscale_to_hf_name(name, cfg), t
    for k in range(len(getattr(model, "mtp", ()))):
        for rest, main in _MTP_SHARED_COPIES.items():
            if main in expected:
                yield f"model.layers.{cfg.num_hidden_layers + k}.{rest}", expected[main]


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


def _saved_nbytes(t: torch.Tensor, quantize: bool, block: int) -> int:
    if not quantize:
        return t.numel() * t.element_size()
    return t.numel() + 4 * math.ceil(t.shape[0] / block) * math.ceil(t.shape[1] / block)


def _plan_shards(entries, limit: int, fp8: bool, block: int) -> list[list[tuple[str, torch.Tensor, bool]]]:
    shards, current, size = [], [], 0
    for name, t in entries:
        quantize = fp8 and t.ndim == 2 and t.is_floating_point() and is_fp8_weight_name(name)
        nbytes = _saved_nbytes(t, quantize, block)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t, quantize))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _shard_tensors(shard, block: int) -> dict[str, torch.Tensor]:
    """CPU copies of one shard's tensors (quantised where marked); own storage, as safetensors needs."""
    out = {}
    for name, t, quantize in shard:
        t = t.detach()
        if quantize:  # on the tensor's own device, which may be a GPU
            q, scale_inv = quantize_fp8_block(t, block)
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
    The directory appears atomically; a non-empty one is replaced only with overwrite=True."""
    cfg: ModelConfig = model.config
    path = os.path.abspath(os.fspath(path))
    _check_target(path, overwrite)
    limit = parse_size(max_shard_size)
    block = _block_size(cfg) if fp8 else FP8_BLOCK
    shards = _plan_shards(iter_hf_tensors(model, cfg), limit, fp8, block)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        _write_files(tmp, shards, cfg, fp8, block)
        _publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(directory: str, shards, cfg: ModelConfig, fp8: bool, block: int) -> None:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = _shard_tensors(shard, block)
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    qc = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=[block, block]) if fp8 else None
    config = cfg.replace(quantization_config=qc).to_dict()
    config["torch_dtype"] = _dominant_dtype(shards)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _dominant_dtype(shards) -> str:
    """HF's `torch_dtype`: the dtype of most (unquantised) parameters."""
    counts: dict[torch.dtype, int] = {}
    for shard in shards:
        for _, t, _ in shard:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "float32"
