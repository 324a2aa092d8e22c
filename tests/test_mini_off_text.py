"""bench/mini_off_text.py: a trained adapter taken off the text after the fact."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.mini_keep_text import input_covariance
from bench.mini_off_text import energy, main, media_lines, refit


def inputs(n: int, dims: slice, width: int = 12, seed: int = 0) -> torch.Tensor:
    """n random inputs [n, width] that use only the coordinates `dims`."""
    x = torch.zeros(n, width, dtype=torch.float64)
    x[:, dims] = torch.randn(n, dims.stop - dims.start, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    return x


def test_refit_is_the_weighted_least_squares_solution():
    """A' minimises ‖(A' − A) X_m‖² + W ‖A' X_t‖²: the same as lstsq on the stacked problem."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 12, generator=g, dtype=torch.float64)
    xm, xt = torch.randn(40, 12, generator=g, dtype=torch.float64), torch.randn(50, 12, generator=g, dtype=torch.float64)
    w = 2.5
    got = refit(a, xm.T @ xm / 40, xt.T @ xt / 50, w)
    stacked = torch.cat([xm / 40 ** 0.5, (w / 50) ** 0.5 * xt])  # rows: tokens, weighted as the covariances are
    target = torch.cat([xm / 40 ** 0.5 @ a.T, torch.zeros(50, 3, dtype=torch.float64)])
    want = torch.linalg.lstsq(stacked, target).solution.T
    assert torch.allclose(got, want, atol=1e-7)
    assert torch.allclose(refit(a, xm.T @ xm, xt.T @ xt, 0.0), a, atol=1e-6)  # W = 0: A kept


def test_refit_keeps_the_media_and_drops_the_text_where_they_do_not_overlap():
    """Media inputs on coordinates 0-5, text on 6-11: the re-fitted A acts on the media as A did
    and not at all on the text, whatever W; where they share coordinates, W trades one for the other."""
    a = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xm, xt = inputs(30, slice(0, 6)), inputs(30, slice(6, 12), seed=1)
    cm, ct = xm.T @ xm, xt.T @ xt
    for w in (0.1, 1.0, 100.0):
        got = refit(a, cm, ct, w)
        assert energy(b, got - a, cm) < 1e-9 * energy(b, a, cm)
        assert energy(b, got, ct) < 1e-12 * energy(b, a, ct)
    shared = inputs(30, slice(3, 9), seed=2)  # half the media's coordinates, half the text's
    cs = shared.T @ shared
    left = [energy(b, refit(a, cm, cs, w), cs) for w in (0.1, 1.0, 10.0)]
    lost = [energy(b, refit(a, cm, cs, w) - a, cm) for w in (0.1, 1.0, 10.0)]
    assert left[0] > left[1] > left[2] and lost[0] < lost[1] < lost[2]


def test_energy_is_the_updates_squared_norm_over_the_tokens():
    g = torch.Generator().manual_seed(4)
    a, b, x = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), torch.randn(9, 5, generator=g)
    assert energy(b, a, (x.T @ x).double()) == pytest.approx(float(((b @ a @ x.T) ** 2).sum()), rel=1e-5)


def test_input_covariance_unit_weighs_every_token_alike():
    """With `unit`, a token of huge norm counts as much as any other (the <bos> and sink inputs
    would otherwise be most of the covariance)."""
    layer = torch.nn.Linear(4, 2)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 300.0, 0, 0], [0, 0, 2.0, 0]])
    cov, n = input_covariance({"l": layer}, lambda: layer(x))
    assert n == 3 and float(cov["l"][1, 1]) == pytest.approx(90000.0)
    unit, _ = input_covariance({"l": layer}, lambda: layer(x), unit=True)
    assert torch.allclose(unit["l"], torch.diag(torch.tensor([1.0, 1, 1, 0], dtype=torch.float64)))


def test_media_lines_keep_pictures_and_sounds_only(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "plain text"}]},
             {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": "which colour?"}]}]},
             {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]},
             {"messages": ["not a message", {"role": "user", "content": ["not a part", 3]}]}, [1, 2]]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    got = media_lines(f, 10, seed=0)
    assert len(got) == 2 and all(isinstance(r["messages"][0]["content"], list) for r in got)
    f.write_text(json.dumps(lines[0]))
    with pytest.raises(SystemExit, match="no line holds a picture or a sound"):
        media_lines(f, 10, seed=0)


@pytest.mark.parametrize("extra, message", [
    ([], "one of the arguments --keep-text --text-weight is required"),
    (["--text-weight", "1"], "--text-weight needs --media"),
    (["--text-weight", "1,-2", "--media", "M"], "weights are numbers >= 0"),
    (["--keep-text", "1.5"], "in \\[0, 1\\)"),
    (["--keep-text", "0.01", "--out", "A"], "--out must differ from --adapter"),
])
def test_arguments_are_refused_before_anything_loads(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "M").mkdir()
    (tmp_path / "M" / "config.json").write_text("{}")
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "adapter_config.json").write_text("{}")
    args = ["--model", "M", "--adapter", "A", "--out", "O"] + extra
    with pytest.raises(SystemExit):
        main(args)
    assert re.search(message, capsys.readouterr().err)
