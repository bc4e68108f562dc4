"""Shared assertions for the command-line error contract of `python -m convert`."""

from pathlib import Path

from convert.__main__ import main


def expect_cli_error(argv, capsys, *needles) -> str:
    """Run the CLI in-process; require exit != 0, one `error:` line naming `needles`, and no
    new entry (output or temporary folder) next to the requested output folder."""
    out_dir = Path(argv[2])
    before = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    after = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    assert after == before, after - before
    return err
