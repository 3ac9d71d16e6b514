"""Figures of what a model's cache costs (optional: needs the ``plot`` extra, i.e. matplotlib).

* :func:`kv_vs_context`: total KV-cache bytes against context length, several models, log-log.
* :func:`per_layer_cache`: one bar per layer of one model's cache bytes at one context length.

Both read :mod:`ctxlab.accounting`, so a plot shows exactly what ``kv_cache_bytes`` reports.
matplotlib is imported only when a function is called. Figures are built with
:class:`matplotlib.figure.Figure` (not pyplot) and ``savefig`` renders them with the Agg canvas,
so no GUI is needed and the caller's backend and pyplot figure registry are left alone (nothing
to close; no ``matplotlib.use`` that would switch e.g. a notebook's backend).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..accounting import kv_cache_bytes, kv_cache_bytes_per_layer
from ..config import LayerSpec
from ..errors import CtxlabError
from ..io.config_file import load_config
from ..registry import ATTENTION_KINDS

if TYPE_CHECKING:  # matplotlib stays optional at run time
    from matplotlib.figure import Figure

GIB = 1 << 30  # y unit of kv_vs_context
MIB = 1 << 20  # y unit of per_layer_cache
DEFAULT_CONTEXTS = [1 << k for k in range(10, 21)]  # 1K ... 1M tokens, every power of two
DPI = 120


def _matplotlib():
    """``(Figure class, transforms module)``; a readable error when matplotlib is missing."""
    try:
        from matplotlib import transforms
        from matplotlib.figure import Figure
    except ImportError as e:
        raise CtxlabError(
            f'plotting needs matplotlib, which is not installed: pip install "ctxlab[plot]" ({e})'
        ) from None
    return Figure, transforms


def output_path(path) -> Path:
    """Where a plot goes: ``path`` as given, ``.png`` added when it has no suffix (as matplotlib would);
    a directory is refused rather than written next to."""
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", "\\")):
        raise CtxlabError(f"--plot {path}: is a directory; give a file name such as {p / 'plot.png'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() else "does not exist"
        raise CtxlabError(f"--plot {path}: cannot write there: directory {parent} {reason}")
    if not os.access(parent, os.W_OK):
        raise CtxlabError(f"--plot {path}: cannot write there: directory {parent} is not writable")
    if not p.suffix:
        return p.with_suffix(".png")
    import matplotlib.figure

    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if p.suffix[1:].lower() not in formats:
        raise CtxlabError(
            f"--plot {path}: matplotlib cannot write {p.suffix!r} files; use one of: "
            f"{', '.join('.' + f for f in sorted(formats))} (or no suffix for .png)"
        )
    return p


def save(fig, path) -> None:
    """``fig`` as a PNG at :func:`output_path` ``(path)``; an OS failure names the file and the reason."""
    target = output_path(path)
    try:
        fig.savefig(target, dpi=DPI, bbox_inches="tight")
    except OSError as e:
        raise CtxlabError(f"--plot {path}: cannot write {target} ({e.strerror or e})") from None


def _colours(n: int) -> list:
    """``n`` distinct colours: the 10 dark tab20 shades first, then the 10 light ones."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [tab20[order[i % 20]] for i in range(n)]


def _token_label(n: int) -> str:
    """1024 -> "1K", 1 << 20 -> "1M"."""
    for size, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def kv_vs_context(models: list[str], path, dtype: str = "bfloat16", contexts: list[int] | None = None) -> Figure:
    """KV-cache GiB (batch 1) against context length, one solid line per model ("realized":
    sliding windows capped, shared K/V free) plus a dashed "<model> (naive)" line in the same
    colour wherever the naive convention (every layer, every token) differs. Saves a PNG at
    ``path`` and returns the :class:`~matplotlib.figure.Figure`."""
    Figure, _ = _matplotlib()
    contexts = list(contexts or DEFAULT_CONTEXTS)
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    for model, colour in zip(models, _colours(len(models))):
        cfg = load_config(model)
        realized = [kv_cache_bytes(cfg, n, dtype) / GIB for n in contexts]  # [len(contexts)] GiB
        naive = [kv_cache_bytes(cfg, n, dtype, convention="naive") / GIB for n in contexts]
        ax.plot(contexts, realized, "-", color=colour, marker=".", label=model)
        if naive != realized:
            ax.plot(contexts, naive, "--", color=colour, alpha=0.7, label=f"{model} (naive)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [_token_label(n) for n in contexts])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache (GiB, {dtype}, batch 1)")
    ax.set_title("KV-cache size vs context length (solid: realized, dashed: naive)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    save(fig, path)
    return fig


def layer_label(spec: LayerSpec) -> str:
    """The kind of cache a layer keeps, e.g. "gqa sliding (w=512)", "compressed CSA (ratio 4)"."""
    label = ATTENTION_KINDS[spec.attention].label(spec)
    return label + ", shared K/V (alias, no storage)" if spec.kv_source is not None else label


def per_layer_cache(model: str, path, context: int = 131072, dtype: str = "bfloat16") -> Figure:
    """One bar per layer of its cache MiB at ``context`` tokens (batch 1, realized), coloured by
    :func:`layer_label`. The y axis is logarithmic when non-zero bars span more than 100x;
    zero-byte layers (K/V shared with an earlier layer) are marked "0" on the axis. Saves a PNG
    at ``path`` and returns the :class:`~matplotlib.figure.Figure`."""
    Figure, transforms = _matplotlib()
    cfg = load_config(model)
    sizes = [b / MIB for b in kv_cache_bytes_per_layer(cfg, context, dtype)]  # [num_layers] MiB
    labels = [layer_label(s) for s in cfg.layers]
    kinds = list(dict.fromkeys(labels))  # first-seen order
    colour = dict(zip(kinds, _colours(len(kinds))))
    fig = Figure(figsize=(max(6.0, 0.22 * len(sizes) + 3), 4.5))
    ax = fig.add_subplot()
    for kind in kinds:  # one bar container (and legend entry) per kind
        idx = [i for i, lab in enumerate(labels) if lab == kind]
        ax.bar(idx, [sizes[i] for i in idx], color=colour[kind], label=kind)
    nonzero = [s for s in sizes if s > 0]
    if nonzero and max(nonzero) / min(nonzero) > 100:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(nonzero) / 4, top=max(nonzero) * 2)  # smallest bars stay visible
    on_axis = transforms.blended_transform_factory(ax.transData, ax.transAxes)  # x: layer, y: 0..1
    for i, s in enumerate(sizes):
        if s == 0:
            ax.text(i, 0.01, "0", transform=on_axis, ha="center", va="bottom", fontsize=7, color=colour[labels[i]])
    total = sum(sizes) * MIB / GIB
    ax.set_xlabel("layer")
    ax.set_ylabel(f"cache (MiB, {dtype}, batch 1)")
    ax.set_title(f"{cfg.name or model}: per-layer cache at {context:,} tokens ({dtype}); total {total:.3g} GiB")
    ax.set_xlim(-0.6, len(sizes) - 0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: bars stay clear
    save(fig, path)
    return fig
