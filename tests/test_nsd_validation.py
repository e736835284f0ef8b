"""The NSD converter refuses damaged inputs before it converts the first session (issue 19): one error naming the
file and the field, never trials silently zeroed or dropped. Each test damages a copy of the fake NSD."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from neurovision.data.store import Store, StoreError
from neurovision.sources import nsd
from tests.fakes.nsd import make_fake_nsd
from tests.helpers import run_cli

TPS = 12  # trials per session in the fake
P = 4


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_nsd(tmp_path_factory.mktemp("nsd"), subjects=(1, 2), n_sessions=2, trials_per_session=TPS)


@pytest.fixture
def root(fake: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fake, tmp_path / "nsd"))


@pytest.fixture
def no_session_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a session's betas are read: the error must come before the conversion starts."""
    def read(path: Path) -> np.ndarray:
        raise AssertionError(f"{path}: a session was converted before the bad input was found")

    monkeypatch.setattr(nsd, "_read_betas", read)


def _prepare(root: Path, tmp: Path, **kw: object) -> Path:
    return nsd.prepare(root, tmp / "x.h5", **{"subjects": [1, 2], "patch_size": P, **kw})  # type: ignore[arg-type]


def _resave(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data,
                             img.affine if affine is None else affine), str(path))


# --------------------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("which", ["nsdgeneral", "brainmask"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_affine(root: Path, tmp_path: Path, no_session_read: None, which: str, bad: float) -> None:
    """Used to zero all of the subject's trials silently (the mask mapped nowhere)."""
    p = nsd.nsdgeneral_path(root, 2) if which == "nsdgeneral" else nsd.brainmask_path(root, 2)
    a = nib.load(str(p)).affine.copy()
    a[1, 3] = bad
    _resave(p, affine=a)
    with pytest.raises(StoreError, match=rf"subj02.*{p.name}: field 'affine': 1 NaN/inf"):
        _prepare(root, tmp_path)
    assert not (tmp_path / "x.h5").exists()


def test_nan_in_a_float_mask(root: Path, tmp_path: Path, no_session_read: None) -> None:
    p = nsd.brainmask_path(root, 1)
    data = np.asarray(nib.load(str(p)).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    _resave(p, data=data)
    with pytest.raises(StoreError, match=rf"{p.name}: field 'brainmask': 1 NaN/inf voxels"):
        _prepare(root, tmp_path)


# --------------------------------------------------------------------------------------------- foreign files
@pytest.mark.parametrize("which", ["nsdgeneral", "brainmask"])
def test_text_file_as_nifti(root: Path, tmp_path: Path, no_session_read: None, which: str) -> None:
    """Used to be a nibabel traceback (a brain mask: only after the earlier subjects' sessions were converted)."""
    p = nsd.nsdgeneral_path(root, 2) if which == "nsdgeneral" else nsd.brainmask_path(root, 2)
    p.write_text("not a NIfTI volume\n")
    with pytest.raises(StoreError, match=rf"{p.name}: field '{which}': not a readable NIfTI volume"):
        _prepare(root, tmp_path)


def test_corrupt_stimuli_file_fails_before_any_session(root: Path, tmp_path: Path, no_session_read: None) -> None:
    """Used to fail after every session was converted, with a traceback naming no file."""
    p = nsd.stimuli_path(root)
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(StoreError, match=r"nsd_stimuli\.hdf5: field '<file>': not a readable HDF5 file"):
        _prepare(root, tmp_path)


def test_stimuli_file_without_images(root: Path, tmp_path: Path, no_session_read: None) -> None:
    p = nsd.stimuli_path(root)
    with h5py.File(p, "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(StoreError, match=r"nsd_stimuli\.hdf5: field 'imgBrick': missing dataset"):
        _prepare(root, tmp_path)


def test_text_file_as_stim_info(root: Path, tmp_path: Path, no_session_read: None) -> None:
    p = nsd.stim_info_path(root)
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(StoreError, match=r"nsd_stim_info_merged\.csv: field '"):
        _prepare(root, tmp_path)


# --------------------------------------------------------------------------------------------- trial counts
def test_missing_last_session_is_an_error_unless_fewer_are_asked(root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Used to drop the session's trials silently (sessions=None took the files found)."""
    nsd.betas_path(root, 2, 2).unlink()
    with monkeypatch.context() as m:
        m.setattr(nsd, "_read_betas", lambda p: pytest.fail(f"{p}: converted before the missing session was found"))
        with pytest.raises(FileNotFoundError, match=r"subj02.*betas_session02\.hdf5: field 'betas': file not found "
                                                    r"\(subject 2 did 2 sessions .* 1 found; .*--sessions 1"):
            _prepare(root, tmp_path)
    s = Store(_prepare(root, tmp_path, sessions=1))  # --sessions asks for fewer: fine
    assert len(s) == 2 * TPS and set(s.trials["session"].tolist()) == {1}
    # a gap (session 2 of 3 missing) and more sessions than the design holds stay errors
    three = make_fake_nsd(tmp_path / "nsd3", subjects=(1,), n_sessions=3, trials_per_session=TPS)
    nsd.betas_path(three, 1, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"betas_session02\.hdf5: field 'betas'"):
        nsd.prepare(three, tmp_path / "y.h5", subjects=[1], patch_size=P)
    shutil.copy(nsd.betas_path(root, 1, 2), nsd.betas_path(root, 1, 3))
    with pytest.raises(StoreError, match=r"nsd_expdesign\.mat: field 'masterordering'"):
        _prepare(root, tmp_path, subjects=[1])


# --------------------------------------------------------------------------------------------- the command
def test_cli_reports_one_line_exit_2(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nsd.nsdgeneral_path(root, 1).write_text("text\n")
    code = run_cli(["prepare", "nsd", "--root", str(root), "--out", str(tmp_path / "x.h5"), "--subjects", "[1]",
                    "--patch_size", str(P)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert "nsdgeneral.nii.gz: field 'nsdgeneral'" in err[0] and "Traceback" not in err[0]
