"""Pre-tokenized training data: the on-disk format, its writer, and a deterministic loader.

On-disk format (version 1), written by `python -m train.prepare`:

    DATA_DIR/
      index.json
      shard-00000.tokens.npy    int32 [n, seq_len]  token ids, right-padded with PAD_ID (0)
      shard-00000.lengths.npy   int32 [n]           real tokens per record (the rest is padding)
      shard-00000.kind.npy      uint8 [n, seq_len]  what each position holds (KIND_* below)
      shard-00001.tokens.npy ...

Each array is a plain `.npy` file (not `.npz`) so the loader can memory-map it.

index.json:

    {"format": "sjd2-jax-data", "version": 1,
     "family": "chameleon" | "emu3" | "janus",
     "head": "lm" | "gen",          # "gen" (Janus-Pro): image positions hold VQ codes for the
                                    # generation head / embedding, not ids of the text vocabulary
     "seq_len": T, "num_records": N, "pad_id": 0,
     "kinds": {"0": "pad", "1": "prompt", "2": "image", "3": "structure"},
     "shards": [{"name": "shard-00000", "num_records": n, "tokens": "shard-00000.tokens.npy",
                 "lengths": "shard-00000.lengths.npy", "kind": "shard-00000.kind.npy"}, ...],
     "model": source checkpoint folder (absolute path), "vocab_size": V,
     "plan": {"height": h, "width": w,                # image code grid
              "pixel_height": H, "pixel_width": W,    # image size in pixels
              "prefix_len": len(plan.prefix), "num_generated": plan.num_generated},
     "source": input JSONL path, "skipped_lines": [line numbers of skipped bad records]}

Record layout (one row, positions 0..length-1, padding after):

    prompt_ids(model, caption, plan)[0]     kind 1 (family template + tokenizer; for Emu3 this
                                                     includes the <|image start|> "h*w" <|image token|> prefix)
    plan.prefix                             kind 3 (Lumina-mGPT: image start, height, width tokens)
    plan.codes_to_tokens(codes)             kind 2 at image codes, kind 3 at forced structure tokens
                                                     (end-of-line, end-of-image, ...)

So `plan.tokens_to_codes(tokens[p : p + plan.total_tokens])` with p = the prompt length gives
the codes back. All records of one dataset share one image size (one plan).

Loader. `Dataset(path)` reads the index and memory-maps the shards; `Loader` draws global batches
of `batch_size` records in a per-epoch permutation seeded by (seed, epoch), and each process takes
its contiguous slice of rows [i * B / P, (i + 1) * B / P) of every global batch. Its state is two
integers (epoch, batches consumed in that epoch), the same on every process, so it can be saved
with the model checkpoint from any one process and restored under another process count.

Why not grain: what training needs is small (and one dependency fewer): random
access to fixed-length rows (memory-mapped `.npy` gives that with no worker processes), one global
order that every host computes alike, per-host slices, and a resumable two-integer state. This
module does exactly that in ~200 lines of numpy, deterministically and without background threads;
wrap the iterator in a prefetch thread if host input ever shows up in profiles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FORMAT = "sjd2-jax-data"
VERSION = 1
INDEX_FILE = "index.json"
PAD_ID = 0
KIND_PAD, KIND_PROMPT, KIND_IMAGE, KIND_STRUCTURE = 0, 1, 2, 3
KIND_NAMES = {KIND_PAD: "pad", KIND_PROMPT: "prompt", KIND_IMAGE: "image", KIND_STRUCTURE: "structure"}
ARRAYS = ("tokens", "lengths", "kind")


class DataError(Exception):
    """A dataset folder that is missing, malformed or inconsistent."""


# ----------------------------------------------------------------------------- writing


class DatasetWriter:
    """Writes fixed-length records into shards of `shard_size`; `close(meta)` writes index.json.

    `add(tokens, kind)` takes one record's unpadded int token ids and uint8 kinds (equal length,
    at most seq_len). The folder must exist; the writer does not make writes atomic (the caller
    writes into a temporary folder and renames it).
    """

    def __init__(self, out_dir, seq_len: int, shard_size: int = 4096):
        if seq_len < 1 or shard_size < 1:
            raise ValueError(f"seq_len and shard_size must be positive, got {seq_len} and {shard_size}")
        self.out = Path(out_dir)
        self.seq_len, self.shard_size = int(seq_len), int(shard_size)
        self.shards: list[dict] = []
        self.num_records = 0
        self._new_buffer()

    def _new_buffer(self):
        self._tokens = np.full((self.shard_size, self.seq_len), PAD_ID, np.int32)
        self._kind = np.zeros((self.shard_size, self.seq_len), np.uint8)
        self._lengths = np.zeros((self.shard_size,), np.int32)
        self._n = 0

    def add(self, tokens, kind) -> None:
        t = np.asarray(tokens, np.int32).reshape(-1)
        k = np.asarray(kind, np.uint8).reshape(-1)
        if t.shape != k.shape:
            raise ValueError(f"tokens and kind differ in length: {t.shape[0]} vs {k.shape[0]}")
        if t.shape[0] > self.seq_len:
            raise ValueError(f"record of {t.shape[0]} tokens exceeds seq_len {self.seq_len}")
        n = self._n
        self._tokens[n, : t.shape[0]] = t
        self._kind[n, : t.shape[0]] = k
        self._lengths[n] = t.shape[0]
        self._n += 1
        self.num_records += 1
        if self._n == self.shard_size:
            self._flush()

    def _flush(self):
        if not self._n:
            return
        name = f"shard-{len(self.shards):05d}"
        entry = {"name": name, "num_records": self._n}
        for key, arr in (("tokens", self._tokens), ("lengths", self._lengths), ("kind", self._kind)):
            fname = f"{name}.{key}.npy"
            np.save(self.out / fname, np.ascontiguousarray(arr[: self._n]))
            entry[key] = fname
        self.shards.append(entry)
        self._new_buffer()

    def close(self, meta: dict | None = None) -> dict:
        """Flush the last shard and write index.json (meta adds family, plan, model, ...). Returns the index."""
        self._flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            **(meta or {}),
            "seq_len": self.seq_len,
            "num_records": self.num_records,
            "pad_id": PAD_ID,
            "kinds": {str(k): v for k, v in KIND_NAMES.items()},
            "shards": self.shards,
        }
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return index


# ----------------------------------------------------------------------------- reading


class Dataset:
    """A prepared dataset folder: index metadata plus memory-mapped shards.

    `len(ds)` records; `ds.gather(indices)` -> {"tokens", "lengths", "kind"} for global record
    indices (any order, repeats allowed); `ds[i]` one record, unpadded.
    """

    def __init__(self, path):
        self.path = Path(path)
        f = self.path / INDEX_FILE
        if not f.is_file():
            raise DataError(
                f"{self.path} is not a prepared dataset (no {INDEX_FILE}); make one with `python -m train.prepare`"
            )
        try:
            index = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{f}: invalid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(
                f"{f}: not an sjd2-jax dataset (format {index.get('format') if isinstance(index, dict) else None!r})"
            )
        if index.get("version") != VERSION:
            raise DataError(f"{f}: unsupported dataset version {index.get('version')!r} (this code reads {VERSION})")
        self.index = index
        self.seq_len = int(index["seq_len"])
        self.family = index.get("family")
        self.plan = dict(index.get("plan") or {})
        self._arrays: list[dict[str, np.ndarray]] = []
        counts = []
        for sh in index["shards"]:
            arrs = {}
            for key in ARRAYS:
                p = self.path / sh[key]
                if not p.is_file():
                    raise DataError(f"{self.path}: shard file {sh[key]} is missing")
                arrs[key] = np.load(p, mmap_mode="r")
            n = int(sh["num_records"])
            ok = (
                arrs["tokens"].shape == (n, self.seq_len)
                and arrs["kind"].shape == (n, self.seq_len)
                and arrs["lengths"].shape == (n,)
                and arrs["tokens"].dtype == np.int32
                and arrs["kind"].dtype == np.uint8
                and arrs["lengths"].dtype == np.int32
            )
            if not ok:
                raise DataError(
                    f"{self.path}: shard {sh['name']} arrays do not match the index "
                    f"({n} records of length {self.seq_len}: int32 tokens, int32 lengths, uint8 kind)"
                )
            self._arrays.append(arrs)
            counts.append(n)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if int(self._starts[-1]) != int(index["num_records"]):
            raise DataError(f"{f}: shards hold {int(self._starts[-1])} records, index says {index['num_records']}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def gather(self, indices) -> dict[str, np.ndarray]:
        """Records at global `indices` (int [n]): tokens int32 [n, T], lengths int32 [n], kind uint8 [n, T]."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"record indices out of range [0, {len(self)})")
        out = {
            "tokens": np.empty((idx.size, self.seq_len), np.int32),
            "lengths": np.empty((idx.size,), np.int32),
            "kind": np.empty((idx.size, self.seq_len), np.uint8),
        }
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = idx[rows] - self._starts[s]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            for key in ARRAYS:
                out[key][rows[order]] = self._arrays[s][key][local[order]]
        return out

    def __getitem__(self, i: int) -> dict:
        """{"tokens": int32 [n], "kind": uint8 [n], "length": n} of record i, unpadded."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        r = self.gather([i % len(self)])
        n = int(r["lengths"][0])
        return {"tokens": r["tokens"][0, :n], "kind": r["kind"][0, :n], "length": n}

    def __repr__(self) -> str:
        return f"Dataset({self.path}, {self.family}, {len(self)} records x {self.seq_len} tokens)"


# ----------------------------------------------------------------------------- loading


class Loader:
    """Deterministic, resumable, multi-host batches from a `Dataset`.

    batch_size is the global batch; each of `process_count` processes gets the contiguous rows
    [process_index * b, (process_index + 1) * b) with b = batch_size / process_count. Epoch e uses
    the record order argsort(PCG64(SeedSequence([seed, e])) raw outputs), the same on every host and
    NumPy release (identity order with shuffle=False). With drop_remainder the last partial global batch of an
    epoch is dropped;
    without it, it is padded to full size with rows whose `valid` is False (kind all pad,
    so they carry no loss), keeping shapes static.

    Iterating yields batches epoch after epoch (forever, or for `num_epochs` epochs in all):

        tokens int32 [b, T], lengths int32 [b], kind uint8 [b, T],
        image_mask bool [b, T] (kind == image: loss targets), noisable bool [b, T] (kind == image:
        structure tokens stay clean), valid bool [b], index int32 [b] (record index, -1 = padding).

    `state()` -> {"epoch", "position", ...} (JSON-serializable; position = global batches already
    consumed in that epoch); `Loader(..., state=s)` or `restore(s)` continues exactly from there.
    `len(loader)` is the number of batches per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        state: dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0, got {num_epochs}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle, self.drop_remainder = bool(shuffle), bool(drop_remainder)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        self.num_epochs = num_epochs
        n = len(dataset)
        self._per_epoch = n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)
        if self._per_epoch == 0:
            raise ValueError(
                f"dataset of {n} records gives no batch of {self.batch_size}"
                + (" (drop_remainder=True)" if self.drop_remainder and n else "")
            )
        self.epoch, self.position = 0, 0
        self._perm_epoch: int | None = None
        self._perm = np.empty((0,), np.int64)
        if state is not None:
            self.restore(state)

    def __len__(self) -> int:
        return self._per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of `epoch` (int64 [num_records]), the same on every process."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        # Sort raw PCG64 outputs: NumPy keeps bit-generator streams stable across releases (NEP 19),
        # unlike Generator.permutation's algorithm, so a resumed run on newer NumPy sees the same order.
        keys = np.random.PCG64([self.seed, int(epoch)]).random_raw(n)
        return np.argsort(keys, kind="stable").astype(np.int64)

    def state(self) -> dict:
        """JSON-serializable position in the global stream (identical on every process)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_records": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a loader over the same data, seed and global batch size
        (the process count may differ)."""
        for key, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("num_records", len(self.dataset)),
            ("shuffle", self.shuffle),
            ("drop_remainder", self.drop_remainder),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]!r}, this loader has {mine!r}; "
                    "restore needs the same dataset, seed and global batch size"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._per_epoch:
            raise ValueError(
                f"loader state out of range: epoch {epoch}, position {position} (batches per epoch {self._per_epoch})"
            )
        if position == self._per_epoch:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        B, b = self.batch_size, self.local_batch_size
        lo = self.position * B + self.process_index * b
        idx = self._perm[lo : lo + b]
        batch = self.dataset.gather(idx)
        valid = np.ones((b,), bool)
        if idx.size < b:  # last, padded batch (drop_remainder=False)
            pad = b - idx.size
            T = self.dataset.seq_len
            batch = {
                "tokens": np.concatenate([batch["tokens"], np.full((pad, T), PAD_ID, np.int32)]),
                "lengths": np.concatenate([batch["lengths"], np.zeros((pad,), np.int32)]),
                "kind": np.concatenate([batch["kind"], np.zeros((pad, T), np.uint8)]),
            }
            valid[idx.size :] = False
            idx = np.concatenate([idx, np.full((pad,), -1, np.int64)])
        batch["image_mask"] = batch["kind"] == KIND_IMAGE
        batch["noisable"] = batch["kind"] == KIND_IMAGE
        batch["valid"] = valid
        batch["index"] = idx.astype(np.int32)
        self.position += 1
        if self.position == self._per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __repr__(self) -> str:
        return (
            f"Loader({self.dataset.path}, batch {self.batch_size} = {self.process_count} x "
            f"{self.local_batch_size}, process {self.process_index}, epoch {self.epoch}, "
            f"position {self.position}/{self._per_epoch})"
        )
