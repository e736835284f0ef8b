"""The tool subcommands take what people type (issue 20, item 8): argparse habits (space-separated lists, bare
boolean flags, ``--no_X``, ``-``/``_`` spellings) parse to the same values as the jsonargparse forms
(``--subjects [1,2]``, ``--json true``, ``--force=false``), which keep working; ``--help`` shows the habits and
errors stay one line, exit 2. One test per subcommand, plus help, errors and the rewrite's edge cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from neurovision.cli import USER_ERROR_EXIT, inspect_parser, localize_parser, prepare_parser
from neurovision.cli.habits import normalise
from tests.helpers import run_cli


def _values(ns: Any) -> dict:
    """A parsed namespace (argparse or jsonargparse) as a plain dict, without jsonargparse's bookkeeping."""
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(vars(ns))
    d.pop("__path__", None)
    for v in d.values():
        if isinstance(v, dict):
            v.pop("__path__", None)
    return d


def same(parser: Any, *forms: list[str]) -> dict:
    """Every form parses, and to the same values; returns them."""
    parsed = [_values(parser.parse_args(f)) for f in forms]
    for f, p in zip(forms[1:], parsed[1:], strict=True):
        assert p == parsed[0], f"{f} -> {p}\n!= {forms[0]} -> {parsed[0]}"
    return parsed[0]


# --------------------------------------------------------------------------------------------- per subcommand
def test_prepare_sources(tmp_path: Path) -> None:
    from neurovision.sources import registry

    p = prepare_parser(registry())
    base = ["nsd", "--root", "r", "--out", "o.h5"]
    v = same(p, [*base, "--subjects=[1,2,5,7]", "--zscore=false", "--force=true"],  # jsonargparse
             [*base, "--subjects", "1", "2", "5", "7", "--no_zscore", "--force"],  # the command
             [*base, "--subjects", "[1, 2, 5, 7]", "--no-zscore", "--force", "true"],
             [*base, "--force", "yes", "--subjects", "1", "2", "5", "7", "--zscore", "false"])
    assert v["nsd"]["subjects"] == [1, 2, 5, 7] and v["nsd"]["zscore"] is False and v["nsd"]["force"] is True
    v = same(p, [*base, "--subjects=[3]", "--force=false"], [*base, "--subjects", "3", "--force", "false"],
             [*base, "--subjects=3"])
    assert v["nsd"]["subjects"] == [3] and v["nsd"]["force"] is False and v["nsd"]["zscore"] is True
    bb = ["braintreebank", "--root", "r", "--movies", "m", "--out", "o.h5"]
    v = same(p, [*bb, "--subjects=[1]", "--trials=[0,2]", "--force=true"],
             [*bb, "--subjects", "1", "--trials", "0", "2", "--force"])
    assert v["braintreebank"]["trials"] == [0, 2]
    v = same(p, ["phantom", "--out", "o.h5", "--n_subjects", "2", "--force=true"],
             ["phantom", "--out", "o.h5", "--n-subjects", "2", "--force"])
    assert v["phantom"]["n_subjects"] == 2


def test_prepare_passes_the_habit_values_to_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``neurovision prepare``: the source receives the same arguments from either form."""
    import neurovision.sources as sources

    calls: list[dict] = []

    def nsd(out: Path, subjects: list[int] = [1, 2, 5, 7], zscore: bool = True,  # noqa: B006 - the real default
            force: bool = False) -> Path:
        """A stand-in for the NSD converter."""
        calls.append({"out": str(out), "subjects": subjects, "zscore": zscore, "force": force})
        return out

    monkeypatch.setattr(sources, "registry", lambda: {"nsd": nsd})
    out = str(tmp_path / "s.h5")
    assert run_cli(["prepare", "nsd", "--out", out, "--subjects", "1", "2", "--no_zscore", "--force"]) == 0
    assert run_cli(["prepare", "nsd", "--out", out, "--subjects", "[1,2]", "--zscore", "false", "--force=true"]) == 0
    assert calls[0] == calls[1] == {"out": out, "subjects": [1, 2], "zscore": False, "force": True}


def test_inspect(tiny_store: Path, capsys: pytest.CaptureFixture) -> None:
    p = inspect_parser()
    v = same(p, [str(tiny_store), "--json", "true", "--verify=false"], [str(tiny_store), "--json"],
             ["--json", str(tiny_store)], [str(tiny_store), "--json=yes", "--verify", "false"])
    assert v["json"] is True and v["verify"] is False and v["store"] == str(tiny_store)
    capsys.readouterr()
    assert run_cli(["inspect", str(tiny_store), "--json"]) == 0  # the command
    bare = capsys.readouterr().out
    assert run_cli(["inspect", str(tiny_store), "--json", "true"]) == 0
    assert capsys.readouterr().out == bare and json.loads(bare)["trials"] > 0


def test_localize() -> None:
    p = localize_parser()
    base = ["--out", "o"]
    v = same(p, [*base, "--ckpt", "a.ckpt", "--ckpt", "b.ckpt", "--subjects", "sub-01", "sub-02", "--concepts", "red",
                 "--no-relu", "--batch-size", "8", "--run-config", "c.yaml"],
             [*base, "--ckpt", "[a.ckpt, b.ckpt]", "--subjects", "[sub-01,sub-02]", "--concepts=[red]",
              "--no_relu", "true", "--batch_size=8", "--run_config", "c.yaml"],
             [*base, "--ckpt=[a.ckpt,b.ckpt]", "--subjects=[sub-01,sub-02]", "--concepts", "[red]", "--no-relu=yes",
              "--batch-size=8", "--run-config=c.yaml"])
    assert v["ckpt"] == ["a.ckpt", "b.ckpt"] and v["subjects"] == ["sub-01", "sub-02"] and v["no_relu"] is True
    v = same(p, ["--ckpt", "a.ckpt", *base], ["--ckpt", "a.ckpt", *base, "--no-relu=false"],
             ["--ckpt", "a.ckpt", *base, "--no_relu", "false"])
    assert v["no_relu"] is False and v["batch_size"] == 64


def test_sweep() -> None:
    from neurovision.cli.sweep import parser as _parser

    p = _parser()
    v = same(p, ["s.yaml", "--dry_run", "--aggregate_only"], ["s.yaml", "--dry_run", "true", "--aggregate_only=true"],
             ["--dry-run=yes", "s.yaml", "--aggregate-only", "true"])
    assert v["dry_run"] is True and v["aggregate_only"] is True and v["sweep"] == "s.yaml"
    v = same(p, ["s.yaml", "--parallel", "2"], ["s.yaml", "--dry_run=false", "--parallel=2"],
             ["s.yaml", "--dry_run", "false", "--aggregate_only", "no", "--parallel", "2"])
    assert v["dry_run"] is False and v["parallel"] == 2


def test_encode() -> None:
    from neurovision.cli.encode import parser as _parser

    p = _parser()
    base = ["--store", "s.h5", "--models", "{}"]
    v = same(p, [*base, "--subjects=[sub_1,sub_2]", "--event_sets=[vision]", "--progress=false",
                 "--statistics.contiguous=true", "--regression.alphas=[1.0,10.0]"],
             [*base, "--subjects", "sub_1", "sub_2", "--event_sets", "vision", "--no_progress",
              "--statistics.contiguous", "--regression.alphas", "1", "10"],
             [*base, "--subjects", "[sub_1, sub_2]", "--event-sets", "vision", "--progress", "false",
              "--statistics.contiguous", "yes", "--regression.alphas", "[1, 10]"])
    assert v["subjects"] == ["sub_1", "sub_2"] and v["event_sets"] == ["vision"] and v["progress"] is False
    assert v["statistics"]["contiguous"] is True and v["regression"]["alphas"] == [1.0, 10.0]
    v = same(p, [*base, "--progress=true", "--subjects=null"], [*base, "--progress"], [*base, "--subjects", "null"])
    assert v["progress"] is True and v["subjects"] is None


def test_report() -> None:
    from neurovision.cli.report import parser as _parser

    p = _parser()
    v = same(p, ["runs/x", "--quiet"], ["runs/x", "--quiet", "true"], ["runs/x", "--quiet=yes"],
             ["--quiet", "true", "runs/x"])
    assert v == {"dir": "runs/x", "out": None, "quiet": True}
    v = same(p, ["runs/x"], ["runs/x", "--quiet=false"], ["runs/x", "--quiet", "false"])
    assert v["quiet"] is False


# --------------------------------------------------------------------------------------------- help, errors
@pytest.mark.parametrize(("args", "shown"), [
    (["prepare", "nsd", "--help"], ["--no_zscore = false", "also --subjects A B ...", "also bare --force = true"]),
    (["inspect", "--help"], ["also bare --json = true"]),
    (["localize", "--help"], ["--concepts [A,B]", "--no-relu true|false"]),
    (["sweep", "--help"], ["--dry_run true|false"]),
    (["encode", "--help"], ["--no_progress = false", "also --subjects A B ..."]),
    (["report", "--help"], ["--quiet true|false"]),
])
def test_help_shows_the_habits(args: list[str], shown: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(args) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps
    for s in shown:
        assert s in out, s


@pytest.mark.parametrize(("args", "names"), [
    (["prepare", "nsd", "--root", "r", "--out", "o.h5", "--subjects", "1", "abc"], ["subjects", "abc"]),
    (["prepare", "nsd", "--root", "r", "--out", "o.h5", "--zscore", "maybe"], ["zscore", "maybe"]),
    (["inspect", "x.h5", "--json", "maybe"], ["maybe"]),  # inspect has a positional: `maybe` may be the store
    (["localize", "--ckpt", "a.ckpt", "--out", "o", "--no-relu=maybe"], ["--no-relu", "maybe"]),
    (["localize", "--ckpt", "a.ckpt", "--out", "o", "--no-relu", "maybe"], ["--no-relu", "maybe"]),
    (["sweep", "s.yaml", "--dry_run", "maybe"], ["maybe"]),
    (["encode", "--store", "s.h5", "--models", "{}", "--statistics.n_boot", "1", "x"], ["x"]),
    (["report", "d", "--bogus"], ["--bogus"]),
])
def test_errors_stay_one_line(args: list[str], names: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(args) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "usage:" not in err and len(err.splitlines()) == 1, err
    for n in names:
        assert n in err, (n, err)


def test_the_rewrite_leaves_alone_what_it_does_not_know() -> None:
    p = inspect_parser()
    assert normalise(p, ["s.h5", "--json", "--", "--json"]) == ["s.h5", "--json=true", "--", "--json"]
    assert normalise(p, ["s.h5", "--jsn", "true"]) == ["s.h5", "--jsn", "true"]  # the parser reports it
    assert normalise(p, ["--plot", "true", "s.h5"]) == ["--plot", "true", "s.h5"]  # a path named true
    from neurovision.cli.encode import parser as _parser

    assert normalise(_parser(), ["--regression.alphas", "-1", "2", "--progress"]) == [
        "--regression.alphas=[]", "--regression.alphas+=-1", "--regression.alphas+=2", "--progress=true"]
