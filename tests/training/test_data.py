"""Training data: `python -m train.prepare` (JSONL -> sharded token records) and the `sjd2_jax.training.data` loader.

The prepare tests use a tiny random Lumina-mGPT-layout checkpoint with the layout vocabulary and
a character-level tokenizer, imported with `convert import` (torch-marked); the loader tests build
datasets directly with `DatasetWriter` and need no checkpoint.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sjd2_jax.training import data as D
from sjd2_jax.training import prepare as P
from train.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[2]
V_LM = 300
GRID = 4  # 4x4 codes = 64x64 px for Lumina-mGPT (16 px per code, sizes in 32-px units)
N_CODES = 32  # image tokens in the synthetic Lumina vocabulary


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def lumina_ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    from sjd2_jax.io.importer import import_checkpoint

    from synthetic import add_layout_tokenizer, make_chameleon_checkpoint

    root = tmp_path_factory.mktemp("train_data_ckpt")
    make_chameleon_checkpoint(root / "src", layout="lumina", num_layers=1, vocab_size=V_LM)
    add_layout_tokenizer(root / "src", "chameleon")
    return Path(import_checkpoint(root / "src", root / "ours", progress=False)["out"])


def _record(caption, seed, h=GRID, w=GRID):
    rng = np.random.default_rng(seed)
    return {"caption": caption, "codes": rng.integers(0, N_CODES, (h, w)).tolist()}


CAPTIONS = [
    "a cat",
    "",
    "a red house by the sea at dusk",
    "x",
    "two dogs",
    "a very, very long caption: with punctuation!",
    "snow",
    "tree",
    "blue sky",
    "the end",
]


def _write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def _run_main(argv, capsys):
    rc = prepare_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.torch
def test_prepare_lumina(lumina_ckpt, tmp_path, capsys):
    from sjd2_jax import families

    records = [_record(c, k) for k, c in enumerate(CAPTIONS)]
    src = _write_jsonl(tmp_path / "in.jsonl", records[:4] + [""] + records[4:])  # blank line 5 is ignored
    out = tmp_path / "data"
    rc, stdout, err = _run_main([src, out, "--model", lumina_ckpt, "--shard-size", 4], capsys)
    assert rc == 0, err
    assert err == "" and "prepared 10 chameleon records (4x4 codes, 64x64 px)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.jsonl"]  # temp folder renamed

    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "sjd2-jax-data" and index["version"] == 1
    assert index["family"] == "chameleon" and index["head"] == "lm" and index["num_records"] == 10
    assert index["model"] == str(lumina_ckpt.resolve()) and index["vocab_size"] == V_LM
    assert [s["num_records"] for s in index["shards"]] == [4, 4, 2]
    assert index["skipped_lines"] == []

    model = P.load_model_meta(lumina_ckpt)
    plan = families.image_plan(model, 64)
    assert index["plan"] == {
        "height": 4,
        "width": 4,
        "pixel_height": 64,
        "pixel_width": 64,
        "prefix_len": 3,
        "num_generated": plan.num_generated,
    }
    ds = D.Dataset(out)
    assert len(ds) == 10 and ds.family == "chameleon"
    cond, _ = families.prompt_ids(model, CAPTIONS, plan)
    longest = max(len(c) for c in cond) + plan.total_tokens
    assert index["longest_record"] == longest
    assert ds.seq_len % 64 == 0 and ds.seq_len - 64 < longest <= ds.seq_len

    for k, rec in enumerate(records):
        r = ds.gather([k])
        n, toks, kind = int(r["lengths"][0]), r["tokens"][0], r["kind"][0]
        p = len(cond[k])
        assert n == p + plan.total_tokens
        assert toks[:p].tolist() == cond[k]  # the family prompt template, tokenized
        assert toks[p : p + 3].tolist() == list(plan.prefix)
        np.testing.assert_array_equal(plan.tokens_to_codes(toks[p:n]), np.array(rec["codes"]))
        assert (kind[:p] == D.KIND_PROMPT).all() and (kind[p : p + 3] == D.KIND_STRUCTURE).all()
        np.testing.assert_array_equal(kind[p + 3 : n], np.where(plan.free, D.KIND_IMAGE, D.KIND_STRUCTURE))
        assert (kind[p + 3 : n] == D.KIND_IMAGE).sum() == GRID * GRID
        assert (toks[n:] == D.PAD_ID).all() and (kind[n:] == D.KIND_PAD).all()
        one = ds[k]
        assert one["length"] == n and one["tokens"].tolist() == toks[:n].tolist()

    # The loader's masks are exactly the image-code positions.
    batch = next(D.Loader(ds, 5, seed=0))
    np.testing.assert_array_equal(batch["image_mask"], batch["kind"] == D.KIND_IMAGE)
    np.testing.assert_array_equal(batch["noisable"], batch["image_mask"])
    assert batch["image_mask"].sum() == 5 * GRID * GRID


@pytest.mark.torch
def test_prepare_null_caption_is_unconditional(lumina_ckpt, tmp_path, capsys):
    """A null caption gets the family's unconditional prompt (Lumina-mGPT: nothing before the image prefix)."""
    from sjd2_jax import families

    records = [_record("a cat", 0), _record(None, 1)]
    out = tmp_path / "data"
    rc, _, err = _run_main([_write_jsonl(tmp_path / "in.jsonl", records), out, "--model", lumina_ckpt], capsys)
    assert rc == 0, err
    model = P.load_model_meta(lumina_ckpt)
    plan = families.image_plan(model, 64)
    ds = D.Dataset(out)
    cond = ds[0]["tokens"].tolist()
    uncond = ds[1]["tokens"].tolist()
    assert len(cond) > plan.total_tokens and len(uncond) == plan.total_tokens
    assert uncond[:3] == list(plan.prefix)
    np.testing.assert_array_equal(plan.tokens_to_codes(np.array(uncond)), np.array(records[1]["codes"]))
    # A caption of another type is still a bad record.
    rc, _, err = _run_main(
        [
            _write_jsonl(tmp_path / "bad.jsonl", [{"caption": 3, "codes": [[1]]}]),
            tmp_path / "d2",
            "--model",
            lumina_ckpt,
        ],
        capsys,
    )
    assert rc == 2 and "must be a string or null" in err


@pytest.mark.torch
def test_prepare_seq_len_flag(lumina_ckpt, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", [_record(c, k) for k, c in enumerate(CAPTIONS[:3])])
    rc, _, err = _run_main([src, tmp_path / "d", "--model", lumina_ckpt, "--seq-len", 500], capsys)
    assert rc == 0, err
    ds = D.Dataset(tmp_path / "d")
    assert ds.seq_len == 500 and len(ds) == 3 and len(ds.index["shards"]) == 1


# One bad record per case: (JSONL line, words the message must contain).
BAD = {
    "invalid_json": ('{"caption": "a", "codes": [[1, 2]', "invalid JSON"),
    "not_object": ("[1, 2, 3]", "expected a JSON object"),
    "no_caption": (json.dumps({"codes": [[0] * GRID] * GRID}), 'missing "caption"'),
    "no_codes": (json.dumps({"caption": "a"}), 'missing "codes"'),
    "caption_type": (json.dumps({"caption": 3, "codes": [[0] * GRID] * GRID}), '"caption" must be a string'),
    "codes_flat": (json.dumps({"caption": "a", "codes": [0] * 16}), "2-D list"),
    "ragged": (json.dumps({"caption": "a", "codes": [[0] * 4, [0] * 4, [0] * 3, [0] * 4]}), "ragged"),
    "float_code": (json.dumps({"caption": "a", "codes": [[0.5] * 4] * 4}), "not an integer"),
    "out_of_range": (
        json.dumps({"caption": "a", "codes": [[0] * 4, [0, 0, N_CODES, 0], [0] * 4, [0] * 4]}),
        f"code {N_CODES} at [1][2] is out of range [0, {N_CODES})",
    ),
    "negative": (json.dumps({"caption": "a", "codes": [[-1] * 4] * 4}), "out of range"),
    "other_size": (json.dumps(_record("a", 0, 4, 6)), "4x6 code grid differs from the dataset's 4x4 (set by line 1)"),
    "too_long": (json.dumps(_record("a" * 200, 0)), "exceeds --seq-len 160"),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(BAD))
def test_prepare_reject_names_the_line(lumina_ckpt, tmp_path, capsys, case):
    line, words = BAD[case]
    good = [json.dumps(_record(c, k)) for k, c in enumerate(CAPTIONS[:4])]
    src = _write_jsonl(tmp_path / "in.jsonl", good[:2] + [line] + good[2:])
    out = tmp_path / "out" / "data"
    rc, stdout, err = _run_main([src, out, "--model", lumina_ckpt, "--seq-len", 160], capsys)
    assert rc == 2 and stdout == ""
    assert err.startswith("error: line 3: ") and words in err and err.count("\n") == 1, err
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []  # no OUT_DIR, no temp sibling


@pytest.mark.torch
def test_prepare_first_record_sets_size_and_bad_grid(lumina_ckpt, tmp_path, capsys):
    # 3x3 codes = 48 px: Lumina-mGPT sizes are multiples of 32 px.
    src = _write_jsonl(tmp_path / "in.jsonl", [_record("a", 0, 3, 3), _record("b", 1)])
    rc, _, err = _run_main([src, tmp_path / "d", "--model", lumina_ckpt], capsys)
    assert rc == 2 and err.startswith("error: line 1: a 3x3 code grid (48x48 px) is not a valid chameleon image")
    assert "multiple of 32 px" in err


@pytest.mark.torch
def test_prepare_skip_counts_and_lists_lines(lumina_ckpt, tmp_path, capsys):
    good = [json.dumps(_record(c, k)) for k, c in enumerate(CAPTIONS)]
    lines, bad_lines, kept = [], [], []
    for k, name in enumerate(sorted(BAD)):
        lines.append(good[k % len(good)])
        kept.append(k % len(good))
        lines.append(BAD[name][0])
        bad_lines.append(len(lines))
    src = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "data"
    rc, stdout, err = _run_main(
        [src, out, "--model", lumina_ckpt, "--seq-len", 160, "--on-error", "skip", "--shard-size", 5], capsys
    )
    assert rc == 0, err
    assert f"prepared {len(kept)} chameleon records" in stdout
    assert f"skipped {len(bad_lines)} bad records (lines {', '.join(map(str, bad_lines))})" in err
    for ln in bad_lines:
        assert f"skipped line {ln}: " in err
    index = json.loads((out / "index.json").read_text())
    assert index["skipped_lines"] == bad_lines and index["num_records"] == len(kept) and index["seq_len"] == 160

    # The kept records are the good ones, in input order.
    from sjd2_jax import families

    plan = families.image_plan(P.load_model_meta(lumina_ckpt), 64)
    ds = D.Dataset(out)
    for row, k in enumerate(kept):
        r = ds[row]
        codes = plan.tokens_to_codes(r["tokens"][-plan.total_tokens :])
        np.testing.assert_array_equal(codes, np.array(json.loads(good[k])["codes"]))


@pytest.mark.torch
def test_prepare_whole_run_errors(lumina_ckpt, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", [_record("a", 0)])
    (tmp_path / "exists").mkdir()
    rc, _, err = _run_main([src, tmp_path / "exists", "--model", lumina_ckpt], capsys)
    assert rc == 2 and "already exists" in err
    rc, _, err = _run_main([tmp_path / "missing.jsonl", tmp_path / "d", "--model", lumina_ckpt], capsys)
    assert rc == 2 and "missing.jsonl is not a file" in err
    rc, _, err = _run_main([src, tmp_path / "d", "--model", tmp_path], capsys)
    assert rc == 2 and err.startswith("error: ") and "not an sjd2-jax checkpoint" in err
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope", ""])
    rc, _, err = _run_main([bad, tmp_path / "d", "--model", lumina_ckpt, "--on-error", "skip"], capsys)
    assert rc == 2 and "no valid records (1 bad records skipped)" in err
    assert not (tmp_path / "d").exists()


def test_prepare_cli_help_and_bad_flags(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "train.prepare", *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("--help")
    assert r.returncode == 0 and r.stderr == ""
    for words in ("python -m train.prepare", "OUT_DIR", "--model", "--shard-size", "--on-error", "--seq-len"):
        assert words in r.stdout
    r = run("in.jsonl", tmp_path / "d", "--model", tmp_path, "--on-error", "maybe")
    assert r.returncode == 2 and "invalid choice: 'maybe'" in r.stderr and r.stdout == ""
    r = run("in.jsonl", tmp_path / "d")
    assert r.returncode == 2 and "the following arguments are required: --model" in r.stderr
    r = run("in.jsonl", tmp_path / "d", "--model", tmp_path, "--shard-size", "many")
    assert r.returncode == 2 and "--shard-size: invalid int value" in r.stderr
    assert not (tmp_path / "d").exists()


def _meta_checkpoint(folder, family, context=4096):
    """A parameter-less checkpoint folder (sjd2_config.json, hf_config.json, tokenizer.json): all that
    prepare reads. Emu3 with the layout vocabulary; Janus-Pro with a fixed 4x4 generation grid.
    `context`: max_position_embeddings."""
    from sjd2_jax.io.checkpoint import HF_CONFIG_FILE, write_config
    from sjd2_jax.model.config import ModelConfig

    from synthetic import emu3_layout_vocabulary, janus_vocabulary, write_tokenizer

    folder.mkdir()
    if family == "janus":
        vm = janus_vocabulary(128)
        cfg = ModelConfig(
            family="janus",
            vocab_size=128,
            hidden_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            intermediate_size=8,
            image_vocab_size=16,
            image_embed_dim=4,
            max_position_embeddings=context,
        )
        hf = {"vq_config": {"num_patches": 4}}
    else:
        vm = emu3_layout_vocabulary(V_LM)
        cfg = ModelConfig(
            family="emu3",
            vocab_size=V_LM,
            hidden_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            intermediate_size=8,
            max_position_embeddings=context,
        )
        hf = {"vocabulary_map": vm}
    write_config(folder, cfg)
    (folder / HF_CONFIG_FILE).write_text(json.dumps(hf))
    write_tokenizer(folder, vm)
    return folder


@pytest.mark.parametrize("family,grid,n_codes", [("emu3", (3, 5), 32), ("janus", (4, 4), 16)])
def test_prepare_emu3_janus(tmp_path, capsys, family, grid, n_codes):
    from sjd2_jax import families

    ckpt = _meta_checkpoint(tmp_path / "ckpt", family)
    rng = np.random.default_rng(0)
    recs = [{"caption": c, "codes": rng.integers(0, n_codes, grid).tolist()} for c in CAPTIONS[:3]]
    other = (grid[0] + 1, grid[1]) if family == "emu3" else (2, 2)  # Janus-Pro: fixed grid only
    bad_grid = {"caption": "a", "codes": np.zeros(other, int).tolist()}
    bad_code = {"caption": "a", "codes": np.full(grid, n_codes).tolist()}
    src = _write_jsonl(tmp_path / "in.jsonl", [bad_grid if family == "janus" else recs[0], *recs, bad_code])
    rc, _, err = _run_main([src, tmp_path / "d", "--model", ckpt, "--on-error", "skip"], capsys)
    assert rc == 0, err
    skipped = [1, 5] if family == "janus" else [5]
    assert f"lines {', '.join(map(str, skipped))})" in err
    if family == "janus":
        assert "skipped line 1: a 2x2 code grid (32x32 px) is not a valid janus image" in err
    ds = D.Dataset(tmp_path / "d")
    model = P.load_model_meta(ckpt)
    ppc = families.get_family(family).pixels_per_code
    plan = families.image_plan(model, (grid[0] * ppc, grid[1] * ppc))
    assert ds.index["head"] == plan.head == ("gen" if family == "janus" else "lm")
    rows = recs if family == "janus" else [recs[0], *recs]
    cond, _ = families.prompt_ids(model, [r["caption"] for r in rows], plan)
    assert len(ds) == len(rows)
    for k, rec in enumerate(rows):
        r = ds[k]
        p = len(cond[k])
        assert r["tokens"][:p].tolist() == cond[k] and (r["kind"][:p] == D.KIND_PROMPT).all()
        np.testing.assert_array_equal(plan.tokens_to_codes(r["tokens"][p:]), np.array(rec["codes"]))
        np.testing.assert_array_equal(r["kind"][p:], np.where(plan.free, D.KIND_IMAGE, D.KIND_STRUCTURE))


CONTEXT = 160  # max_position_embeddings of the long-record tests' checkpoint
ODD = {  # record -> words its per-line message must hold
    "long_caption": ({"caption": "a" * 20_000, "codes": [[1] * 5] * 3}, "exceeds the model's context of 160"),
    "over_context": ({"caption": "b" * 150, "codes": [[1] * 5] * 3}, "exceeds the model's context of 160"),
    "huge_id": (
        {"caption": "c", "codes": [[1] * 5, [1, 10**30, 1, 1, 1], [1] * 5]},
        "code 1000000000000000000000000000000 at [1][1] is out of range",
    ),
    "huge_digits": ('{"caption": "d", "codes": [[' + "9" * 5000 + "]]}", "invalid JSON"),
    "lone_surrogate": (
        '{"caption": "\\ud800", "codes": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]}',
        "not valid Unicode",
    ),
}


def _odd_lines():
    good = [
        {"caption": c, "codes": np.random.default_rng(k).integers(0, 32, (3, 5)).tolist()}
        for k, c in enumerate(CAPTIONS[:4])
    ]
    lines, where = [good[0]], {}
    for k, name in enumerate(sorted(ODD)):
        lines.append(ODD[name][0])
        where[name] = len(lines)
        lines.append(good[1 + k % 3])
    return lines, where


@pytest.mark.parametrize("case", sorted(ODD))
def test_prepare_rejects_odd_record_naming_its_line(tmp_path, capsys, case):
    ckpt = _meta_checkpoint(tmp_path / "ckpt", "emu3", context=CONTEXT)
    lines, _ = _odd_lines()
    src = _write_jsonl(tmp_path / "in.jsonl", [lines[0], ODD[case][0], lines[2]])
    rc, stdout, err = _run_main([src, tmp_path / "out" / "d", "--model", ckpt], capsys)
    assert rc == 2 and stdout == "", err
    assert err.startswith("error: line 2: ") and ODD[case][1] in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "d").exists()


def test_prepare_skips_odd_records_and_memory_stays_bounded(tmp_path, capsys):
    """One 20,000-character caption must not set the padded length of every record (4096 rows x 20k
    tokens would be 400 MB here, 30 GiB for a 2 MB caption): it is a bad record before any padding."""
    import tracemalloc

    ckpt = _meta_checkpoint(tmp_path / "ckpt", "emu3", context=CONTEXT)
    lines, where = _odd_lines()
    src = _write_jsonl(tmp_path / "in.jsonl", lines)
    tracemalloc.start()
    try:
        rc, _, err = _run_main([src, tmp_path / "d", "--model", ckpt, "--on-error", "skip"], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 0, err
    for name, line in where.items():
        assert f"skipped line {line}: {ODD[name][1]}" in err or (
            f"skipped line {line}: " in err and ODD[name][1] in err.split(f"skipped line {line}: ")[1].splitlines()[0]
        ), (name, err)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["skipped_lines"] == sorted(where.values())
    assert index["num_records"] == len(lines) - len(where)
    assert index["longest_record"] <= index["seq_len"] <= CONTEXT
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_prepare_names_the_record_the_tokenizer_refuses(tmp_path, capsys, monkeypatch):
    """A tokenizer failure inside a batch of records is pinned on its own line (the batch is
    retried record by record), not a traceback."""
    ckpt = _meta_checkpoint(tmp_path / "ckpt", "emu3", context=CONTEXT)
    real = P._Encoder.encode

    def refusing(self, captions, codes):
        if "BOOM" in captions:
            raise RuntimeError("tokenizer refused the text")
        return real(self, captions, codes)

    monkeypatch.setattr(P._Encoder, "encode", refusing)
    lines, _ = _odd_lines()
    src = _write_jsonl(tmp_path / "in.jsonl", [lines[0], {"caption": "BOOM", "codes": [[1] * 5] * 3}, lines[2]])
    rc, _, err = _run_main([src, tmp_path / "d", "--model", ckpt, "--on-error", "skip"], capsys)
    assert rc == 0, err
    assert "skipped line 2: cannot be tokenized (RuntimeError: tokenizer refused the text)" in err
    assert json.loads((tmp_path / "d" / "index.json").read_text())["num_records"] == 2
    rc, _, err = _run_main([src, tmp_path / "d2", "--model", ckpt], capsys)
    assert rc == 2 and err.startswith("error: line 2: cannot be tokenized") and err.count("\n") == 1


def test_prepare_seq_len_beyond_context_is_refused(tmp_path, capsys):
    ckpt = _meta_checkpoint(tmp_path / "ckpt", "emu3", context=CONTEXT)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"caption": "a", "codes": [[1] * 5] * 3}])
    rc, _, err = _run_main([src, tmp_path / "d", "--model", ckpt, "--seq-len", 161], capsys)
    assert rc == 2 and err.strip() == (
        "error: --seq-len 161 exceeds the model's context of 160 positions (max_position_embeddings)"
    )


# ----------------------------------------------------------------------------- loader


def _dataset(path, n=23, seq_len=16, shard_size=5, seed=0):
    """n records of random lengths; record i's tokens are 1000 * i + position (so rows are identifiable)."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    w = D.DatasetWriter(path, seq_len, shard_size)
    for i in range(n):
        L = int(rng.integers(4, seq_len + 1))
        kind = np.full(L, D.KIND_PROMPT, np.uint8)
        kind[2:] = rng.choice([D.KIND_IMAGE, D.KIND_STRUCTURE], L - 2, p=[0.8, 0.2])
        w.add(1000 * i + np.arange(L), kind)
    w.close({"family": "chameleon"})
    return D.Dataset(path)


@pytest.fixture
def ds(tmp_path):
    return _dataset(tmp_path / "ds")


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_dataset_reads_shards(ds, tmp_path):
    assert len(ds) == 23 and ds.seq_len == 16 and len(ds.index["shards"]) == 5
    assert all(isinstance(a, np.memmap) for arrs in ds._arrays for a in arrs.values())
    idx = [22, 0, 7, 7, 13]
    r = ds.gather(idx)
    for row, i in enumerate(idx):
        n = int(r["lengths"][row])
        assert r["tokens"][row, :n].tolist() == [1000 * i + j for j in range(n)]
        assert (r["tokens"][row, n:] == D.PAD_ID).all() and (r["kind"][row, n:] == D.KIND_PAD).all()
    assert ds[-1]["tokens"][0] == 22000
    with pytest.raises(IndexError):
        ds.gather([23])
    with pytest.raises(D.DataError, match=r"no index\.json"):
        D.Dataset(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(D.DataError, match="not an sjd2-jax dataset"):
        D.Dataset(tmp_path / "x")


def test_loader_batches_and_masks(ds):
    loader = D.Loader(ds, 4, seed=1)
    assert len(loader) == 5  # 23 // 4
    b = next(loader)
    assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
    assert b["kind"].dtype == np.uint8 and b["lengths"].dtype == np.int32
    np.testing.assert_array_equal(b["image_mask"], b["kind"] == D.KIND_IMAGE)
    np.testing.assert_array_equal(b["noisable"], b["kind"] == D.KIND_IMAGE)
    assert b["valid"].all() and b["index"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"][:, 0], 1000 * b["index"])


def test_loader_deterministic_and_seeded(ds):
    a = _take(D.Loader(ds, 4, seed=7), 12)
    b = _take(D.Loader(ds, 4, seed=7), 12)
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    c = _take(D.Loader(ds, 4, seed=8), 5)
    assert [x["index"].tolist() for x in a[:5]] != [x["index"].tolist() for x in c]
    # epochs are reshuffled
    assert [x["index"].tolist() for x in a[:5]] != [x["index"].tolist() for x in a[5:10]]
    # Pinned order: a change here breaks resuming runs from saved loader states.
    assert D.Loader(ds, 4, seed=7).permutation(0).tolist() == [
        6,
        21,
        20,
        3,
        12,
        11,
        4,
        10,
        13,
        9,
        14,
        15,
        22,
        18,
        0,
        2,
        17,
        8,
        7,
        5,
        1,
        19,
        16,
    ]
    assert a[0]["index"].tolist() == [6, 21, 20, 3]
    plain = _take(D.Loader(ds, 4, seed=7, shuffle=False), 2)
    assert plain[1]["index"].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("drop", [True, False])
def test_loader_each_record_once_per_epoch(ds, drop):
    loader = D.Loader(ds, 4, seed=3, drop_remainder=drop)
    assert len(loader) == (5 if drop else 6)
    for epoch in range(3):
        assert loader.state()["epoch"] == epoch and loader.state()["position"] == 0
        seen = []
        for b in _take(loader, len(loader)):
            seen += b["index"][b["valid"]].tolist()
        assert len(seen) == len(set(seen)) == (20 if drop else 23)
        if not drop:
            assert sorted(seen) == list(range(23))
    assert loader.state()["epoch"] == 3
    last = D.Loader(ds, 4, seed=3, drop_remainder=False, state={"epoch": 0, "position": 5})
    b = next(last)  # the padded last batch keeps the static shape
    assert b["valid"].tolist() == [True, True, True, False] and b["index"][3] == -1
    assert b["lengths"][3] == 0 and not b["image_mask"][3].any() and (b["kind"][3] == D.KIND_PAD).all()


def test_loader_num_epochs(ds):
    assert len(list(D.Loader(ds, 4, seed=0, num_epochs=2))) == 10


@pytest.mark.parametrize("k", [0, 3, 5, 7])
def test_loader_restore_continues_exactly(ds, k):
    ref = D.Loader(ds, 4, seed=11)
    _take(ref, k)
    state = json.loads(json.dumps(ref.state()))
    expected = _take(ref, 8)
    for restored in (D.Loader(ds, 4, seed=11, state=state), D.Loader(ds, 4, seed=11)):
        restored.restore(state)
        for x, y in zip(expected, _take(restored, 8), strict=True):
            _same(x, y)


def test_loader_restore_checks(ds):
    state = D.Loader(ds, 4, seed=1).state()
    with pytest.raises(ValueError, match="seed=1"):
        D.Loader(ds, 4, seed=2, state=state)
    with pytest.raises(ValueError, match="batch_size=4"):
        D.Loader(ds, 8, seed=1, state=state)
    with pytest.raises(ValueError, match="out of range"):
        D.Loader(ds, 4, seed=1, state={"epoch": 0, "position": 9})


@pytest.mark.parametrize("count", [2, 4])
def test_loader_process_slices_partition_global_batch(ds, count):
    glob = _take(D.Loader(ds, 8, seed=5, drop_remainder=False), 6)  # 3 epochs, last batches padded
    parts = [
        _take(D.Loader(ds, 8, seed=5, drop_remainder=False, process_index=i, process_count=count), 6)
        for i in range(count)
    ]
    for step, g in enumerate(glob):
        for key in g:
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), g[key], err_msg=key)
        assert all(p[step]["tokens"].shape == (8 // count, 16) for p in parts)
    # The state is global: a multi-process state restores into a single-process loader.
    src = D.Loader(ds, 8, seed=5, drop_remainder=False, process_index=1, process_count=count)
    _take(src, 4)
    dst = D.Loader(ds, 8, seed=5, drop_remainder=False, state=src.state())
    _same(next(dst), glob[4])


def test_loader_argument_checks(ds):
    with pytest.raises(ValueError, match="not divisible"):
        D.Loader(ds, 6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        D.Loader(ds, 4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no batch"):
        D.Loader(ds, 32, seed=0)
    assert len(D.Loader(ds, 32, seed=0, drop_remainder=False)) == 1
