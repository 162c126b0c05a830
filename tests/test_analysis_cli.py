"""`coscale analyze ...` and `coscale report` through coscale.cli.main, and the no-torch import rule."""

import json
import subprocess
import sys

import pytest

from coscale.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("sub", [["kv-cache"], ["flops"], ["memory", "--dp", "128", "--pp", "16", "--ep", "64"],
                                 ["memory", "--inference", "--batch", "8"], ["inference-limit"],
                                 ["network", "--target", "20000"]])
def test_json_and_markdown(capsys, sub):
    rc, out, _ = run(capsys, "analyze", *sub, "--json")
    assert rc == 0
    tables = json.loads(out)["tables"]
    assert tables and all(t["rows"] for t in tables)
    rc, out, _ = run(capsys, "analyze", *sub, "--markdown")
    assert rc == 0 and out.startswith("### ") and "|---|" in out
    rc, out, _ = run(capsys, "analyze", *sub)
    assert rc == 0 and "====" in out


def test_kv_cache_json_numbers(capsys):
    rc, out, _ = run(capsys, "analyze", "kv-cache", "--model", "deepseek-v3", "--model", "qwen2.5-72b", "--json")
    rows = json.loads(out)["tables"][0]["rows"]
    assert [r["KB per token"] for r in rows] == [70.272, 327.68]


def test_inference_limit_options(capsys, tmp_path):
    rc, out, _ = run(capsys, "analyze", "inference-limit", "--paper-rounding", "--hardware", "h800", "--json")
    row = json.loads(out)["tables"][0]["rows"][0]
    assert round(row["TPOT [ms]"], 2) == 14.76
    plot = tmp_path / "tpot.png"
    rc, out, _ = run(capsys, "analyze", "inference-limit", "--sweep", "25,50,100", "--plot", str(plot))
    assert rc == 0 and plot.stat().st_size > 0 and "100 GB/s" in out


def test_network_cost_override(capsys):
    rc, out, _ = run(capsys, "analyze", "network", "--cost", "switch_port=0", "--json")
    ft2 = json.loads(out)["tables"][0]["rows"][0]
    assert ft2["topology"] == "FT2" and ft2["paper [M$]"] is None


@pytest.mark.parametrize("argv", [
    ["analyze", "kv-cache", "--model", "no-such-model"],
    ["analyze", "inference-limit", "--hardware", "no-such-gpu"],
    ["analyze", "inference-limit", "--bandwidth", "0"],
    ["analyze", "inference-limit", "--bandwidth", "-50"],
    ["analyze", "inference-limit", "--sweep", "10,abc"],
    ["analyze", "memory", "--dp", "4", "--ep", "3"],
    ["analyze", "memory", "--pp", "1000"],
    ["analyze", "network", "--radix", "7"],
    ["analyze", "network", "--cost", "gold=3"],
    ["analyze", "network", "--cost", "switch_port"],
])
def test_bad_input_one_line_exit_2(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and "error:" in err


def test_malformed_hardware_yaml(capsys, tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("hbm_gb: [80\n")
    rc, _, err = run(capsys, "analyze", "inference-limit", "--hardware", str(path))
    assert rc == 2 and err.count("\n") == 1 and "YAML" in err


def test_report_markdown_and_html(capsys, tmp_path):
    rc, out, _ = run(capsys, "report", "--output", str(tmp_path / "md"))
    assert rc == 0
    text = (tmp_path / "md" / "report.md").read_text()
    for needle in ("70.272", "| 250 | 250 |", "14.76", "| DF | 261,632 | 16,352 | 384,272 | 1522 |"):
        assert needle in text
    for png in ("kv_cache.png", "tpot_vs_bandwidth.png", "network_cost.png"):
        assert (tmp_path / "md" / png).stat().st_size > 0 and png in text
    rc, _, _ = run(capsys, "report", "--output", str(tmp_path / "html"), "--html", "--no-charts",
                   "--model", "llama3.1-70b", "--hardware", "b200")
    assert rc == 0 and "<table>" in (tmp_path / "html" / "report.html").read_text()


def test_analysis_imports_no_torch():
    code = ("import sys, coscale.analysis, coscale.analysis.commands, coscale.hardware; "
            "coscale.analysis.report_tables(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_report_tables_for_every_preset_pair():
    from coscale.analysis import report_tables
    from coscale.analysis.models import model_names
    from coscale.hardware import hardware_names

    for model in model_names():
        for hardware in hardware_names():
            assert report_tables(model, hardware)
