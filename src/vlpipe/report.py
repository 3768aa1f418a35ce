"""Stage `report`: one Markdown page that shows the state of a run at a glance.

``reports/report.md`` holds

- one table of every metric of every stage: each ``metrics/**/*.json`` flattened (nested
  keys joined with ``/``); a fine-tuning stage's val metrics sit beside the local
  leaderboard's test metrics of the same key (``submit@<key>``, ``metrics/leaderboard``);
- the reference papers' headline numbers (formats.md §8, :data:`PAPER_RESULTS`) beside ours,
  labelled as real-data results that the synthetic world cannot be compared with;
- one training-curve plot per training stage (its DVCLive ``train/*.tsv`` series, one
  figure, ``reports/curves/<dvclive dir>.png``);
- the world and painting contact sheets (``reports/world_preview.png``, ``reports/paint.png``).

A stage that has not run is shown as "not run". A malformed metrics or curve file is an
:class:`~vlpipe.errors.InputError` naming the file; everything is read before anything is
written, and both outputs are written atomically, so a failed report leaves nothing behind.
Identical inputs give a byte-identical report (no timestamps, sorted keys, fixed order).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpipe.config import FeaturesParams, PretrainParams, ReportParams, load_params
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, atomic_file, read_json

REPORT_MD = Path("reports/report.md")
CURVES_DIR = Path("reports/curves")
METRICS_DIR = Path("metrics")
DVCLIVE_DIR = Path("dvclive")
TRAIN_CURVES = Path("plots/metrics/train")  # inside dvclive/<stage dir>
NOT_RUN = "not run"
REAL_DATA = "real data (paper), not comparable with the synthetic world"

# features@<kind> and pretrain@<model> stages: fixed by the params models (finetune/submit keys
# come from params.yaml).
FEATURE_KINDS = tuple(FeaturesParams.model_fields)
PRETRAIN_MODELS = tuple(PretrainParams.model_fields)
# (title, file under reports/, stage that writes it)
CONTACT_SHEETS = (
    ("The shapes world (val scenes and their captions)", "world_preview.png", "world"),
    ("Painting: real / reconstructed from the true code grid / painted from the caption", "paint.png", "paint"),
)


# --------------------------------------------------------------------------- reference numbers


@dataclass(frozen=True)
class PaperResult:
    """One headline number of a reference paper (formats.md §8: real data, GPUs).

    ``model`` and ``task`` pick our ``finetune.<key>`` entries to put beside it; ``val_key``
    / ``test_key`` name our flattened metric in ``metrics/finetune/<key>.json`` /
    ``metrics/leaderboard/<key>.json`` (None: we have no counterpart). Paper numbers are in
    percent (CIDEr x100, as COCO reports it); ours are multiplied by 100 to match.
    """

    paper: str
    model: str
    task: str
    metric: str
    split: str
    value: float
    val_key: str | None
    test_key: str | None


LXMERT = "LXMERT (Tan & Bansal, EMNLP 2019)"
VLP = "VLP (Zhou et al., AAAI 2020)"
XVLM = "X-VLM 4M (Zeng et al., ICML 2022)"

PAPER_RESULTS: tuple[PaperResult, ...] = (
    PaperResult(LXMERT, "lxmert", "vqa", "VQA accuracy", "VQA v2 test-dev", 72.42, "val/overall", "test/overall"),
    PaperResult(LXMERT, "lxmert", "vqa", "VQA accuracy", "VQA v2 test-std", 72.54, "val/overall", "test/overall"),
    PaperResult(LXMERT, "lxmert", "gqa", "accuracy", "GQA test-dev", 60.00, "val/accuracy", "test/accuracy"),
    PaperResult(LXMERT, "lxmert", "gqa", "accuracy", "GQA test-std", 60.33, "val/accuracy", "test/accuracy"),
    PaperResult(LXMERT, "lxmert", "nlvr2", "accuracy", "NLVR2 test-P", 74.50, "val/accuracy", "test/accuracy"),
    PaperResult(LXMERT, "lxmert", "nlvr2", "accuracy", "NLVR2 test-U", 76.18, "val/accuracy", "test/accuracy"),
    PaperResult(VLP, "vlp", "caption", "BLEU-4", "COCO Karpathy test", 36.5, "val/BLEU-4", "test/BLEU-4"),
    PaperResult(VLP, "vlp", "caption", "METEOR", "COCO Karpathy test", 28.4, "val/METEOR", "test/METEOR"),
    PaperResult(VLP, "vlp", "caption", "CIDEr (ours: CIDEr-D)", "COCO Karpathy test", 116.9, "val/CIDEr-D", "test/CIDEr-D"),
    PaperResult(VLP, "vlp", "caption", "SPICE", "COCO Karpathy test", 21.2, "val/SPICE", "test/SPICE"),
    PaperResult(VLP, "vlp", "caption", "BLEU-4, SCST", "COCO Karpathy test", 39.5, "val/BLEU-4", "test/BLEU-4"),
    PaperResult(VLP, "vlp", "caption", "METEOR, SCST", "COCO Karpathy test", 29.3, "val/METEOR", "test/METEOR"),
    PaperResult(VLP, "vlp", "caption", "CIDEr, SCST (ours: CIDEr-D)", "COCO Karpathy test", 129.3, "val/CIDEr-D", "test/CIDEr-D"),
    PaperResult(VLP, "vlp", "caption", "SPICE, SCST", "COCO Karpathy test", 23.2, "val/SPICE", "test/SPICE"),
    PaperResult(VLP, "vlp", "vqa", "VQA accuracy", "VQA v2 test-dev", 70.5, "val/overall", "test/overall"),
    PaperResult(XVLM, "xvlm", "retrieval", "TR R@1 (ours: txt_r1)", "COCO 5K test", 80.4, "val/txt_r1", "test/txt_r1"),
    PaperResult(XVLM, "xvlm", "retrieval", "IR R@1 (ours: img_r1)", "COCO 5K test", 63.1, "val/img_r1", "test/img_r1"),
    PaperResult(XVLM, "xvlm", "retrieval", "TR R@1 (ours: txt_r1)", "Flickr30K test", 96.8, "val/txt_r1", "test/txt_r1"),
    PaperResult(XVLM, "xvlm", "retrieval", "IR R@1 (ours: img_r1)", "Flickr30K test", 86.1, "val/img_r1", "test/img_r1"),
    PaperResult(XVLM, "xvlm", "vqa", "VQA accuracy", "VQA v2 test-dev", 78.07, "val/overall", "test/overall"),
    PaperResult(XVLM, "xvlm", "nlvr2", "accuracy", "NLVR2 dev", 84.16, "val/accuracy", "test/accuracy"),
    PaperResult(XVLM, "xvlm", "refcoco", "accuracy", "RefCOCO+ val", 80.17, "val/accuracy", None),
    PaperResult(XVLM, "xvlm", "refcoco", "accuracy", "RefCOCO+ testA", 86.36, None, "test/testA/accuracy"),
    PaperResult(XVLM, "xvlm", "refcoco", "accuracy", "RefCOCO+ testB", 71.00, None, "test/testB/accuracy"),
)


# --------------------------------------------------------------------------- reading


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level, keys joined with ``/`` (lists and scalars are values)."""
    out: dict[str, Any] = {}
    for key in sorted(obj, key=str):
        value = obj[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_metrics(path: Path) -> dict[str, Any]:
    """One metrics JSON, flattened; an :class:`InputError` naming the file if it is not a JSON object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"a metrics file must hold a JSON object, got {type(data).__name__}")
    return flatten(data)


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """A DVCLive TSV (columns ``step`` and the value, maybe ``timestamp``) -> (steps, values)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"unreadable curve file: {e}") from e
    if not rows or "step" not in rows[0]:
        raise InputError(path, "a DVCLive curve needs a header with a 'step' column")
    header = rows[0]
    value_cols = [i for i, name in enumerate(header) if name not in ("step", "timestamp")]
    if not value_cols:
        raise InputError(path, f"no value column besides step/timestamp in header {header}")
    step_col, value_col = header.index("step"), value_cols[-1]
    steps, values = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            steps.append(float(row[step_col]))
            values.append(float(row[value_col]))
        except (IndexError, ValueError):
            wanted = f"step and {header[value_col]!r}"
            raise InputError(path, f"line {lineno}: expected numbers in columns {wanted}, got {row}") from None
    return steps, values


def _stage_of_metrics_file(rel: Path) -> str:
    """metrics/<rel> -> its stage name (``features_region.json`` -> ``features@region``, ...)."""
    parts = rel.with_suffix("").parts
    if len(parts) == 1:
        name = parts[0]
        if name.startswith("features_"):
            return f"features@{name.removeprefix('features_')}"
        return name
    kind = {"leaderboard": "submit"}.get(parts[0], parts[0])
    return f"{kind}@{'/'.join(parts[1:])}"


def _stage_of_dvclive_dir(name: str) -> str:
    for kind in ("pretrain", "finetune"):
        if name.startswith(f"{kind}-"):
            return f"{kind}@{name.removeprefix(kind + '-')}"
    return name


# --------------------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """A metric value as a table cell: stable, compact, Markdown-safe."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            text = str(value)
        elif value.is_integer() and abs(value) < 1e12:
            text = str(int(value))
        else:  # stages write metrics rounded to 6 decimals: show up to 6 significant digits
            text = f"{value:.6g}"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return _cell(text)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _pct(value: Any) -> str:
    """Ours in the papers' units (x100); a text value (``"skipped: why"``) by its first clause."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100 * value:.2f}"
    return fmt(str(value).split(":", 1)[0])


def _canon(key: str) -> str:
    """Key of a val/test metric pair: split prefix dropped, punctuation folded (``yes_no`` = ``yes/no``)."""
    key = key.split("/", 1)[1]
    return re.sub(r"[^0-9a-z]+", "_", key.lower())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Curve:
    """One training stage's loss curves (``ran`` False: no DVCLive train/ directory)."""

    stage: str
    name: str  # the DVCLive directory name, also the PNG's name
    ran: bool
    series: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]


def collect_metrics(root: Path) -> dict[Path, dict[str, Any]]:
    """Every metrics JSON under ``root/metrics`` (relative path -> flattened metrics), sorted."""
    base = root / METRICS_DIR
    if not base.is_dir():
        return {}
    files = sorted(p for p in base.rglob("*.json") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(base): read_metrics(p) for p in files}


def collect_curves(root: Path, finetune_keys: list[str], settings: ReportParams) -> list[Curve]:
    """Loss curves of every training stage: the expected ones in DAG order, then any other DVCLive dir."""
    base = root / DVCLIVE_DIR
    expected = [f"pretrain-{m}" for m in PRETRAIN_MODELS] + ["generator"] + [f"finetune-{k}" for k in finetune_keys]
    found = sorted(p.name for p in base.iterdir() if (p / TRAIN_CURVES).is_dir()) if base.is_dir() else []
    names = expected + [n for n in found if n not in expected]
    exclude = set(settings.exclude_curves)
    curves = []
    for name in names:
        series = []
        train = base / name / TRAIN_CURVES
        if train.is_dir():
            for tsv in sorted(train.glob("*.tsv")):
                if tsv.stem in exclude:
                    continue
                steps, values = read_curve(tsv)
                if steps:
                    series.append((tsv.stem, tuple(steps), tuple(values)))
        curves.append(Curve(_stage_of_dvclive_dir(name), name, train.is_dir(), tuple(series)))
    return curves


def plot_curve(curve: Curve, out: Path, settings: ReportParams) -> None:
    """All of one stage's loss series on one figure (matplotlib, Agg backend), PNG at ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=tuple(settings.figure_size), dpi=settings.dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, steps, values in curve.series:
        ax.plot(steps, values, label=label, linewidth=1.2)
    if settings.log_y and all(v > 0 for _, _, values in curve.series for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(f"{curve.stage}: training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.savefig(out, format="png", metadata={"Software": None})


def _metrics_rows(metrics: dict[Path, dict[str, Any]], finetune_keys: list[str]) -> tuple[list[list[str]], list[str]]:
    """Rows (stage, metric, value, test) of the one metrics table, and the stages not run.

    Order: the DAG's single stages, then ``finetune@<key>`` / ``submit@<key>`` pairs in params
    order (then keys found on disk but not in params), then any other metrics file.
    """
    singles = [Path(s) for s in ("world.json", "tokenizer.json", "detector.json")]
    singles += [Path(f"features_{k}.json") for k in FEATURE_KINDS] + [Path("codebook.json")]
    singles += [Path(f"pretrain/{m}.json") for m in PRETRAIN_MODELS] + [Path("generator.json"), Path("paint.json")]
    keys = list(finetune_keys)
    for rel in metrics:  # stale or extra fine-tuning results (key not in params.yaml)
        if len(rel.parts) == 2 and rel.parts[0] in ("finetune", "leaderboard") and rel.stem not in keys:
            keys.append(rel.stem)
    paired = {Path(kind, f"{k}.json") for kind in ("finetune", "leaderboard") for k in keys}
    extras = [rel for rel in metrics if rel not in singles and rel not in paired]

    rows: list[list[str]] = []
    not_run: list[str] = []

    def missing(stage: str, test: bool = False) -> None:
        rows.append([f"`{stage}`", "", "" if test else NOT_RUN, NOT_RUN if test else ""])
        not_run.append(stage)

    def single(rel: Path) -> None:
        stage = _stage_of_metrics_file(rel)
        if rel not in metrics:
            missing(stage)
            return
        for name, value in metrics[rel].items():
            rows.append([f"`{stage}`", _cell(name), fmt(value), ""])

    def pair(key: str) -> None:
        val, test = metrics.get(Path("finetune", f"{key}.json")), metrics.get(Path("leaderboard", f"{key}.json"))
        test_by_canon: dict[str, str] = {}
        for name in test or {}:
            if name.startswith("test/"):
                test_by_canon.setdefault(_canon(name), name)
        used: set[str] = set()
        if val is None:
            missing(f"finetune@{key}")
        else:
            for name, value in val.items():
                cell = ""
                if name.startswith("val/"):
                    match = test_by_canon.get(_canon(name))
                    if test is None:
                        cell = NOT_RUN
                    elif match is not None and match not in used:
                        used.add(match)
                        cell = fmt(test[match])
                rows.append([f"`finetune@{key}`", _cell(name), fmt(value), cell])
        if test is None:
            missing(f"submit@{key}", test=True)
        else:
            for name, value in test.items():
                if name not in used:
                    rows.append([f"`submit@{key}`", _cell(name), "", fmt(value)])

    for rel in singles:
        single(rel)
    for key in keys:
        pair(key)
    for rel in extras:
        single(rel)
    return rows, not_run


def _paper_rows(metrics: dict[Path, dict[str, Any]], finetune: dict[str, tuple[str, str]]) -> list[list[str]]:
    rows = []
    for ref in PAPER_RESULTS:
        keys = [k for k, (model, task) in finetune.items() if (model, task) == (ref.model, ref.task)]
        for key in keys or [f"{ref.model}-{ref.task}"]:
            val = metrics.get(Path("finetune", f"{key}.json"))
            test = metrics.get(Path("leaderboard", f"{key}.json"))

            def ours(found: dict[str, Any] | None, name: str | None) -> str:
                if name is None:
                    return "n/a"
                if found is None:
                    return NOT_RUN
                return _pct(found[name]) if name in found else "missing"

            rows.append(
                [ref.paper, _cell(ref.metric), ref.split, f"{ref.value:.2f}", f"`finetune@{key}`",
                 ours(val, ref.val_key), ours(test, ref.test_key)]
            )  # fmt: skip
    return rows


def render(
    metrics: dict[Path, dict[str, Any]],
    curves: list[Curve],
    finetune: dict[str, tuple[str, str]],
    sheets: list[tuple[str, str, str, bool]],
    settings: ReportParams,
) -> str:
    """The Markdown text of reports/report.md (pure: same inputs, same bytes).

    ``sheets``: (title, file name under reports/, stage that writes it, present).
    """
    rows, not_run = _metrics_rows(metrics, list(finetune))
    n_stages = len({row[0] for row in rows})
    not_run_text = ", ".join(f"`{s}`" for s in not_run) if not_run else "none"
    lines = [
        "# vlpipe run report",
        "",
        "Written by `vlpipe report` (DVC stage `report`) from `metrics/`, `dvclive/` and the contact",
        "sheets in `reports/`. All of our numbers are measured on the synthetic shapes world.",
        "",
        f"Stages with results: {n_stages - len(not_run)} of {n_stages}. Not run: {not_run_text}.",
        "",
        "## Metrics of every stage",
        "",
        "One row per metric (nested keys joined with `/`). `value` is the stage's own metrics file",
        "(val metrics of fine-tuning in `val/...`); `test (local leaderboard)` is the test score of the",
        "matching `submit@<key>` stage, written beside the val metric of the same name.",
        "",
    ]
    lines += _table(["stage", "metric", "value", "test (local leaderboard)"], rows)
    lines += [
        "",
        f"## Reference papers' headline numbers: {REAL_DATA}",
        "",
        f"The papers' numbers are **{REAL_DATA}**:",
        "real images and text (COCO, VQA v2, GQA, NLVR2, Flickr30K, RefCOCO+), base-size models,",
        "GPUs (formats.md §8). Ours are tiny models on the",
        "synthetic shapes world, multiplied by 100 to the papers' units; they say whether a task is",
        "learnt, not how a model ranks against the paper. formats.md §8 gives no X-LXMERT numbers;",
        "text values (SPICE without its models) show their first clause, the metrics table has the rest.",
        "",
    ]
    lines += _table(
        ["paper", "metric", "paper's split", "paper (real data)", "ours", "ours val x100 (synthetic)",
         "ours test x100 (synthetic)"],
        _paper_rows(metrics, finetune),
    )  # fmt: skip
    excluded = ", ".join(f"`{name}`" for name in settings.exclude_curves) or "none"
    lines += [
        "",
        "## Training curves",
        "",
        f"DVCLive `train/*.tsv` series of each training stage on one figure (left off: {excluded};",
        "params `report.exclude_curves`).",
        "",
    ]
    for curve in curves:
        lines.append(f"### `{curve.stage}`")
        lines.append("")
        if curve.series:
            names = ", ".join(f"`{label}`" for label, _, _ in curve.series)
            lines.append(f"![{curve.stage} training curves](curves/{curve.name}.png)")
            lines.append("")
            lines.append(f"Series: {names}.")
        elif curve.ran:
            lines.append("no training-loss series (all empty or in `report.exclude_curves`)")
        else:
            lines.append(NOT_RUN)
        lines.append("")
    lines += ["## Contact sheets", ""]
    for title, name, stage, present in sheets:
        lines.append(f"### {title}")
        lines.append("")
        lines.append(f"![{title}]({name})" if present else f"{NOT_RUN} (`reports/{name}` of stage `{stage}`)")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def build_report(root: Path, finetune: dict[str, tuple[str, str]], settings: ReportParams) -> None:
    """Read everything under ``root``, then write reports/curves/ and reports/report.md atomically.

    ``finetune``: the ``finetune.<key>`` entries of params.yaml as key -> (model, task).
    """
    metrics = collect_metrics(root)
    curves = collect_curves(root, list(finetune), settings)
    sheets = [(title, name, stage, (root / "reports" / name).is_file()) for title, name, stage in CONTACT_SHEETS]
    text = render(metrics, curves, finetune, sheets, settings)
    with atomic_dir(root / CURVES_DIR) as tmp:
        for curve in curves:
            if curve.series:
                plot_curve(curve, tmp / f"{curve.name}.png", settings)
    with atomic_file(root / REPORT_MD, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def run(params_path: Path, root: Path) -> None:
    """Stage `report` (params: report; the keys, models and tasks of finetune)."""
    params = load_params(params_path)
    finetune = {key: (entry.model, entry.task) for key, entry in params.finetune.items()}
    build_report(root, finetune, params.report)
