"""Shared checkpoints: the README's "Shared checkpoints" commands against real DVC remotes.

The pre-training team pushes the built pipeline's outputs to a remote; a fresh clone pulls
the pre-trained models with everything upstream of them (``dvc pull --with-deps pretrain``, or
``dvc pull --with-deps pretrain@lxmert features`` for one model) and then ``dvc repro finetune@lxmert-vqa`` runs the fine-tuning alone: the world, tokenizer,
detector, features and pre-training stages are up to date. Once against a local-directory
remote, once against an S3-compatible server (moto) on 127.0.0.1 through dvc-s3.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BIN, git_commit, run

pytestmark = pytest.mark.slow

# The README's two pull commands: all pre-trained models, or one; and the stages each brings up to date.
PULL_ALL = ["pretrain"]
UPSTREAM_ALL = ["world", "tokenizer", "detector", "features", "codebook", "pretrain"]
PULL_LXMERT = ["pretrain@lxmert", "features"]
UPSTREAM_LXMERT = ["world", "tokenizer", "detector", "features", "pretrain@lxmert"]


def dvc(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, **env)


def team_repo(built_pipeline: Path, dest: Path) -> Path:
    """The pre-training team's checkout: a clone of the built pipeline's commit, using its cache."""
    run(["git", "clone", "-q", str(built_pipeline), str(dest)], dest.parent)
    dvc("cache", "dir", "--local", str(built_pipeline / ".dvc" / "cache"), cwd=dest)
    return dest


def share_and_finetune(
    team: Path, remote: list[list[str]], pull: list[str], upstream: list[str], **env: str
) -> None:
    """README flow: the team adds the remote, commits it, pushes; a fresh clone pulls and fine-tunes."""
    for args in remote:  # `dvc remote add -d shared ...` and any `dvc remote modify`
        dvc(*args, cwd=team, **env)
    git_commit(team, "shared remote")
    pushed = dvc("push", cwd=team, **env)
    assert "pushed" in pushed.stdout, pushed.stdout

    user = team.parent / "user"
    run(["git", "clone", "-q", str(team), str(user)], team.parent)
    assert not (user / ".dvc" / "cache").exists()  # nothing local: all comes from the remote
    pulled = dvc("pull", "--with-deps", *pull, cwd=user, **env)
    assert "added" in pulled.stdout, pulled.stdout
    models = {"lxmert", "xlxmert", "vlp", "xvlm"} if pull == PULL_ALL else {"lxmert"}
    assert {p.name for p in (user / "models/pretrained").iterdir() if p.is_dir()} == models
    assert (user / "models/pretrained/lxmert/config.json").is_file()
    assert (user / "data/features/grid").is_dir()  # fine-tuning reads all of data/features
    assert not [p for p in (user / "models/finetuned").iterdir() if p.is_dir()]  # only what was asked for

    status = dvc("status", "--json", *upstream, cwd=user, **env)
    assert json.loads(status.stdout) == {}, status.stdout
    status = dvc("status", "--with-deps", *pull, cwd=user, **env)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout

    r = dvc("repro", "finetune@lxmert-vqa", cwd=user, **env)
    ran = [line for line in r.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'finetune@lxmert-vqa':"], r.stdout
    assert (user / "models/finetuned/lxmert-vqa").is_dir()
    assert json.loads(dvc("status", "--json", *upstream, "finetune@lxmert-vqa", cwd=user, **env).stdout) == {}


def test_local_remote_pull_pretrained_then_finetune_alone(built_pipeline: Path, tmp_path: Path) -> None:
    team = team_repo(built_pipeline, tmp_path / "team")
    storage = tmp_path / "dvc-storage"
    share_and_finetune(team, [["remote", "add", "-d", "shared", str(storage)]], PULL_ALL, UPSTREAM_ALL)
    assert any((storage / "files").rglob("*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the S3 commands: the server's test credentials; no user AWS files, no proxy."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@pytest.fixture(scope="module")
def s3_endpoint(s3_env: dict[str, str]) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a subprocess, stopped after the module) with bucket ``vlpipe``."""
    for module in ("moto", "boto3", "dvc_s3"):
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e '.[dev]' (dvc-s3, moto[server])")
    import boto3

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.devnull, "wb")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **s3_env),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.skip(f"moto server exited at start ({proc.returncode}): {sys.executable} -m moto.server")
            with contextlib.suppress(OSError):
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2):
                    break
            if time.monotonic() > deadline:
                pytest.skip(f"moto server did not answer on {url} within 60 s")
            time.sleep(0.3)
        s3 = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket="vlpipe")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_s3_remote_pull_pretrained_then_finetune_alone(
    built_pipeline: Path, tmp_path: Path, s3_env: dict[str, str], s3_endpoint: str
) -> None:
    import boto3

    team = team_repo(built_pipeline, tmp_path / "team")
    share_and_finetune(
        team,
        [
            ["remote", "add", "-d", "shared", "s3://vlpipe/checkpoints"],
            ["remote", "modify", "shared", "endpointurl", s3_endpoint],
        ],
        PULL_LXMERT,
        UPSTREAM_LXMERT,
        **s3_env,
    )
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    listed = s3.list_objects_v2(Bucket="vlpipe", Prefix="checkpoints/files/md5/")
    assert listed.get("KeyCount", 0) > 0
