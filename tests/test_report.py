"""Stage `report`: every metric in one table, val beside test, "not run", atomic failure, PNG curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from vlpipe.config import ParamsError, ReportParams, dump_defaults, load_params
from vlpipe.errors import InputError
from vlpipe.report import REAL_DATA, build_report, flatten, fmt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINETUNE = {"lxmert-vqa": ("lxmert", "vqa"), "lxmert-gqa": ("lxmert", "gqa")}

METRICS = {
    "world.json": {"counts": {"train": {"images": 30}, "val": {"images": 5}}, "vqa": {"blind_val_accuracy": 0.41}},
    "features_region.json": {"images": 35, "recall_iou50": 0.996486},
    "pretrain/lxmert.json": {"steps": 12, "train": {"loss": 3.54, "mlm": 0.689}, "val": {"mlm_accuracy": 0.755}},
    "finetune/lxmert-vqa.json": {
        "init": "pretrained",
        "train": {"loss": 1.378844},
        "val": {"n": 3000.0, "overall": 0.934033, "per_answer_type/yes_no": 0.972444},
    },
    "leaderboard/lxmert-vqa.json": {
        "count": 3000,
        "submission": "test_predict.json",
        "test": {"n": 3000, "overall": 0.9331, "per_answer_type": {"yes/no": 0.975111}},
    },
    "finetune/lxmert-gqa.json": {"val": {"accuracy": 0.708602}},  # its submit@ has not run
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A repository root after a partial run: some metrics, two DVCLive runs, the world sheet."""
    for rel, data in METRICS.items():
        _write(tmp_path / "metrics" / rel, json.dumps(data, indent=2))
    train = tmp_path / "dvclive/pretrain-lxmert/plots/metrics/train"
    for name, values in {"loss": [4.0, 3.0, 2.5], "mlm": [2.0, 1.0, 0.7], "lr": [1e-4, 5e-5, 0.0]}.items():
        _write(train / f"{name}.tsv", f"step\t{name}\n" + "".join(f"{10 * (i + 1)}\t{v}\n" for i, v in enumerate(values)))
    _write(tmp_path / "dvclive/finetune-lxmert-vqa/plots/metrics/train/loss.tsv", "step\tloss\n1\t2.0\n2\t1.5\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/world_preview.png").write_bytes(PNG_MAGIC)
    return tmp_path


def _report(root: Path) -> str:
    build_report(root, FINETUNE, ReportParams())
    return (root / "reports/report.md").read_text(encoding="utf-8")


def _rows(text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(stage, metric) -> (value, test) of the one metrics table."""
    section = text.split("## Metrics of every stage", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            stage, metric, value, test = (c.strip() for c in line.strip("|").split(" | "))
            rows[(stage.strip("`"), metric)] = (value, test)
    return rows


def _stage(rel: str) -> str:
    """metrics/<rel> -> the stage that writes it."""
    name = rel.removesuffix(".json")
    if name.startswith("features_"):
        return "features@" + name.removeprefix("features_")
    kind, _, key = name.partition("/")
    return f"{'submit' if kind == 'leaderboard' else kind}@{key}" if key else kind


def test_every_metric_of_every_file_is_in_the_table(run_dir: Path) -> None:
    rows = _rows(_report(run_dir))
    for rel, data in METRICS.items():
        stage = _stage(rel)
        for name, value in flatten(data).items():
            if stage.startswith("submit@") and name.startswith("test/"):
                # a test metric sits beside its val metric (finetune@ row) or has its own submit@ row
                key = stage.removeprefix("submit@")
                tests = [t for (s, _), (_, t) in rows.items() if s in (f"finetune@{key}", stage)]
                assert fmt(value) in tests, (stage, name)
                continue
            assert (stage, name) in rows, (stage, name)
            assert fmt(value) in rows[(stage, name)], (stage, name, rows[(stage, name)])


def test_test_metrics_sit_beside_the_val_metrics_of_the_same_key(run_dir: Path) -> None:
    rows = _rows(_report(run_dir))
    assert rows[("finetune@lxmert-vqa", "val/overall")] == ("0.934033", "0.9331")
    # val's flat "per_answer_type/yes_no" and the leaderboard's nested "per_answer_type"/"yes/no"
    assert rows[("finetune@lxmert-vqa", "val/per_answer_type/yes_no")] == ("0.972444", "0.975111")
    assert rows[("finetune@lxmert-vqa", "val/n")] == ("3000", "3000")
    assert rows[("finetune@lxmert-vqa", "train/loss")] == ("1.37884", "")
    # leaderboard values without a val counterpart keep their own rows
    assert rows[("submit@lxmert-vqa", "count")] == ("", "3000")
    assert ("submit@lxmert-vqa", "test/overall") not in rows


def test_stages_that_did_not_run_show_not_run(run_dir: Path) -> None:
    text = _report(run_dir)
    rows = _rows(text)
    for stage in ("tokenizer", "detector", "features@grid", "codebook", "pretrain@vlp", "generator", "paint"):
        assert rows[(stage, "")] == ("not run", ""), stage
    assert rows[("submit@lxmert-gqa", "")] == ("", "not run")
    assert rows[("finetune@lxmert-gqa", "val/accuracy")] == ("0.708602", "not run")
    assert "`tokenizer`" in text.split("Not run:", 1)[1].splitlines()[0]
    curves = text.split("## Training curves", 1)[1].split("## Contact sheets", 1)[0]
    assert "### `pretrain@vlp`\n\nnot run" in curves
    assert "### `finetune@lxmert-gqa`\n\nnot run" in curves
    sheets = text.split("## Contact sheets", 1)[1]
    assert "](world_preview.png)" in sheets
    assert "not run (`reports/paint.png` of stage `paint`)" in sheets


def test_no_metrics_at_all_is_a_report_of_stages_not_run(tmp_path: Path) -> None:
    rows = _rows(_report(tmp_path))
    assert rows[("world", "")] == ("not run", "")
    assert rows[("finetune@lxmert-vqa", "")] == ("not run", "")
    assert list((tmp_path / "reports/curves").iterdir()) == []


def test_papers_numbers_are_labelled_real_data_beside_ours(run_dir: Path) -> None:
    text = _report(run_dir)
    section = text.split("## Reference papers' headline numbers", 1)[1].split("\n## ", 1)[0]
    assert REAL_DATA == "real data (paper), not comparable with the synthetic world"
    assert REAL_DATA in section.splitlines()[0]
    line = next(ln for ln in section.splitlines() if "VQA v2 test-dev" in ln and "lxmert-vqa" in ln)
    assert "72.42" in line and "93.40" in line and "93.31" in line  # ours x100, val then test
    line = next(ln for ln in section.splitlines() if "GQA test-dev" in ln)
    assert "60.00" in line and "70.86" in line and line.endswith("| not run |")


def test_malformed_metrics_json_names_the_file_and_leaves_no_report(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(run_dir / "metrics/finetune/lxmert-gqa.json", '{"val": {"accuracy": 0.7,}')
    with pytest.raises(InputError, match=r"lxmert-gqa\.json: malformed JSON"):
        build_report(run_dir, FINETUNE, ReportParams())
    # the same through the CLI: one line naming the file, exit status 2
    params = run_dir / "params.yaml"
    params.write_text(yaml.safe_dump(dump_defaults()))
    from vlpipe.cli import main

    monkeypatch.setattr(sys, "argv", ["vlpipe", "report", "--params", str(params), "--root", str(run_dir)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "metrics/finetune/lxmert-gqa.json" in err and "malformed JSON" in err
    assert sorted(p.name for p in (run_dir / "reports").iterdir()) == ["world_preview.png"]


def test_a_metrics_file_that_is_not_an_object_is_an_error(run_dir: Path) -> None:
    _write(run_dir / "metrics/codebook.json", "[1, 2]")
    with pytest.raises(InputError, match=r"codebook\.json: a metrics file must hold a JSON object"):
        build_report(run_dir, FINETUNE, ReportParams())
    assert not (run_dir / "reports/report.md").exists()


def test_a_malformed_curve_names_the_file(run_dir: Path) -> None:
    _write(run_dir / "dvclive/pretrain-lxmert/plots/metrics/train/mlm.tsv", "step\tmlm\n10\tnan?\n")
    with pytest.raises(InputError, match=r"mlm\.tsv: line 2"):
        build_report(run_dir, FINETUNE, ReportParams())
    assert not (run_dir / "reports/report.md").exists()
    assert not (run_dir / "reports/curves").exists()


def test_curves_are_png_plots_of_the_losses_linked_from_the_report(run_dir: Path) -> None:
    import matplotlib.image

    text = _report(run_dir)
    curves = run_dir / "reports/curves"
    assert sorted(p.name for p in curves.iterdir()) == ["finetune-lxmert-vqa.png", "pretrain-lxmert.png"]
    for png in curves.iterdir():
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = matplotlib.image.imread(png)
        assert image.shape[0] == 400 and image.shape[1] == 700  # 7 x 4 inches at 100 dpi
        assert f"](curves/{png.name})" in text
    assert "Series: `loss`, `mlm`." in text  # lr is excluded by default (report.exclude_curves)


def test_two_runs_give_byte_identical_outputs(run_dir: Path) -> None:
    first = _report(run_dir).encode()
    png = (run_dir / "reports/curves/pretrain-lxmert.png").read_bytes()
    second = _report(run_dir).encode()
    assert first == second
    assert (run_dir / "reports/curves/pretrain-lxmert.png").read_bytes() == png
    leftovers = [p.name for p in (run_dir / "reports").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_report_params_are_strict(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    for bad, key in [({"dpi": "high"}, "report.dpi"), ({"figure_size": [7.0]}, "report.figure_size"),
                     ({"log_scale": True}, "report.log_scale")]:  # fmt: skip
        data = dump_defaults()
        data["report"].update(bad)
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(ParamsError, match=key):
            load_params(p)


def test_the_cli_reads_params_and_writes_the_report(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = run_dir / "params.yaml"
    data = dump_defaults()
    data["report"]["exclude_curves"] = ["lr", "mlm"]
    params.write_text(yaml.safe_dump(data))
    from vlpipe.cli import main

    monkeypatch.setattr(sys, "argv", ["vlpipe", "report", "--params", str(params), "--root", str(run_dir)])
    main()
    text = (run_dir / "reports/report.md").read_text(encoding="utf-8")
    assert "Series: `loss`." in text
    assert "`finetune@xvlm-vqa` |  | not run |" in text  # every finetune key of params.yaml is listed


def test_a_stage_whose_series_are_all_excluded_is_not_called_not_run(run_dir: Path) -> None:
    build_report(run_dir, FINETUNE, ReportParams(exclude_curves=["loss", "lr", "mlm"]))
    text = (run_dir / "reports/report.md").read_text(encoding="utf-8")
    assert "### `pretrain@lxmert`\n\nno training-loss series" in text
    assert "### `pretrain@vlp`\n\nnot run" in text
    assert list((run_dir / "reports/curves").iterdir()) == []
