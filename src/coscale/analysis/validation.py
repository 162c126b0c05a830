"""Predictions beside coscale's own measurements: the loop that keeps the time models honest.

A measurements file (JSON) holds ``{"measurements": [record, ...]}``; each record names what was timed
and how long it took, the setup the model needs, and where the number comes from::

    {"kind": "train_step", "model": "small", "hardware": "h200.yaml", "seq_len": 512, "batch": 8,
     "precision": "bf16", "eager": true, "seconds": 0.0412, "source": "coscale train ..., run 17"}
    {"kind": "decode_step", "model": "deepseek-v2-lite", "hardware": "h200.yaml", "batch": 32,
     "context": 1024, "mtp_drafts": 0, "seconds": 0.0093, "source": "bench-serve ..."}

``kind`` is ``train_step`` (one optimizer step on one GPU: ``training_time`` with dp = tp = pp = ep = 1)
or ``decode_step`` / ``prefill_step`` (``serving`` on one GPU, no overlap unless ``micro_batches`` says so).
A decode or training record may carry ``kernels_per_step``, the kernel count of the measured stack's step
(from a profile of it): kernels beyond the modelled ops then cost ``small_kernel_us`` each
(``serving.decode``, ``training_time``).
:func:`record_from_run` turns a ``coscale train`` run directory into a ``train_step`` record (median
step time over the second half of its steps, so compilation and warm-up stay out).

:func:`validation_table` prints measured, predicted and their ratio; ``coscale analyze validate
--update-doc docs/analysis.md`` writes that table between the ``<!-- validation:begin -->`` and
``<!-- validation:end -->`` markers of the page.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from coscale.analysis import serving, training_time
from coscale.analysis.memory import ParallelLayout
from coscale.analysis.output import write_text_file
from coscale.analysis.table import Table
from coscale.config import PRESETS as DEEPSEEK_PRESETS
from coscale.config import ModelConfig, get_preset
from coscale.errors import ConfigError

KINDS = ("train_step", "decode_step", "prefill_step")
# the keys each kind of record may hold: any other would be ignored, so it is refused (a typo, or a setting
# the model does not take)
_COMMON_KEYS = ("kind", "model", "hardware", "seconds", "source", "precision")
KEYS = {
    "train_step": _COMMON_KEYS + ("batch", "seq_len", "eager", "include_mtp", "moments", "master", "kernels_per_step",
                                  "grad_clip", "clip_in_update"),
    "decode_step": _COMMON_KEYS + ("batch", "context", "micro_batches", "mtp_drafts", "kernels_per_step"),
    "prefill_step": _COMMON_KEYS + ("tokens", "prompt_len", "micro_batches"),
}
BEGIN, END = "<!-- validation:begin -->", "<!-- validation:end -->"


def load_measurements(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = os.fspath(path)
    records = _read_json(path).get("measurements")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path} must hold {{\"measurements\": [{{...}}, ...]}}")
    if not records:
        raise ConfigError(f"{path} holds no measurement records (its \"measurements\" list is empty)")
    return records


def _need(record: dict, key: str, kind: type = int) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        what = {int: "an integer", str: "a string", bool: "true or false"}.get(kind, f"a {kind.__name__}")
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: {key!r} must be {what}, got {value!r}")
    return value


def _optional(record: dict, key: str, default: Any, kind: type = int) -> Any:
    """``record[key]`` checked as ``_need`` does, or ``default`` when the record leaves it out."""
    return default if key not in record else _need(record, key, kind)


def _count(record: dict, key: str, default: int, minimum: int) -> int:
    """A whole number >= ``minimum`` (micro-batches >= 1, MTP drafts >= 0); a fraction is not truncated."""
    value = _optional(record, key, default)
    if value < minimum:
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: {key!r} must be an integer >= {minimum}, "
                          f"got {value!r}")
    return value


def _seconds(record: dict) -> float:
    measured = record.get("seconds")
    if not isinstance(measured, (int, float)) or isinstance(measured, bool) or not 0 < measured < math.inf:
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: 'seconds' must be a positive finite number, "
                          f"got {measured!r}")
    return measured


def _check_keys(record: dict, kind: str) -> None:
    unknown = sorted(set(record) - set(KEYS[kind]))
    if unknown:
        raise ConfigError(f"measurement {kind!r}: unknown key(s) {', '.join(map(repr, unknown))}; a {kind} record "
                          f"holds {', '.join(KEYS[kind])}")
    if record.get("master", "fp32") != "fp32":  # both optimizer recipes (_optimizer) keep FP32 master weights
        raise ConfigError(f"measurement {kind!r}: 'master' must be fp32 (the only master precision modelled), "
                          f"got {record['master']!r}")


def _model(record: dict) -> Any:
    """A preset name or config path, or a config dict (as train_config.json may hold it)."""
    model = record.get("model")
    if isinstance(model, dict):
        return ModelConfig.from_dict(model)
    return _need(record, "model", str)


def predict(record: dict[str, Any]) -> float:
    """Predicted seconds for one measurement record."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"measurement kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_keys(record, kind)
    model, hardware = _model(record), _optional(record, "hardware", "h200", str)
    precision = _optional(record, "precision", "bf16", str)
    if kind == "train_step":
        batch, seq_len = _need(record, "batch"), _need(record, "seq_len")
        return training_time.training_time(model, hardware, ParallelLayout(), seq_len=seq_len, global_batch=batch,
                                           micro_batch=batch, schedule="1f1b", recompute="none",
                                           include_mtp=_optional(record, "include_mtp", True, bool),
                                           precision=precision, eager=_optional(record, "eager", True, bool),
                                           optimizer=_optimizer(record),
                                           kernels_per_step=record.get("kernels_per_step"),
                                           grad_clip=_optional(record, "grad_clip", True, bool),
                                           clip_in_update=_optional(record, "clip_in_update", True, bool)).step_s
    layout = serving.ServingLayout(micro_batches=_count(record, "micro_batches", 1, 1))
    if kind == "decode_step":
        return serving.decode(model, hardware, layout, batch=_need(record, "batch"), context=_need(record, "context"),
                              mtp_drafts=_count(record, "mtp_drafts", 0, 0), weight_dtype=precision,
                              kernels_per_step=record.get("kernels_per_step")).step_s
    return serving.prefill(model, hardware, layout, tokens=_need(record, "tokens"),
                           prompt_len=_need(record, "prompt_len"), weight_dtype=precision).step_s


def _optimizer(record: dict) -> str:
    """``moments`` fp32 (coscale train's AdamW over FP32 params) or bf16 (DeepSeek's recipe)."""
    moments = record.get("moments", "fp32")
    if moments not in ("fp32", "bf16"):
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: 'moments' must be fp32 or bf16, got {moments!r}")
    return "fp32" if moments == "fp32" else "deepseek"


def validation_table(records: list[dict[str, Any]]) -> Table:
    rows = []
    for r in records:
        measured = _seconds(r)
        predicted = predict(r)
        setup = ", ".join(f"{k} {r[k]}" for k in ("batch", "seq_len", "context", "tokens", "precision") if k in r)
        name = r["model"] if isinstance(r["model"], str) else r["model"].get("model_type", "config")
        rows.append([r["kind"], name, str(r.get("hardware", "h200")), setup, measured * 1e3, predicted * 1e3,
                     (predicted / measured - 1) * 100, r.get("source", "")])
    return Table(title="Predictions beside coscale's own measurements",
                 columns=["what", "model", "hardware", "setup", "measured [ms]", "predicted [ms]",
                          "predicted vs measured [%]", "source"],
                 rows=rows, formats=["", "", "", "", ".3f", ".3f", "+.1f", ""],
                 notes=["predicted by coscale analyze (training_time / serving) with the hardware file named; "
                        "the goal is within 15%."])


def update_doc(path: str | os.PathLike, table: Table) -> str:
    """Replace the text between the validation markers of ``path`` with ``table`` in Markdown."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ConfigError(f"{path} must hold one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return write_text_file(path, f"{head}{BEGIN}\n{table.to_markdown()}\n{END}{tail}")


def record_from_run(run_dir: str | os.PathLike, hardware: str) -> dict[str, Any]:
    """A ``train_step`` record from a ``coscale train`` run directory (train_config.json, metrics.jsonl).

    The record models one GPU: a run on the CPU, in FP32 or over several processes is refused (its step
    time says nothing about the prediction). The step mode follows the run's: a CUDA-graphed step is not eager.
    """
    run_dir = os.fspath(run_dir)
    config = _read_json(os.path.join(run_dir, "train_config.json"))
    model = config.get("model")
    if not isinstance(model, (str, dict)):
        raise ConfigError(f"{run_dir}: train_config.json names no model ('model')")
    batch, seq_len = config.get("batch_size"), config.get("seq_len")
    if not isinstance(batch, int) or not isinstance(seq_len, int):
        raise ConfigError(f"{run_dir}: train_config.json lacks batch_size / seq_len")
    rates, run = [], {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "run":
                    run = rec  # the last start (a resumed run records one per start)
                elif rec.get("type") == "train" and isinstance(rec.get("tokens_per_s"), (int, float)):
                    rates.append(rec["tokens_per_s"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{run_dir}: cannot read metrics.jsonl ({e})") from None
    if len(rates) < 2:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds fewer than 2 timed training steps")
    steady = statistics.median(rates[len(rates) // 2:])
    summary_path = os.path.join(run_dir, "summary.json")
    summary = _read_json(summary_path) if os.path.exists(summary_path) else {}
    precision = run.get("precision") or summary.get("precision") or config.get("precision") or "bf16"
    eager = _check_run(run_dir, run, summary, str(precision), config.get("cuda_graphs"))
    return {"kind": "train_step", "model": _run_model(model, run.get("model_name")), "hardware": hardware,
            "batch": batch, "seq_len": seq_len, "precision": str(precision), "eager": eager,
            "seconds": batch * seq_len / steady, "source": f"coscale train, {run_dir} (median of the last half)"}


def _check_run(run_dir: str, run: dict, summary: dict, precision: str, cuda_graphs: Any) -> bool:
    """Refuse a run the time models cannot stand for; return whether its step was eager (no CUDA graph)."""
    device = str(run.get("device") or summary.get("device") or "")
    if not device.startswith("cuda"):
        what = f"on {device!r}" if device else "on a device metrics.jsonl does not record"
        raise ConfigError(f"{run_dir}: the run ran {what}; the predictions are for a GPU, so only a CUDA run "
                          "can be compared with them")
    if precision not in ("bf16", "fp8"):
        raise ConfigError(f"{run_dir}: the run's precision is {precision!r}; the time models cover bf16 and fp8")
    if run.get("parallel") or summary.get("parallel"):
        raise ConfigError(f"{run_dir}: the run used several processes; a train_step record models one GPU")
    # cuda_graphs None: the run chose, and one CUDA process graphs its step (train/step_runner.py)
    return not (cuda_graphs is None or cuda_graphs is True)


def _run_model(model: str | dict, name: Any) -> str | dict:
    """The preset name the run was started with when its config is that preset's, else the config itself."""
    if isinstance(model, dict) and isinstance(name, str) and name in DEEPSEEK_PRESETS:
        if ModelConfig.from_dict(model) == get_preset(name):
            return name
    return model


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): it must hold JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
