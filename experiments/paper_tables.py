"""The paper's tables in the report (`experiments.reporting`): the numbers of Munkhdalai & Yu
(2017; METANET.md), and one section per table with the measurements (`report_sources`) of each
setting beside the paper's number."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

from experiments import report_markdown as md
from experiments.report_sources import Measurement, Source, hardware, steps_text

# The paper's numbers (percent).
VARIANT_NAMES = {"metanet-": "MetaNet-", "metanet": "MetaNet", "metanet+": "MetaNet+"}
PAPER_PREVIOUS = {
    "metanet-": {5: "98.4", 10: "98.32", 15: "96.68", 20: "96.13"},
    "metanet": {5: "98.95", 10: "98.67", 15: "97.11", 20: "97.0"},
    "metanet+": {5: "98.45", 10: "97.05", 15: "96.48", 20: "95.08"},
}
PAPER_STANDARD = {5: "98.45", 10: "97.32", 15: "96.4", 20: "95.92"}
PAPER_N_TO_K = {
    5: {5: "98.95", 10: "96.4", 15: "93.6", 20: "93.07"},
    10: {5: "99.25", 10: "96.87", 15: "96.95", 20: "96.21"},
    15: {5: "99.35", 10: "98.17", 15: "97.11", 20: "96.36"},
    20: {5: "99.55", 10: "98.87", 15: "97.41", 20: "97.0"},
}
PAPER_MNIST = {"metanet-": "71.6", "metanet": "74.8", "metanet+": "72.3"}
PAPER_MINI_IMAGENET = "49.21 +- 0.96"


def setting(source: Source) -> str:
    """A model's setting in words: variant, data, ways and shots, its networks."""
    f = source.flags
    dataset = f.get("dataset", "omniglot")
    where = {"omniglot": f"Omniglot {f.get('split', 'standard')} split",
             "mini_imagenet": "Mini-ImageNet", "synthetic": "synthetic data"}.get(
        dataset, str(dataset))  # fmt: skip
    variant = VARIANT_NAMES.get(f.get("variant", "metanet"), f.get("variant"))
    text = f"{variant}, {where}, {f.get('ways', '?')}-way {f.get('shots', '?')}-shot"
    arch = f.get("architecture", "omniglot_cnn")
    if arch == "mlp":
        text += ", MLP networks"
    elif arch == "rows_lstm":
        text += f", rows read by an LSTM of {f.get('hidden_units') or 64} units"
    elif f.get("conv_channels"):
        text += f", {f['conv_channels']} channels"
    return text


def paper_number(source: Source) -> str:
    """The paper's number for the setting a model trained and tests on ("" if none)."""
    f = source.flags
    ways, variant = f.get("ways"), f.get("variant", "metanet")
    if f.get("shots", 1) != 1:
        return ""
    if f.get("dataset", "omniglot") == "mini_imagenet":
        return PAPER_MINI_IMAGENET if ways == 5 and variant == "metanet" else ""
    if f.get("dataset", "omniglot") != "omniglot" or f.get("architecture") in ("mlp", "rows_lstm"):
        return ""  # the paper's numbers are its CNN's
    if f.get("split") == "previous":
        return PAPER_PREVIOUS.get(variant, {}).get(ways, "")
    if f.get("split", "standard") == "standard" and variant == "metanet":
        return PAPER_STANDARD.get(ways, "")
    return ""


CELL_HEADER = ("ours (95% CI)", "episodes", "source", "steps", "wall time", "hardware",
               "reproduce (test)")  # fmt: skip


def _cells(ms: list[Measurement]) -> list[list[str]]:
    """The "ours" columns: one list per measurement, or one empty list if none."""
    if not ms:
        return [[""] * len(CELL_HEADER)]
    rows = []
    for m in sorted(ms, key=lambda m: (m.source.path, m.origin)):
        rows.append([
            md.pct(m.accuracy, m.ci95), md.count(m.episodes), f"`{m.source.path}`",
            steps_text(m.source), md.duration(m.source.results.wall_time_s), hardware(m.source),
            md.code(m.command),
        ])  # fmt: skip
    return rows


def _mixed(source: Source) -> bool:
    """Whether the model trained on episodes of several ways (`--train_ways`)."""
    return bool(source.flag("train_ways"))


def _omniglot_cell(ms, *, split, variant, trained, tested, one_ways=False) -> list[Measurement]:
    """The measurements of one Omniglot setting. `trained`: the ways the model names (None:
    any; "mixed": the tested ways, or any for a model trained on episodes of several ways);
    `one_ways`: only models trained on episodes of one ways."""
    return [
        m for m in ms
        if m.dataset == "omniglot" and m.split == split and m.ways == tested and m.shots == 1
        and m.source.flag("dataset", "omniglot") == "omniglot"
        and m.source.flag("architecture", "omniglot_cnn") == "omniglot_cnn"
        and m.source.flag("variant", "metanet") == variant and m.source.flag("shots", 1) == 1
        and (trained in (None, m.source.flag("ways"))
             or (trained == "mixed" and (_mixed(m.source) or m.source.flag("ways") == tested)))
        and not (one_ways and _mixed(m.source))
    ]  # fmt: skip


def _omniglot_rows(ms: list[Measurement], settings, one_ways=False) -> list[list[str]]:
    """The rows of an Omniglot table: for each `(first columns, split, variant, trained ways,
    tested ways)` of `settings`, one row per measurement of that setting (or one empty)."""
    rows = []
    for first, split, variant, trained, tested in settings:
        found = _omniglot_cell(ms, split=split, variant=variant, trained=trained, tested=tested,
                               one_ways=one_ways)  # fmt: skip
        rows += [[*first, *cells] for cells in _cells(found)]
    return rows


# Each section's heading and the paragraph under it.
_SECTIONS = {
    "previous_split": (
        "Omniglot, previous split (Vinyals et al.), 1-shot",
        "Paper Table 1: N-way tests of 423 test characters after training on 1,200 "
        "(`previous_<N>way_<variant>.flags`: trained N-way). A model trained on episodes "
        "of several ways (`--train_ways`, e.g. `previous_cpu.flags`) stands in every "
        'column it was tested at; "trained" says how each model was trained.',
    ),
    "ordering": (
        "Table 1's ablation: does the paper's ordering hold?",
        "The paper finds MetaNet ahead of MetaNet- and MetaNet+ at every N, and MetaNet+ "
        "last at 10, 15 and 20 ways. Each row compares models of one recipe (the same flags "
        "but for the variant, the steps and the workdir) on the same fixed test episodes; a "
        'difference is "ahead" or "behind" when it exceeds its 95% interval, '
        "`1.96 * sqrt(se1^2 + se2^2)` (the two means treated as independent, which is "
        'conservative for paired episodes), and "within CI" otherwise. In our order, `~` joins '
        "neighbours whose difference is within that interval (`=`: equal to the decimals "
        "shown).",
    ),
    "standard_split": (
        "Omniglot, standard split (Lake et al.), MetaNet 1-shot",
        "Trained on the 30 background alphabets, tested on the 20 evaluation alphabets "
        "(`standard_<N>way.flags`; the demo is a smaller 5-way network).",
    ),
    "standard_k_way": (
        "Omniglot, standard split, models tested at other ways (MetaNet, 1-shot)",
        "A standard-split model tested on K-way episodes of the 20 evaluation alphabets "
        "other than the ways it names (`python -m experiments.evaluate --workdir=... "
        "--ways=K`); the paper's number is for a model trained K-way.",
    ),
    "n_to_k": (
        "Trained N-way, tested K-way (previous split, MetaNet, 1-shot)",
        "A model trained N-way with 20 output units (`--max_ways=20`) tested on K-way "
        "episodes: `python -m experiments.evaluate --workdir=... --ways=K` (models trained "
        "on episodes of several ways stand in Table 1).",
    ),
    "mnist": (
        "MNIST 10-way 1-shot, out of domain",
        "After Omniglot training, tested on MNIST's test digits (the paper used MLP "
        "networks: `mnist_out_of_domain_<variant>.flags`; any Omniglot model can be tested "
        "with `python -m experiments.evaluate --workdir=... --mnist`).",
    ),
    "mini_imagenet": (
        "Mini-ImageNet, 5-way 1-shot",
        "Ravi & Larochelle's split (`mini_imagenet_5way1shot.flags`; the data is not "
        "distributed here).",
    ),
}


def _section(name: str, header: Sequence[str], rows) -> list[str]:
    """A RESULTS.md section: its heading and paragraph (`_SECTIONS[name]`), then its table."""
    title, intro = _SECTIONS[name]
    return [f"## {title}", "", intro, "", *md.table(header, rows), ""]


def sections(ms: list[Measurement]) -> list[str]:
    """The sections of the paper's tables, each with our measurements beside the paper's."""
    tables = (_previous_split, _ordering, _standard_split, _standard_k_way, _n_to_k, _mnist,
              _mini_imagenet)  # fmt: skip
    return [line for section in tables for line in section(ms)]


def _previous_split(ms: list[Measurement]) -> list[str]:
    rows = []
    for v in ("metanet-", "metanet", "metanet+"):
        for n in (5, 10, 15, 20):
            found = _omniglot_cell(ms, split="previous", variant=v, trained="mixed", tested=n)
            for m in sorted(found, key=lambda m: m.source.path) or [None]:
                how = "" if m is None else _training(m.source)
                cells = _cells([] if m is None else [m])[0]
                rows.append([VARIANT_NAMES[v], str(n), PAPER_PREVIOUS[v][n], how, *cells])
    return _section("previous_split", ("model", "N-way", "paper", "trained", *CELL_HEADER), rows)


def _recipe(source: Source) -> str:
    """A model's flags but for those an ablation varies (variant, steps, workdir)."""
    keep = {k: v for k, v in source.flags.items() if k not in ("variant", "steps", "workdir")}
    return json.dumps(keep, sort_keys=True, default=str)


def _interval(ci_a: float, ci_b: float) -> float:
    """The 95% interval of a difference of two means, from theirs (treated as independent)."""
    return (ci_a**2 + ci_b**2) ** 0.5


def _difference(a: Measurement, b: Measurement | None) -> str:
    """`a - b` in points with its 95% interval and its verdict; "" without `b`."""
    if b is None or a.ci95 is None or b.ci95 is None:
        return ""
    diff, ci = a.accuracy - b.accuracy, _interval(a.ci95, b.ci95)
    verdict = "within CI" if abs(diff) <= ci else ("ahead" if diff > 0 else "behind")
    return f"{100 * diff:+.2f} +- {100 * ci:.2f} ({verdict})"


def _order(accuracy: dict[str, float], ci95: dict[str, float | None] | None = None) -> str:
    """Variants from best to worst, e.g. `MetaNet > MetaNet+ = MetaNet-` (equal to the two
    decimals shown). With `ci95`, neighbours whose difference is inside its 95% interval
    (`_interval`, as `_difference`) are joined by `~`: `MetaNet- ~ MetaNet`; a variant
    without an interval is ranked by its mean alone."""
    shown = {v: round(100 * a, 2) for v, a in accuracy.items()}
    ranked = sorted(shown, key=lambda v: -shown[v])
    text = VARIANT_NAMES[ranked[0]]
    for before, v in itertools.pairwise(ranked):
        if shown[v] == shown[before]:
            sign = " = "
        elif (
            ci95
            and ci95[before] is not None
            and ci95[v] is not None
            and accuracy[before] - accuracy[v] <= _interval(ci95[before], ci95[v])
        ):
            sign = " ~ "
        else:
            sign = " > "
        text += sign + VARIANT_NAMES[v]
    return text


def _model_steps(source: Source) -> str:
    """`path` (steps): the variants of a recipe may have trained for different steps."""
    steps = steps_text(source)
    return f"`{source.path}`" + (f" ({steps})" if steps else "")


def _ordering(ms: list[Measurement]) -> list[str]:
    """Table 1's variants of one recipe side by side at each N, against the paper's order."""
    groups: dict[str, dict[str, dict[int, Measurement]]] = {}
    for v in VARIANT_NAMES:
        for n in (5, 10, 15, 20):
            found = _omniglot_cell(ms, split="previous", variant=v, trained="mixed", tested=n)
            for m in sorted(found, key=lambda m: m.source.path, reverse=True):
                groups.setdefault(_recipe(m.source), {}).setdefault(v, {})[n] = m
    rows = []
    for variants in groups.values():
        if "metanet" not in variants or len(variants) < 2:
            continue
        for n, best in sorted(variants["metanet"].items()):
            minus = variants.get("metanet-", {}).get(n)
            plus = variants.get("metanet+", {}).get(n)
            if minus is None and plus is None:
                continue
            ours = {v: variants[v][n].accuracy for v in variants if n in variants[v]}
            cis = {v: variants[v][n].ci95 for v in ours}
            paper = {v: float(PAPER_PREVIOUS[v][n]) / 100 for v in ours}
            rows.append([
                str(n), *(md.pct(m.accuracy, m.ci95) if m else "" for m in (minus, best, plus)),
                _difference(best, minus), _difference(best, plus),
                _order(ours, cis), _order(paper),
                " / ".join(_model_steps(variants[v][n].source) for v in VARIANT_NAMES
                           if n in variants.get(v, {})),
            ])  # fmt: skip
    if not rows:
        rows = [[""] * 9]
    header = ("N-way", "MetaNet-", "MetaNet", "MetaNet+", "MetaNet - MetaNet-",
              "MetaNet - MetaNet+", "ours, best first", "paper, best first",
              "models (steps)")  # fmt: skip
    return _section("ordering", header, rows)


def _standard_split(ms: list[Measurement]) -> list[str]:
    rows = _omniglot_rows(ms, [
        ((str(n), PAPER_STANDARD[n]), "standard", "metanet", n, n) for n in (5, 10, 15, 20)
    ])  # fmt: skip
    return _section("standard_split", ("N-way", "paper", *CELL_HEADER), rows)


def _training(source: Source) -> str:
    """How a model was trained, for a table's "trained" column: ways, channels, augmented
    layers (the steps, wall time and hardware have columns of their own)."""
    f = source.flags
    mixed = f.get("train_ways") or ()
    parts = [f"{'/'.join(map(str, mixed))}-way episodes" if mixed else f"{f.get('ways')}-way"]
    if f.get("architecture", "omniglot_cnn") == "mlp":
        parts.append("MLP networks")
    elif f.get("conv_channels"):
        parts.append(f"{f['conv_channels']} channels")
    model = source.results.model_config or {}
    chosen = [model.get(k) for k in ("augment_base", "augment_representation")]
    if any(c is not None for c in chosen):
        named = ["all" if c is None else ",".join(c) for c in chosen]
        parts.append(f"augmented b: {named[0]}; u: {named[1]}")
    else:
        parts.append("all layers augmented")
    return ", ".join(parts)


def _standard_k_way(ms: list[Measurement]) -> list[str]:
    rows = []
    for k in (5, 10, 15, 20):
        found = [
            m for m in _omniglot_cell(ms, split="standard", variant="metanet", trained=None,
                                      tested=k)
            if m.source.flag("ways") != k
        ]  # fmt: skip
        for m in sorted(found, key=lambda m: m.source.path):
            rows.append([str(k), PAPER_STANDARD[k], _training(m.source), *_cells([m])[0]])
    if not rows:
        rows = [["", "", "", *_cells([])[0]]]
    return _section("standard_k_way", ("tested", "paper", "trained", *CELL_HEADER), rows)


def _n_to_k(ms: list[Measurement]) -> list[str]:
    rows = _omniglot_rows(ms, [
        ((str(n), str(k), PAPER_N_TO_K[n][k]), "previous", "metanet", n, k)
        for n in (5, 10, 15, 20) for k in (5, 10, 15, 20)
    ], one_ways=True)  # fmt: skip
    return _section("n_to_k", ("trained", "tested", "paper", *CELL_HEADER), rows)


def _mnist(ms: list[Measurement]) -> list[str]:
    rows = []
    for variant in ("metanet-", "metanet", "metanet+"):
        found = [
            m for m in ms
            if m.dataset == "mnist" and m.ways == 10 and m.shots == 1
            and m.source.flag("dataset", "omniglot") == "omniglot"
            and m.source.flag("variant", "metanet") == variant
        ]  # fmt: skip
        for cells in _cells(found):
            rows.append([VARIANT_NAMES[variant], PAPER_MNIST[variant], *cells])
    return _section("mnist", ("model", "paper", *CELL_HEADER), rows)


def _mini_imagenet(ms: list[Measurement]) -> list[str]:
    found = [
        m for m in ms
        if m.dataset == "mini_imagenet" and m.ways == 5 and m.shots == 1
        and m.source.flag("variant", "metanet") == "metanet"
    ]  # fmt: skip
    rows = [["MetaNet", PAPER_MINI_IMAGENET, *cells] for cells in _cells(found)]
    return _section("mini_imagenet", ("model", "paper", *CELL_HEADER), rows)
