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
import os
import statistics
from typing import Any

from coscale.analysis import serving, training_time
from coscale.analysis.memory import ParallelLayout
from coscale.analysis.output import write_text_file
from coscale.analysis.table import Table
from coscale.errors import ConfigError

KINDS = ("train_step", "decode_step", "prefill_step")
BEGIN, END = "<!-- validation:begin -->", "<!-- validation:end -->"


def load_measurements(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = os.fspath(path)
    records = _read_json(path).get("measurements")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path} must hold {{\"measurements\": [{{...}}, ...]}}")
    return records


def _need(record: dict, key: str, kind: type = int) -> Any:
    value = record.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _model(record: dict) -> Any:
    """A preset name or config path, or a config dict (as train_config.json may hold it)."""
    model = record.get("model")
    if isinstance(model, dict):
        from coscale.config import ModelConfig

        return ModelConfig.from_dict(model)
    return _need(record, "model", str)


def predict(record: dict[str, Any]) -> float:
    """Predicted seconds for one measurement record."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"measurement kind must be one of {', '.join(KINDS)}, got {kind!r}")
    model, hardware = _model(record), record.get("hardware", "h200")
    if kind == "train_step":
        batch, seq_len = _need(record, "batch"), _need(record, "seq_len")
        return training_time.training_time(model, hardware, ParallelLayout(), seq_len=seq_len, global_batch=batch,
                                           micro_batch=batch, schedule="1f1b", recompute="none",
                                           include_mtp=bool(record.get("include_mtp", True)),
                                           precision=record.get("precision", "bf16"),
                                           eager=bool(record.get("eager", True)),
                                           optimizer=_optimizer(record),
                                           kernels_per_step=record.get("kernels_per_step"),
                                           grad_clip=bool(record.get("grad_clip", True))).step_s
    layout = serving.ServingLayout(micro_batches=int(record.get("micro_batches", 1)))
    if kind == "decode_step":
        return serving.decode(model, hardware, layout, batch=_need(record, "batch"), context=_need(record, "context"),
                              mtp_drafts=int(record.get("mtp_drafts", 0)),
                              weight_dtype=record.get("precision", "bf16"),
                              kernels_per_step=record.get("kernels_per_step")).step_s
    return serving.prefill(model, hardware, layout, tokens=_need(record, "tokens"),
                           prompt_len=_need(record, "prompt_len"), weight_dtype=record.get("precision", "bf16")).step_s


def _optimizer(record: dict) -> str:
    """``moments`` fp32 (coscale train's AdamW over FP32 params) or bf16 (DeepSeek's recipe)."""
    moments = record.get("moments", "fp32")
    if moments not in ("fp32", "bf16"):
        raise ConfigError(f"measurement {record.get('kind', '?')!r}: 'moments' must be fp32 or bf16, got {moments!r}")
    return "fp32" if moments == "fp32" else "deepseek"


def validation_table(records: list[dict[str, Any]]) -> Table:
    rows = []
    for r in records:
        measured = r.get("seconds")
        if not isinstance(measured, (int, float)) or isinstance(measured, bool) or not measured > 0:
            raise ConfigError(f"measurement {r.get('kind', '?')!r}: 'seconds' must be a positive number")
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
    """A ``train_step`` record from a ``coscale train`` run directory (train_config.json, metrics.jsonl)."""
    run_dir = os.fspath(run_dir)
    config = _read_json(os.path.join(run_dir, "train_config.json"))
    model = config.get("model")
    if not isinstance(model, (str, dict)):
        raise ConfigError(f"{run_dir}: train_config.json names no model ('model')")
    batch, seq_len = config.get("batch_size"), config.get("seq_len")
    if not isinstance(batch, int) or not isinstance(seq_len, int):
        raise ConfigError(f"{run_dir}: train_config.json lacks batch_size / seq_len")
    rates = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "train" and isinstance(rec.get("tokens_per_s"), (int, float)):
                    rates.append(rec["tokens_per_s"])
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{run_dir}: cannot read metrics.jsonl ({e})") from None
    if len(rates) < 2:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds fewer than 2 timed training steps")
    steady = statistics.median(rates[len(rates) // 2:])
    summary_path = os.path.join(run_dir, "summary.json")
    summary = _read_json(summary_path) if os.path.exists(summary_path) else {}
    precision = summary.get("precision") or config.get("precision") or "bf16"  # None: the run's default
    return {"kind": "train_step", "model": model, "hardware": hardware, "batch": batch, "seq_len": seq_len,
            "precision": "fp8" if "fp8" in str(precision) else "bf16", "eager": True,
            "seconds": batch * seq_len / steady, "source": f"coscale train, {run_dir} (median of the last half)"}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
