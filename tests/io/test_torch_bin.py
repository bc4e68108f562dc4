"""pytorch_model*.bin reading: a pickle that carries code is refused, with a message that
says so and never suggests loading it unsafely."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from convert.__main__ import main  # noqa: E402
from sjd2_jax.io import torch_bin as tb  # noqa: E402


class _Payload:
    """Unpickling this would create `marker` (harmless, but proves code ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_bin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _Payload(folder.parent / "code-ran")}, str(path))
    return path


def test_pickled_code_is_refused_without_unsafe_advice(tmp_path):
    path = _evil_bin(tmp_path / "ck")
    with pytest.raises(tb.BinError) as e:
        tb.scan_folder(tmp_path / "ck")
    msg = str(e.value)
    assert msg.startswith(f"{path}: holds pickled code") and "refused" in msg, msg
    assert "open" in msg  # the global it would have called
    assert "weights_only" not in msg and "trusted" not in msg.lower(), msg
    assert not (tmp_path / "code-ran").exists()


def test_pickled_code_is_one_cli_line(tmp_path, capsys):
    _evil_bin(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model_type": "multi_modality"}))
    rc = main(["import", str(tmp_path / "ck"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "holds pickled code" in err, err
    assert "weights_only" not in err and not (tmp_path / "out").exists()


def test_plain_state_dict_reads(tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, str(tmp_path / "ck" / "pytorch_model.bin"))
    (info,) = tb.scan_folder(tmp_path / "ck")
    assert info.shape == (4,) and tb.Reader().read(info).tolist() == [0, 1, 2, 3]


def test_not_a_pickle_names_the_file(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    with pytest.raises(tb.BinError, match=r"pytorch_model\.bin: cannot be read as a PyTorch state dict") as e:
        tb.scan_folder(tmp_path / "ck")
    assert "weights_only" not in str(e.value) and "pickled code" not in str(e.value)
