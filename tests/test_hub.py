"""Models by hub id (weights/hub.py): "ORG/NAME" resolved through huggingface_hub's cache, offline.

The cache is built here with the hub's own layout (models--ORG--NAME/refs/main,
snapshots/<sha>/...) around a tiny random checkpoint; HF_HUB_OFFLINE=1 keeps every test off the
network: what is cached loads, what is not is a clear error naming the model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import tiny_checkpoint

import unigemma
from unigemma.cli import main
from unigemma.errors import CheckpointError
from unigemma.weights import hub
from unigemma.weights.hub import HubRef, parse

SHA = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], listed: tuple[str, ...] = ()) -> Path:
    """A cached snapshot as huggingface_hub writes one: blobs, symlinks to them, refs/main, and
    the repository's file listing (trees/<sha>.json, by the hub's own writer), which names
    `listed` files too: in the repository, never downloaded."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, src in files.items():
        blob = root / "blobs" / f"{abs(hash((repo_id, name))):x}"
        shutil.copyfile(src, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    write_tree_cache(str(root), SHA, {name: TreeCacheEntry(size=4, blob_id=f"{i:040x}")
                                      for i, name in enumerate([*files, *listed])})
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub-cache")
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    cache_repo(cache, "org/tiny", {f.name: f for f in ckpt.iterdir()})
    # a GGUF repository: two quantizations and a projector (any bytes: only resolved, never loaded)
    gguf = tmp_path_factory.mktemp("gguf") / "x.gguf"
    gguf.write_bytes(b"GGUF")
    names = ("tiny-Q4_K_M.gguf", "tiny-q8_0.gguf", "mmproj-tiny-Q8_0.gguf")
    cache_repo(cache, "org/tiny-GGUF", {n: gguf for n in names}, listed=("tiny-Q2_K.gguf", "tiny-f16.gguf"))
    return cache


@pytest.fixture
def offline(cache, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, in the environment and in huggingface_hub's
    constants (read when it was imported, possibly before this test)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_parse_hub_ids_and_local_paths(tmp_path):
    assert parse("google/gemma-4-12B-it") == HubRef("google/gemma-4-12B-it")
    assert parse("org/name@v1.0") == HubRef("org/name", revision="v1.0")
    assert parse("org/name-GGUF:Q4_K_M") == HubRef("org/name-GGUF", "Q4_K_M")
    assert parse("org/name-GGUF:name-q8_0.gguf@" + SHA) == HubRef("org/name-GGUF", "name-q8_0.gguf", SHA)
    assert str(parse("org/n:Q8_0@main")) == "org/n:Q8_0@main"
    (tmp_path / "org" / "name").mkdir(parents=True)
    os.chdir(tmp_path)  # an existing local path wins over the hub id it also spells
    try:
        assert parse("org/name") is None
    finally:
        os.chdir(Path(__file__).parent)
    for local in ["/abs/path", "./rel/path", "../up/x", "~/models/x", "a/b/c", "name", "name.gguf", "org/na--me",
                  "org/", "-org/x", "org/name.", "org/name:"]:
        assert parse(local) is None, local


def test_load_by_hub_id_from_the_cache(offline):
    gemma = unigemma.load("org/tiny", dtype="float32")
    assert gemma.config.text.hidden_size == 64 and gemma.tokenizer is None
    assert unigemma.load_model("org/tiny@main", dtype="float32").config.text.num_hidden_layers == 2


def test_resolve_leaves_local_paths_alone(offline, tmp_path):
    assert hub.resolve(tmp_path) == tmp_path and hub.resolve(str(tmp_path)) == str(tmp_path)
    # `unigemma plan` asks for config.json alone
    assert hub.resolve("org/tiny", files=["config.json"]) == offline / "models--org--tiny" / "snapshots" / SHA


def test_not_cached_offline_is_a_clear_error(offline, capsys):
    with pytest.raises(CheckpointError, match=r"org/missing is not a local path, nor in the hub cache .*HF_HUB_OFFLINE "
                                              r"is set: run `unigemma pull org/missing`"):
        unigemma.load("org/missing")
    with pytest.raises(CheckpointError, match="org/tiny@other-branch is not a local path, nor in the hub cache"):
        unigemma.load("org/tiny@other-branch")
    assert main(["pull", "org/missing"]) == 2
    assert "error: org/missing is not a local path, nor in the hub cache" in capsys.readouterr().err


def test_pull_prints_the_local_path(offline, capsys):
    snapshot = offline / "models--org--tiny" / "snapshots" / SHA
    assert main(["pull", "org/tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(snapshot)
    gguf = offline / "models--org--tiny-GGUF" / "snapshots" / SHA
    for tag, name in [("Q4_K_M", "tiny-Q4_K_M.gguf"), ("Q8_0", "tiny-q8_0.gguf"), ("tiny-q8_0.gguf", "tiny-q8_0.gguf")]:
        assert main(["pull", f"org/tiny-GGUF:{tag}"]) == 0  # the projector is never the model
        assert capsys.readouterr().out.strip() == str(gguf / name)
    # offline, a tag picks among the files downloaded; one only listed is not there
    assert main(["pull", "org/tiny-GGUF:Q2_K"]) == 2
    err = capsys.readouterr().err
    assert "no .gguf file for 'Q2_K'" in err and "tiny-Q4_K_M.gguf" in err
    assert main(["pull", "org/tiny-GGUF:tiny-Q2_K.gguf"]) == 2
    assert "lacks some of its files" in capsys.readouterr().err
    assert main(["pull", "org/tiny-GGUF"]) == 2  # a GGUF repository needs a file or a tag
    assert "name its file: org/tiny-GGUF:FILE.gguf" in capsys.readouterr().err
    assert main(["pull", str(snapshot)]) == 2
    assert "is a local path" in capsys.readouterr().err


def test_pick_gguf_by_quant_tag():
    ref = HubRef("o/n", "Q4_0")
    assert hub._pick_gguf(["n-Q4_0.gguf", "n-Q4_0_L.gguf", "mmproj-Q4_0.gguf", "README.md"], ref) == "n-Q4_0.gguf"
    assert hub._pick_gguf(["sub/n.q4_0.gguf"], ref) == "sub/n.q4_0.gguf"
    with pytest.raises(CheckpointError, match="2 files match 'Q4_0'.*name one as o/n:FILE.gguf"):
        hub._pick_gguf(["a-Q4_0.gguf", "b-Q4_0.gguf"], ref)
    with pytest.raises(CheckpointError, match="has none"):
        hub._pick_gguf(["config.json"], ref)


def test_ls_lists_cached_models_with_their_size(offline, capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "SIZE", "REFS", "PATH"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"org/tiny", "org/tiny-GGUF"}
    assert rows["org/tiny"][2] == "main"
    assert rows["org/tiny"][-1] == str(offline / "models--org--tiny" / "snapshots" / SHA)
    assert rows["org/tiny"][1].endswith("M")  # the tiny checkpoint: tens of megabytes (its real vocabulary)


def test_ls_on_an_empty_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "none"))
    assert main(["ls"]) == 0
    assert "no models in the hub cache" in capsys.readouterr().err


def test_pull_in_a_fresh_process_honours_the_environment(offline):
    """The environment alone (as a user sets it), read by huggingface_hub when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline), PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "unigemma", "pull", "org/tiny-GGUF:Q4_K_M"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(offline / "models--org--tiny-GGUF" / "snapshots" / SHA / "tiny-Q4_K_M.gguf")
