"""HF tensor names <-> coscale module names: the state-dict adapter of DeepseekForCausalLM.

The published DeepSeek checkpoints (and HF transformers) name tensors as coscale's modules do except
in three places:

| coscale                                              | HF                                               |
|------------------------------------------------------|--------------------------------------------------|
| ``...mlp.experts.w_gate [E, I, H]`` (stacked)         | ``...mlp.experts.{j}.gate_proj.weight`` per expert |
| ``w_up``, ``w_down [E, H, I]``                         | ``up_proj``, ``down_proj``                        |
| ``mtp.{k}.block.X``                                   | ``model.layers.{L+k}.X``  (L = num_hidden_layers) |
| ``mtp.{k}.enorm`` / ``hnorm`` / ``eh_proj``           | ``model.layers.{L+k}.enorm`` / ...                |
| ``mtp.{k}.norm.weight``                               | ``model.layers.{L+k}.shared_head.norm.weight``    |

and HF stores in every MTP layer a copy of the shared ``model.embed_tokens.weight`` and of
``lm_head.weight`` (as ``shared_head.head.weight``): written on save, read on load only when the main
copy is absent.

The mapping functions are pure (expert parallelism reuses them). `StateDictAdapter` binds them to one
model: the tensors a checkpoint must fill (tied ones once), their HF names, and the few changes to the
model that loading needs (allocating tensors built on the meta device, recomputing buffers, dropping
MTP modules a checkpoint does not have). coscale.checkpoint streams safetensors through it and never
touches module internals; this package never imports coscale.checkpoint. (torchtitan keeps its
state_dict_adapter beside the model the same way.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from coscale.config import ModelConfig

_EXPERT_PROJ_TO_STACK = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
_STACK_TO_EXPERT_PROJ = {v: k for k, v in _EXPERT_PROJ_TO_STACK.items()}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_RE = re.compile(r"^(.+\.mlp\.experts)\.(w_gate|w_up|w_down)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight",
                     "shared_head.head.weight": "lm_head.weight"}


# ---- name mapping (pure) --------------------------------------------------------------------------

def hf_to_coscale_name(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """HF tensor name -> (coscale state_dict name, global expert index or None).

    An MTP layer's copy of the shared embedding / head maps to the main model's name; see
    `is_mtp_shared_copy`. Names are mapped without checking that the model has them.
    """
    m = _LAYER_RE.match(name)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        k, rest = int(m[1]) - cfg.num_hidden_layers, m[2]
        if rest in MTP_SHARED_COPIES:
            return MTP_SHARED_COPIES[rest], None
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


def is_mtp_layer(name: str, cfg: ModelConfig) -> bool:
    """True for an HF name inside an MTP layer (model.layers.{L+k}.*), shared copies included."""
    m = _LAYER_RE.match(name)
    return bool(m) and int(m[1]) >= cfg.num_hidden_layers


def is_mtp_shared_copy(name: str, cfg: ModelConfig) -> bool:
    """True for an MTP layer's copy of the shared embedding or output head (HF name)."""
    return is_mtp_layer(name, cfg) and _LAYER_RE.match(name)[2] in MTP_SHARED_COPIES


def is_stacked_expert(name: str) -> bool:
    """True for a coscale stacked routed-expert weight (`...mlp.experts.w_gate` etc.)."""
    return _STACKED_RE.match(name) is not None


def local_expert_index(expert: int, expert_range: range | None) -> int | None:
    """Index of a global expert inside the local range (None when the range excludes it)."""
    if expert_range is None:
        return expert
    return expert - expert_range.start if expert in expert_range else None


# ---- one model's tensors under HF names ---------------------------------------------------------

class StateDictAdapter:
    """The persistent tensors of `model` (its state_dict) as a checkpoint sees them.

    ``tensors`` holds each tensor once under its canonical (first) name; tied tensors are reached
    through `target`. Tensors may live on the meta device until `materialize` allocates them.
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig | None = None):
        self.model = model
        self.cfg = cfg or model.config
        self._index()

    def _index(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._canonical: dict[str, str] = {}  # every state_dict name -> the first name of its tensor
        first_name: dict[int, str] = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            self._canonical[name] = first_name.setdefault(id(t), name)
            self.tensors.setdefault(self._canonical[name], t)

    # ---- names ------------------------------------------------------------------------------
    def target(self, hf_name: str) -> tuple[str, int | None]:
        """(canonical coscale name, global expert index or None) of an HF tensor name."""
        name, expert = hf_to_coscale_name(hf_name, self.cfg)
        return self._canonical.get(name, name), expert

    def hf_names(self, name: str, experts=None) -> list[str]:
        """HF names of canonical tensor `name`: one per expert of `experts` for stacked weights
        (default: all of the tensor's experts)."""
        if not is_stacked_expert(name):
            return [coscale_to_hf_name(name, self.cfg)]
        experts = experts if experts is not None else range(self.tensors[name].shape[0])
        return [coscale_to_hf_name(name, self.cfg, j) for j in experts]

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor or expert slice) for everything a published checkpoint holds, in order:
        the model's tensors, then each MTP layer's copies of the shared embedding and head."""
        for name, t in self.tensors.items():
            if is_stacked_expert(name):
                yield from zip(self.hf_names(name), t.unbind(0))
            else:
                yield coscale_to_hf_name(name, self.cfg), t
        for k in range(len(getattr(self.model, "mtp", ()))):
            for rest, main in MTP_SHARED_COPIES.items():
                if main in self._canonical:
                    yield f"model.layers.{self.cfg.num_hidden_layers + k}.{rest}", self.tensors[
                        self._canonical[main]]

    # ---- changes loading makes to the model ---------------------------------------------------
    def drop_mtp(self) -> None:
        """Remove the model's MTP modules and set its MTP depth to 0 (a checkpoint without them)."""
        self.model.mtp = nn.ModuleList()
        self.cfg = self.cfg.replace(num_nextn_predict_layers=0)
        if getattr(self.model, "config", None) is not None:
            self.model.config = self.cfg
        self._index()

    def materialize(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Give canonical tensor `name` (on the meta device) storage on `device` and return it
        (uninitialised: the caller fills it). The tensor object is kept (torch.utils.swap_tensors), so
        tied names and references to it see the new storage and no module is re-registered."""
        t = self.tensors[name]
        new = torch.empty(t.shape, dtype=dtype, device=device)
        torch.utils.swap_tensors(t, nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new)
        return t

    def init_buffers(self, device: torch.device) -> None:
        """Allocate the buffers checkpoints do not hold (RoPE tables, expert-load counters) and let the
        model recompute them (`init_buffers()`); then nothing may be left on the meta device."""
        allocated = []
        for name, b in self.model.named_buffers():
            if b.device.type == "meta":
                torch.utils.swap_tensors(b, torch.empty(b.shape, dtype=b.dtype, device=device))
                allocated.append(name)
        if hasattr(self.model, "init_buffers"):
            self.model.init_buffers()
        elif allocated:
            raise RuntimeError(f"{type(self.model).__name__} has no init_buffers() to compute {allocated[0]}")
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"tensors still on the meta device after loading: {', '.join(left[:5])}")
