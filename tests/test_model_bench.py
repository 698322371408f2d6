"""bench/model_bench.py: merging result rows, the Markdown table and its geometric means, and one tiny
model measured end to end on CPU (a stand-in for the torchvision models, which take minutes in the interpreter)."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import model_bench as mb  # noqa: E402


def _row(model, config, **times):
    return dict(mb.parse_config(config), model=model, **times)


def test_parse_config():
    assert mb.parse_config("bf16cl-b32") == {"dtype": "bf16", "batch": 32, "channels_last": True}
    assert mb.parse_config("fp32-b1") == {"dtype": "fp32", "batch": 1, "channels_last": False}
    assert mb.config_name(_row("resnet18", "bf16cl-b32")) == "bf16cl-b32"
    with pytest.raises(ValueError, match="config"):
        mb.parse_config("fp64-b32")


def test_merge_replaces_rows_of_the_same_model_and_config():
    old = [_row("resnet50", "fp32-b32", tritonconv_ms=9.0), _row("resnet18", "fp32-b32", tritonconv_ms=2.0),
           _row("resnet18", "fp32-b1", tritonconv_ms=1.0)]
    new = [_row("resnet18", "fp32-b32", tritonconv_ms=3.0), _row("resnet18", "bf16cl-b32", tritonconv_ms=4.0)]
    merged = mb.merge_rows(old, new)
    assert [(r["model"], mb.config_name(r), r["tritonconv_ms"]) for r in merged] == [
        ("resnet18", "fp32-b32", 3.0), ("resnet18", "fp32-b1", 1.0), ("resnet18", "bf16cl-b32", 4.0),
        ("resnet50", "fp32-b32", 9.0)]


def test_geomeans_per_config_and_mode():
    rows = [_row("resnet18", "fp32-b32", eager_ms=4.0, compile_ms=2.0, tritonconv_ms=1.0,
                 compile_max_autotune_ms=3.0, tritonconv_max_autotune_ms=1.0),
            _row("resnet50", "fp32-b32", eager_ms=1.0, compile_ms=2.0, tritonconv_ms=4.0),
            _row("resnet18", "fp32-b1", eager_ms=1.0, compile_ms=1.0, tritonconv_ms=None, error="tritonconv: boom")]
    means = mb.geomeans(rows)
    assert means["fp32-b32"]["compile/tritonconv"] == pytest.approx(math.sqrt(2.0 * 0.5))
    assert means["fp32-b32"]["eager/tritonconv"] == pytest.approx(math.sqrt(4.0 * 0.25))
    assert means["fp32-b32"]["compile_max_autotune/tritonconv_max_autotune"] == pytest.approx(3.0)
    assert means["fp32-b1"]["compile/tritonconv"] is None  # no row of that config has both times


def test_markdown_table(tmp_path):
    rows = [_row("resnet18", "fp32-b32", eager_ms=3.0, compile_ms=2.0, tritonconv_ms=1.0, eager_rel_err=1e-6,
                 tritonconv_rel_err=2e-6, convs_replaced=20, convs_kept=0, options={"input_precision": "ieee"},
                 compile_reduce_overhead_ms=1.5, tritonconv_reduce_overhead_ms=0.5),
            _row("vgg16_bn", "fp32-b1", eager_ms=1.0, compile_ms=1.0, error="tritonconv: RuntimeError: boom")]
    data = {"gpu": "NVIDIA H100", "torch": "2.x", "triton": "3.x", "date": "2026-01-01", "timing": "t", "rows": rows}
    md = mb.markdown(data)
    lines = md.splitlines()
    headers = [c.strip() for c in next(ln for ln in lines if ln.startswith("| model")).strip("|").split("|")]
    cells = dict(zip(headers, (c.strip() for c in next(ln for ln in lines if ln.startswith("| resnet18"))
                                .strip("|").split("|"))))
    assert (cells["compile/ours"], cells["eager/ours"], cells["x (reduce-overhead)"]) == ("2.00x", "3.00x", "3.00x")
    assert (cells["compile reduce-overhead ms"], cells["tritonconv reduce-overhead ms"]) == ("1.500", "0.500")
    assert (cells["eager err"], cells["ours err"], cells["convs ours/ATen"]) == ("1.0e-06", "2.0e-06", "20/0")
    assert "RuntimeError: boom" in next(ln for ln in lines if ln.startswith("| vgg16_bn"))
    assert '`{"input_precision": "ieee"}`' in md
    assert "- fp32-b32: compile/tritonconv 2.00x, compile_reduce_overhead/tritonconv_reduce_overhead 3.00x" in md


def test_save_merges_into_the_json_and_rewrites_the_table(tmp_path, capsys):
    path = tmp_path / "results.json"
    meta = {"gpu": "cpu", "torch": "t", "triton": "t", "date": "2026-01-01", "timing": "t", "options": {}}
    mb.save(path, meta, [_row("resnet18", "fp32-b32", compile_ms=2.0, tritonconv_ms=1.0)], chart=False)
    written = mb.save(path, meta, [_row("resnet50", "fp32-b32", compile_ms=2.0, tritonconv_ms=float("inf"))],
                      chart=True)
    data = json.loads(path.read_text())
    assert [r["model"] for r in data["rows"]] == ["resnet18", "resnet50"]
    assert data["rows"][1]["tritonconv_ms"] is None  # non-finite floats are not JSON
    assert "| resnet50 |" in path.with_suffix(".md").read_text()
    try:
        import matplotlib  # noqa: F401
        assert path.with_suffix(".png") in written and path.with_suffix(".png").exists()
    except ImportError:
        assert "no bar chart" in capsys.readouterr().out and len(written) == 2


@pytest.mark.interpreter
@pytest.mark.parametrize("modes", ["", "reduce-overhead"])
def test_a_tiny_model_end_to_end(modes, tmp_path, monkeypatch):
    """The whole measuring loop on one small convolutional model; torch.compile's Inductor is swapped for the
    "eager" backend (Inductor's C++ compile of a CPU model takes a minute)."""
    def build_model(name, config, device):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
        x = torch.randn(config["batch"], 3, config["size"], config["size"])
        return model, copy.deepcopy(model).double(), x, x.double()

    real_compile = mb.compile_variant

    def compile_variant(compiler, mode, model, options, reports):
        if compiler == "compile":
            return torch.compile(model, backend="eager")
        return real_compile(compiler, mode, model, options, reports)

    monkeypatch.setattr(mb, "build_model", build_model)
    monkeypatch.setattr(mb, "compile_variant", compile_variant)
    monkeypatch.setattr(mb.bu, "install_sigterm_handler", lambda: None)
    out = tmp_path / "models.json"
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):  # main() raises it
        assert mb.main(["--device", "cpu", "--models", "resnet18", "--configs", "fp32-b1", "--size", "8",
                        "--options", '{"input_precision": "ieee"}', "--modes", modes, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert set(mb.MEASURED) <= set(row)
    assert (row["model"], row["dtype"], row["batch"], row["channels_last"]) == ("resnet18", "fp32", 1, False)
    assert (row["convs_replaced"], row["convs_kept"]) == (2, 0)
    for key in ("eager_ms", "compile_ms", "tritonconv_ms", "compile_first_s", "tritonconv_first_s"):
        assert row[key] > 0, key
    assert row["eager_rel_err"] < 1e-5 and row["tritonconv_rel_err"] < 1e-5
    assert row["options"] == {"input_precision": "ieee"}
    if modes:
        assert row["compile_reduce_overhead_ms"] > 0
        # a backend that refuses the mode is reported in the row, and the run goes on
        assert row.get("tritonconv_reduce_overhead_ms", 0) > 0 or "tritonconv_reduce_overhead" in row["error"]
    else:
        assert "error" not in row
    assert "| resnet18 | fp32-b1 |" in out.with_suffix(".md").read_text()

    # a rerun that skips what the JSON has, and one out of time, measure nothing and keep the row; a
    # directory as --out holds the day's file
    out.rename(tmp_path / f"{mb.bu.result_stem(mb.bu.versions('cpu'), True, '-models')}.json")
    for flags in (["--skip-done"], ["--stop-after", "0"]):
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
            assert mb.main(["--device", "cpu", "--models", "resnet18", "--configs", "fp32-b1", "--size", "8",
                            "--out", str(tmp_path)] + flags) == 0
        (day_file,) = tmp_path.glob("*-models.json")
        assert json.loads(day_file.read_text())["rows"] == [row]


def test_no_cudagraphs_variant_is_ours_only_against_compile_default():
    rows = [_row("resnet18", "fp32-b32", eager_ms=3.0, compile_ms=2.0, tritonconv_ms=1.0,
                 tritonconv_no_cudagraphs_ms=4.0)]
    assert mb.mode_pairs(rows) == [("compile", "tritonconv"), ("compile", "tritonconv_no_cudagraphs")]
    assert mb.geomeans(rows)["fp32-b32"]["compile/tritonconv_no_cudagraphs"] == pytest.approx(0.5)
    data = {"gpu": "NVIDIA H100", "torch": "2.x", "triton": "3.x", "date": "2026-01-01", "timing": "t", "rows": rows}
    lines = mb.markdown(data).splitlines()
    headers = [c.strip() for c in next(ln for ln in lines if ln.startswith("| model")).strip("|").split("|")]
    cells = dict(zip(headers, (c.strip() for c in next(ln for ln in lines if ln.startswith("| resnet18"))
                                .strip("|").split("|"))))
    assert "compile no-cudagraphs ms" not in headers
    assert (cells["tritonconv no-cudagraphs ms"], cells["x (no-cudagraphs)"]) == ("4.000", "0.50x")


def test_cold_with_no_rounds_measures_first_calls_only(tmp_path, monkeypatch):
    """--cold --rounds 0: the row holds the fresh processes' first calls, and nothing is compiled or timed in
    the measuring process itself."""
    def measure_row(*args):
        raise AssertionError("timed in the measuring process")
    monkeypatch.setattr(mb, "measure_row", measure_row)
    monkeypatch.setattr(mb, "cold_first_calls", lambda name, spec, args: {"compile_first_s": 2.0,
                                                                          "tritonconv_first_s": 3.0})
    monkeypatch.setattr(mb.bu, "install_sigterm_handler", lambda: None)
    monkeypatch.setenv("TRITONCONV_COMPILE_PROCESSES", "0")  # recorded with the row: it changes first calls
    out = tmp_path / "cold.json"
    assert mb.main(["--device", "cpu", "--models", "resnet18", "--configs", "fp32-b1", "--cold", "--rounds", "0",
                    "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["compile_first_s"], row["tritonconv_first_s"], row["tritonconv_ms"]) == (2.0, 3.0, None)
    assert row["environment"]["TRITONCONV_COMPILE_PROCESSES"] == "0"
    assert '"TRITONCONV_COMPILE_PROCESSES": "0"' in out.with_suffix(".md").read_text()


def test_cold_logs_keep_each_fresh_process_stderr(tmp_path, monkeypatch):
    """--cold-logs DIR: each compiler's fresh process leaves its stderr (e.g. TORCH_LOGS output) in DIR."""
    class Done:
        returncode, stdout = 0, '{"first_s": 1.5}\n'

        def __init__(self, cmd):
            self.stderr = f"log of {cmd[cmd.index('--first-call-only') + 1]}"
    monkeypatch.setattr(mb.subprocess, "run", lambda cmd, **kwargs: Done(cmd))
    args = mb.parse_args(["--device", "cpu", "--cold", "--cold-logs", str(tmp_path / "logs")])
    assert mb.cold_first_calls("resnet18", "fp32-b1", args) == {f"{c}_first_s": 1.5 for c in mb.COMPILERS}
    for compiler in mb.COMPILERS:
        assert (tmp_path / "logs" / f"resnet18-fp32-b1-{compiler}.log").read_text() == f"log of {compiler}"
