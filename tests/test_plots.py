"""ctxlab.reporting.plots: the figures show exactly what the accounting reports (needs the ``plot`` extra)."""

from __future__ import annotations

import builtins

import pytest

import ctxlab
from ctxlab.reporting import plots  # plots imports matplotlib lazily, so this works without it

pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_kv_vs_context_all_presets(tmp_path):
    models = ctxlab.preset_names(include_tiny=False)
    path = tmp_path / "kv.png"
    fig = plots.kv_vs_context(models, path)
    assert_png(path)
    contexts = [1 << k for k in range(10, 21)]
    naive_differs = [
        m
        for m in models
        if any(
            ctxlab.kv_cache_bytes(cfg, n, "bfloat16", convention="naive") != ctxlab.kv_cache_bytes(cfg, n, "bfloat16")
            for cfg in [ctxlab.load_config(m)]
            for n in contexts
        )
    ]
    assert naive_differs  # sliding-window and KV-sharing presets exist
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(models) + len(naive_differs)
    solid = {ln.get_label(): ln for ln in lines if ln.get_linestyle() == "-"}
    dashed = {ln.get_label(): ln for ln in lines if ln.get_linestyle() == "--"}
    assert sorted(solid) == sorted(models)
    assert sorted(dashed) == sorted(f"{m} (naive)" for m in naive_differs)
    for m in naive_differs:  # same colour as the model's realized line
        assert dashed[f"{m} (naive)"].get_color() == solid[m].get_color()
    llama = solid["llama-3-8b"]
    assert list(llama.get_xdata()) == contexts
    at_128k = llama.get_ydata()[contexts.index(131072)]
    expected = ctxlab.kv_cache_bytes(ctxlab.load_config("llama-3-8b"), 131072, "bfloat16")
    assert at_128k * plots.GIB == expected == 16 * (1 << 30)  # 32 layers x 2 x 8 heads x 128 x 2 B x 128K


def bars_and_legend(fig):
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda p: p.get_x())  # one Rectangle per layer, in layer order
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return bars, legend


def test_per_layer_cache_gemma4_e2b(tmp_path):
    path = tmp_path / "e2b.png"
    fig = plots.per_layer_cache("gemma4-e2b", path)
    assert_png(path)
    bars, legend = bars_and_legend(fig)
    assert len(bars) == 35
    expected = ctxlab.kv_cache_bytes_per_layer(ctxlab.load_config("gemma4-e2b"), 131072, "bfloat16")
    assert [b.get_height() * plots.MIB for b in bars] == expected
    assert 0 in expected  # shared-K/V layers hold nothing ...
    assert any("alias" in lab for lab in legend)  # ... and still get a legend entry
    assert "gqa sliding (w=512)" in legend and "gqa global" in legend
    assert len(legend) == len(set(legend)) == 4
    assert "131,072 tokens" in fig.axes[0].get_title() and "bfloat16" in fig.axes[0].get_title()


def test_per_layer_cache_deepseek_v4_flash(tmp_path):
    path = tmp_path / "v4.png"
    fig = plots.per_layer_cache("deepseek-v4-flash", path, context=65536, dtype="float32")
    assert_png(path)
    bars, legend = bars_and_legend(fig)
    assert len(bars) == 43
    expected = ctxlab.kv_cache_bytes_per_layer(ctxlab.load_config("deepseek-v4-flash"), 65536, "float32")
    assert [b.get_height() * plots.MIB for b in bars] == expected
    assert any("window only" in lab for lab in legend)
    assert "compressed CSA (ratio 4)" in legend and "compressed HCA (ratio 128)" in legend
    assert fig.axes[0].get_yscale() == "log"  # window-only vs CSA layers span > 100x


def test_missing_matplotlib_is_a_ctxlab_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for call in (
        lambda: plots.kv_vs_context(["llama-3-8b"], tmp_path / "a.png"),
        lambda: plots.per_layer_cache("llama-3-8b", tmp_path / "b.png"),
    ):
        with pytest.raises(ctxlab.CtxlabError, match="pip install"):
            call()
    assert not list(tmp_path.iterdir())


def test_cli_plot_options_write_pngs(tmp_path, capsys):
    from ctxlab.cli import main

    assert main(["report", "--models", "llama-3-8b", "gemma4-e2b", "--plot", str(tmp_path / "kv.png")]) == 0
    assert main(["inspect", "laguna-xs2", "--plot", str(tmp_path / "layers.png")]) == 0
    assert_png(tmp_path / "kv.png")
    assert_png(tmp_path / "layers.png")


def test_a_suffix_matplotlib_cannot_write_is_one_line_naming_the_formats(tmp_path, capsys):
    from ctxlab.cli import main

    assert main(["report", "--models", "tiny-llama", "--plot", str(tmp_path / "kv.txt")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib cannot write '.txt' files" in err and ".png" in err and "Traceback" not in err
