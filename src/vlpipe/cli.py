"""`vlpipe <stage> ...`: the one command line that dvc.yaml calls.

Each command is a thin shell over a stage function in ``vlpipe.stages``: it names the
params file and the repository root, nothing else. Library imports happen inside the
commands so ``vlpipe --help`` stays fast. A :class:`~vlpipe.errors.VlpipeError` (bad
params, bad input file, mismatched checkpoint) is printed as one line and exits 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlpipe.errors import VlpipeError

app = typer.Typer(
    name="vlpipe",
    help="Reproducible vision-language pre-training pipeline (LXMERT, X-LXMERT, VLP, X-VLM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(
    help="Import users' existing feature files and reference checkpoints.", no_args_is_help=True
)
app.add_typer(import_app, name="import")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file (the single source of settings)")
]
RootOpt = Annotated[Path, typer.Option("--root", help="repository root: data/, models/, metrics/ live here")]


def _scale_out(params: Path, where: tuple[str, ...], run_id: str) -> None:
    """Re-exec this command under torchrun when the stage's ``train`` params ask for > 1 process."""
    from vlpipe.config import load_section
    from vlpipe.train.launch import relaunch_if_asked

    section = load_section(where[0], params)
    for name in where[1:]:
        section = section[name] if isinstance(section, dict) else getattr(section, name)
    relaunch_if_asked(section.train, sys.argv[1:], run_id)


@app.command()
def world(
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
    preview: Annotated[
        int | None,
        typer.Option(
            help="only write a PNG contact sheet of N val scenes of the existing world, with captions"
        ),
    ] = None,
    preview_out: Annotated[Path, typer.Option(help="where --preview writes")] = Path(
        "reports/world_preview.png"
    ),
) -> None:
    """Stage `world`: generate the synthetic shapes world into data/world (params: world)."""
    from vlpipe.stages import world as stage

    if preview is not None:
        stage.preview(root, preview, root / preview_out)
    else:
        stage.run(params, root)


@app.command()
def tokenizer(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Stage `tokenizer`: train a WordPiece vocab on the world's training text (params: tokenizer)."""
    from vlpipe.stages import tokenizer as stage

    stage.run(params, root)


@app.command()
def detector(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Stage `detector`: train the small object/attribute detector on the world (params: detector)."""
    from vlpipe.stages import features as stage

    stage.run_detector(params, root)


@app.command()
def features(
    kind: Annotated[str, typer.Argument(help="region (LXMERT/VLP) or grid (X-LXMERT)")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Stage `features@KIND`: region or grid features into a memory-mapped store (params: features.KIND)."""
    from vlpipe.stages import features as stage

    stage.run_features(kind, params, root)


@app.command()
def codebook(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Stage `codebook`: faiss k-means over training grid features (params: codebook)."""
    from vlpipe.stages import features as stage

    stage.run_codebook(params, root)


@app.command()
def pretrain(
    model: Annotated[str, typer.Argument(help="lxmert, xlxmert, vlp or xvlm")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Stage `pretrain@MODEL`: pre-train a vision-language model (params: pretrain.MODEL)."""
    from vlpipe.stages import stage_runner

    runner = stage_runner("pretrain", model, params)
    _scale_out(params, ("pretrain", model), f"pretrain-{model}")
    runner(params, root)


@app.command()
def finetune(
    key: Annotated[str, typer.Argument(help="<model>-<task>, e.g. lxmert-vqa")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Stage `finetune@KEY`: fine-tune on a downstream task, val metrics (params: finetune.KEY)."""
    from vlpipe.stages import stage_runner

    runner = stage_runner("finetune", key, params)
    _scale_out(params, ("finetune", key), f"finetune-{key}")
    runner(key, params, root)


@app.command()
def submit(
    key: Annotated[str, typer.Argument(help="<model>-<task>, e.g. lxmert-vqa")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Stage `submit@KEY`: official test submission file + local leaderboard score."""
    from vlpipe.stages import stage_runner

    stage_runner("submit", key, params)(key, params, root)


@app.command()
def generator(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Stage `generator`: X-LXMERT's SPADE image generator from codebook grids (params: generator)."""
    from vlpipe.stages import xlxmert

    _scale_out(params, ("generator",), "generator")
    xlxmert.run_generator(params, root)


@app.command()
def paint(
    caption: Annotated[
        str | None, typer.Argument(help="paint this sentence into a PNG instead of running the stage")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG written for CAPTION")] = Path("paint.png"),
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Stage `paint` (val captions -> contact sheet + metrics/paint.json), or paint one CAPTION."""
    from vlpipe.stages import xlxmert

    if caption is None:
        xlxmert.run_paint(params, root)
    else:
        xlxmert.paint_caption(caption, out, params, root)
        typer.echo(f"painted {caption!r} into {out}")


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Stage `report`: reports/report.md, every metric + the papers' numbers + curves (params: report)."""
    from vlpipe import report as stage

    stage.run(params, root)
    typer.echo(f"wrote {root / stage.REPORT_MD}")


@app.command("probe-nlvr2")
def probe_nlvr2(
    model_dir: Annotated[Path, typer.Argument(help="a fine-tuned VQA model, e.g. models/finetuned/xvlm-vqa")],
    split: Annotated[str, typer.Option(help="NLVR2 split with labels: train or val")] = "val",
    out: Annotated[Path | None, typer.Option(help="write the result here (JSON)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """How much of NLVR2 a VQA model's per-image answers decide (not a stage; vlpipe.analysis.nlvr2_probe)."""
    from vlpipe.analysis.nlvr2_probe import run_probe_nlvr2

    result = run_probe_nlvr2(model_dir, split, out, params, root)
    typer.echo(f"{model_dir} on NLVR2 {split}: decomposed accuracy {result['decomposed_accuracy']:.3f} "
               f"(exists {result['perception']['exists']:.3f}, exact count {result['perception']['count']:.3f})")
    for name, acc in result["decomposed_by_template"].items():
        typer.echo(f"  {name:12s} {acc:.3f}")


@import_app.command("lxmert")
def import_lxmert_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="model_LXRT.pth (pickle, read weights_only) or an HF directory")
    ],
    out: Annotated[Path, typer.Argument(help="directory to write (config.json + model.safetensors)")],
    heads: Annotated[
        int | None, typer.Option(help="attention heads (not stored in weights; default hidden/64)")
    ] = None,
) -> None:
    """Convert a reference LXMERT pre-training checkpoint into our HF layout (usable as pretrain.lxmert.init)."""
    from vlpipe.models.convert import import_lxmert

    typer.echo(f"imported {import_lxmert(checkpoint, out, heads)} into {out}")


@import_app.command("tsv")
def import_tsv(
    tsv: Annotated[Path, typer.Argument(help="LXMERT / bottom-up-attention region feature TSV")],
    out: Annotated[Path, typer.Argument(help="store directory to write, e.g. data/features/region")],
) -> None:
    """Import an LXMERT region-feature TSV into a memory-mapped feature store."""
    from vlpipe.features.store import import_lxmert_tsv

    info = import_lxmert_tsv(tsv, out)
    typer.echo(f"imported {info} into {out}")


@import_app.command("hdf5")
def import_hdf5(
    h5: Annotated[Path, typer.Argument(help="X-LXMERT grid-feature HDF5 (one group per img_id)")],
    out: Annotated[Path, typer.Argument(help="store directory to write, e.g. data/features/grid")],
) -> None:
    """Import X-LXMERT grid features (HDF5) into a memory-mapped feature store."""
    from vlpipe.features.store import import_xlxmert_hdf5

    info = import_xlxmert_hdf5(h5, out)
    typer.echo(f"imported {info} into {out}")


@app.command("export-tsv")
def export_tsv(
    store: Annotated[Path, typer.Argument(help="region feature store directory")],
    tsv: Annotated[Path, typer.Argument(help="TSV file to write (LXMERT format)")],
) -> None:
    """Export a region feature store to the LXMERT TSV format."""
    from vlpipe.features.store import export_lxmert_tsv

    export_lxmert_tsv(store, tsv)


@app.command("preset")
def preset(
    name: Annotated[str, typer.Argument(help="tiny (the CPU default) or lxmert-base (the paper's recipe)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="params file to write")] = Path("params.yaml"),
) -> None:
    """Write a whole params file for a named preset (then `dvc repro` or `dvc exp run` it)."""
    import yaml

    from vlpipe.config import preset_params
    from vlpipe.io import atomic_file

    data = preset_params(name)
    with atomic_file(out) as f:
        f.write(f"# vlpipe params: preset {name!r} (written by `vlpipe preset {name}`).\n")
        f.write(yaml.safe_dump(data, sort_keys=False))
    typer.echo(f"wrote preset {name!r} to {out}")


@app.command("check-params")
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml strictly and print nothing but 'ok' (or the errors)."""
    from vlpipe.config import load_params

    load_params(params)
    typer.echo("ok")


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank, then tear gloo/NCCL down together (a rank that
    exits alone while another still holds the group can abort it)."""
    if "LOCAL_RANK" not in os.environ:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    """Console entry point: run the app; user-facing errors become one line and exit 2."""
    import logging

    # vlpipe's own progress lines (resumes, sizes, timings) on stderr; libraries stay quiet.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("vlpipe").addHandler(handler)
    logging.getLogger("vlpipe").setLevel(logging.INFO)
    try:
        app(standalone_mode=False)
        _leave_process_group()
    except VlpipeError as e:
        print(f"vlpipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("vlpipe: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
