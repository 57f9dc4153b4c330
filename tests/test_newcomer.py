"""What a new user trips over (issue 23): options that do one thing, params files that say what
they need, hints that work."""

from __future__ import annotations

import json

import h5py
import pytest
from smalldata import small_pipeline

from qbnorm_cli.cli import main


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_pipeline(tmp_path_factory.mktemp("small"))


def attr_json(path, name):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs[name])


# --- 1. --force only overwrites; --accept-mismatch accepts another gallery, and says so ------------

def normalise_perm(small, out, *extra):
    d = small["dir"]
    return ["normalise", "--queries", f"{small['data']}::/queries", "--gallery", d / "g_perm.npy",
            "--probe", d / "probe.h5", "-o", out, *extra]


def test_force_overwrites_but_never_accepts_another_gallery(cli, small, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"yesterday")
    code, _, err = cli(*normalise_perm(small, out, "--force"))
    assert code == 3 and "another gallery" in err and "--accept-mismatch" in err
    assert out.read_bytes() == b"yesterday"


def test_accept_mismatch_is_recorded(cli, small, tmp_path):
    out = tmp_path / "out.h5"
    doc = json.loads(cli.ok(*normalise_perm(small, out, "--accept-mismatch", "--json")))
    (warning,) = [w for w in doc["warnings"] if "another gallery" in w]
    assert "--accept-mismatch" in warning
    recorded = attr_json(out, "warnings")
    assert any("another gallery" in w and "accept_mismatch=True" in w for w in recorded)
    # the same gallery: nothing to accept, nothing recorded
    cli.ok("normalise", "--queries", f"{small['data']}::/queries", "--gallery", f"{small['data']}::/gallery",
           "--probe", small["dir"] / "probe.h5", "-o", out, "--force", "--accept-mismatch", "-q")
    assert not any("another gallery" in w for w in attr_json(out, "warnings"))


def test_export_accept_mismatch(cli, small, tmp_path):
    d = small["dir"]
    args = ["export", "--probe", d / "probe.h5", "--gallery", d / "g_perm.npy", "--method", "dis"]
    code, _, err = cli(*args, "-o", tmp_path / "x.h5", "--force")
    assert code == 3 and "--accept-mismatch" in err and not (tmp_path / "x.h5").exists()
    doc = json.loads(cli.ok(*args, "-o", tmp_path / "x.h5", "--accept-mismatch", "--json"))
    assert any("another gallery" in w for w in doc["warnings"])
    assert any("another gallery" in w for w in attr_json(tmp_path / "x.h5", "warnings"))
    cli.ok(*args, "--format", "npy", "-o", tmp_path / "x_npy", "--accept-mismatch", "-q")
    recipe = json.loads((tmp_path / "x_npy" / "recipe.json").read_text())
    assert any("another gallery" in w for w in recipe["warnings"])


def test_library_accept_mismatch(small):
    import warnings

    import qbnorm_cli
    from qbnorm_cli.errors import DataError

    d = small["dir"]
    queries = f"{small['data']}::/queries"
    with pytest.raises(DataError, match="accept_mismatch=True"):
        qbnorm_cli.normalise(queries, str(d / "g_perm.npy"), str(d / "probe.h5"), force=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qbnorm_cli.normalise(queries, str(d / "g_perm.npy"), str(d / "probe.h5"), accept_mismatch=True)
    assert any("another gallery" in str(w.message) for w in caught)


# --- 2. a params file records the banks it was tuned with, and probe --params says what to add ------

@pytest.fixture(scope="module")
def tuned(small):
    d, data = small["dir"], small["data"]
    params = d / "params.json"
    assert main([str(a) for a in ["tune", "--queries", f"{data}::/val_queries", "--gallery", f"{data}::/val_gallery",
                                  "--gt", f"{data}::/val_gt", "--bank", d / "bank.h5", "--gallery-bank",
                                  d / "gbank.h5", "--methods", "dbsn,dual-is", "--beta", "20", "-o", params,
                                  "-q"]]) == 0
    return params


def test_params_file_records_its_banks(small, tuned):
    doc = json.loads(tuned.read_text())
    assert doc["method"] in ("dbsn", "dual-is")
    banks = doc["banks"]
    assert set(banks) == {"bank", "gallery_bank"}
    with h5py.File(small["dir"] / "gbank.h5", "r") as h5:
        uuid = h5.attrs["uuid"]
    assert banks["gallery_bank"]["option"] == "gallery_bank"
    assert banks["gallery_bank"]["path"] == str((small["dir"] / "gbank.h5").resolve())
    assert banks["gallery_bank"]["identity"].startswith(uuid)


@pytest.mark.parametrize("method", ["dbsn", "dual-is"])
def test_probe_params_says_which_gallery_bank_to_add(cli, small, tuned, tmp_path, method):
    d = small["dir"]
    doc = json.loads(tuned.read_text())
    doc.update(method=method, gallery_beta=doc.get("gallery_beta") or 1.0)
    params = tmp_path / "params.json"
    params.write_text(json.dumps(doc))
    probe = ["probe", "--params", params, "--bank", d / "bank.h5", "--gallery", f"{small['data']}::/gallery"]
    code, _, err = cli(*probe, "-o", tmp_path / "p.h5")
    gbank = str((d / "gbank.h5").resolve())
    assert code == 2 and err.count("\n") == 1
    assert f"was tuned with --gallery-bank {gbank}" in err and f"add --gallery-bank {gbank}" in err
    assert doc["banks"]["gallery_bank"]["identity"] in err
    cli.ok(*probe, "--gallery-bank", d / "gbank.h5", "-o", tmp_path / "p.h5", "-q")
    # another gallery bank: a warning that the setting was tuned with another one
    out = cli.ok(*probe, "--gallery-bank", d / "bank.h5", "-o", tmp_path / "p2.h5", "--json")
    assert any("not the gallery bank" in w for w in json.loads(out)["warnings"])


def test_params_file_without_banks_still_reads(cli, small, tuned, tmp_path):
    """Files written before tune recorded its banks lack "banks": read, and the hint says so."""
    from qbnorm_cli import load_params

    doc = json.loads(tuned.read_text())
    del doc["banks"]
    doc["method"] = "dbsn"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert load_params(old)["banks"] == {}
    d = small["dir"]
    probe = ["probe", "--params", old, "--bank", d / "bank.h5", "--gallery", f"{small['data']}::/gallery"]
    code, _, err = cli(*probe, "-o", tmp_path / "p.h5")
    assert code == 2 and "does not record the bank it was tuned with" in err and "add --gallery-bank" in err
    cli.ok(*probe, "--gallery-bank", d / "gbank.h5", "-o", tmp_path / "p.h5", "-q")


def test_damaged_banks_record(small, tuned, tmp_path):
    from qbnorm_cli import load_params
    from qbnorm_cli.errors import DataError

    doc = json.loads(tuned.read_text())
    doc["banks"]["gallery_bank"]["option"] = "queries"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="banks gallery_bank"):
        load_params(bad)


# --- 8. options and hints that mislead --------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["probe", "--bank", "B", "--gallery", "G", "-o", "P", "--k", "1", "--k", "5"],
    ["normalise", "--probe", "P", "--sims", "S", "-o", "O", "--method", "is", "--method=dis"],
    ["normalise", "--probe", "P", "--sims", "S", "-o", "O", "--output", "O2"],
    ["evaluate", "S.h5", "--gt", "A", "--gt", "B"],
])
def test_a_single_valued_option_given_twice_is_refused(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "given 2 times; it takes one value" in err


def test_repeatable_options_and_repeated_flags_still_work(cli, small, tmp_path):
    d = small["dir"]
    doc = json.loads(cli.ok("probe", "--bank", d / "bank.h5", "--gallery", f"{small['data']}::/gallery",
                            "--beta", 5, "--beta", 20, "-o", tmp_path / "p.h5", "--json", "--json"))
    assert doc["betas"] == [5.0, 20.0]


# Every method on a probe without a gallery bank, Sinkhorn potentials or sorted scores: the message
# names what to probe again with, never a parameter to choose (a β₂ cannot make up for a missing bank).
MISSING = {"dual-is": ["--gallery-bank GB"], "dual-dis": ["--gallery-bank GB"], "sn": ["--sinkhorn"],
           "dbsn": ["--sinkhorn", "--gallery-bank GB"], "gc": ["--keep-sorted"], "mp": ["--method mp"],
           "dsl": ["--method dsl --topk-mean 10"]}


@pytest.mark.parametrize("extra", [[], ["--gallery-beta", "1"]])
def test_missing_statistics_say_what_to_probe_again_with(cli, small, tmp_path, extra):
    from qbnorm_cli import methods

    d = small["dir"]
    for method in methods.METHODS:
        out = tmp_path / f"{method}.h5"
        code, _, err = cli("normalise", "--queries", f"{small['data']}::/queries", "--gallery",
                           f"{small['data']}::/gallery", "--probe", d / "probe.h5", "--method", method, "-o", out,
                           *extra, "-q")
        if method not in MISSING:
            assert code == 0, err
            continue
        assert code == 2 and "probe again with" in err and "choose" not in err, (method, err)
        assert all(hint in err for hint in MISSING[method]), (method, err)


@pytest.mark.parametrize(("fmt", "name"), [("npy", "dis.npy"), ("npy", "dis.h5"), ("faiss", "dis.faiss")])
def test_a_directory_export_with_a_file_name_is_refused(cli, small, tmp_path, fmt, name):
    pytest.importorskip("faiss") if fmt == "faiss" else None
    d = small["dir"]
    args = ["export", "--probe", d / "probe.h5", "--gallery", f"{small['data']}::/gallery", "--format", fmt]
    code, _, err = cli(*args, "-o", tmp_path / name)
    assert code == 2 and err.count("\n") == 1 and "writes a directory" in err and f"_{fmt}" in err
    assert not (tmp_path / name).exists()
    cli.ok(*args, "-o", tmp_path / f"dis_{fmt}", "-q")
    assert (tmp_path / f"dis_{fmt}").is_dir()


# --- install hints that work for the way qbnorm was installed --------------------------------------

class FakeDistribution:
    def __init__(self, direct_url):
        self.direct_url = direct_url

    def read_text(self, name):
        assert name == "direct_url.json"
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.mark.parametrize(("direct_url", "hint"), [
    ({"url": "file:///home/me/qbnorm%20clone", "dir_info": {"editable": True}},
     "pip install -e '/home/me/qbnorm clone[plot]'"),
    ({"url": "file:///srv/qbnorm", "dir_info": {}}, "pip install '/srv/qbnorm[plot]'"),
    (None, "pip install 'qbnorm[plot]'"),  # from an index: no direct_url.json
    ({"url": "https://example.org/qbnorm-0.1.0.tar.gz", "archive_info": {}}, "pip install 'qbnorm[plot]'"),
])
def test_install_hint_follows_the_installation(monkeypatch, direct_url, hint):
    from importlib import metadata

    from qbnorm_cli import errors

    monkeypatch.setattr(metadata, "distributions", lambda name: [FakeDistribution(direct_url)])
    errors._installed_from.cache_clear()
    try:
        assert errors.install_hint("plot") == hint
        assert errors.install_hint("dask") == hint.replace("[plot]", "[dask]")
    finally:
        errors._installed_from.cache_clear()


def test_install_hint_without_metadata(monkeypatch):
    from importlib import metadata

    from qbnorm_cli import errors

    monkeypatch.setattr(metadata, "distributions", lambda name: [])
    errors._installed_from.cache_clear()
    try:
        assert errors.install_hint("faiss") == "pip install 'qbnorm[faiss]'"
    finally:
        errors._installed_from.cache_clear()


def test_every_extra_hint_is_the_one_function():
    """No module spells an install command itself: each missing extra's message comes from install_hint."""
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "qbnorm_cli"
    spelled = [str(p) for p in package.rglob("*.py") if "pip install" in p.read_text(encoding="utf-8")
               and p.name != "errors.py"]
    assert spelled == []
