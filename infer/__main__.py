"""python -m infer: batch text-to-image generation; writes images, a grid and step statistics.

    python -m infer                                   # the bundled MNIST demo model, 10 default prompts
    python -m infer --compare                         # ... and AR, JD, SJD beside SJD2 on the same prompts
    python -m infer --prompt "a handwritten 7" --prompt "the digit two" --method sjd2 --out out/digits
    python -m infer --model CKPT --prompts-file prompts.txt --method sjd --window 16 --batch-size 4

Output folder: one PNG per prompt (000.png, 001.png, ...), grid.png (all images tiled,
enlarged; with --compare also ar-000.png, ..., grid-ar.png for each other method), and stats.json: a list with one
object per image {prompt, method, image, tokens, steps, seconds (the run's mean per image,
compilation excluded), ...}, and manifest.json: the files this run wrote. Everything is written to a
temporary sibling folder and moved into place at the end (Ctrl-C or SIGTERM leave nothing behind).
An existing --out is replaced only if it holds nothing but an earlier run's output (as its
manifest.json lists it); otherwise infer refuses. A symlinked --out stays a symlink: the
folder it points to is written.
Imported Emu3 / Janus-Pro checkpoints bring their image codec, Lumina-mGPT ones get it from
`convert import --vqgan` or `convert add-codec`; a checkpoint without one gets each image's
code grid as NNN.npy instead of a PNG.
Multi-process jobs (TPU pods, GPU clusters; or by hand: JAX_COORDINATOR_ADDRESS=host:port
SJD2_NUM_PROCESSES=N SJD2_PROCESS_ID=i in each process's environment) run the same command in every
process with --mesh spanning all their devices; process i writes the images it owns, with their
stats.json and manifest.json, into --out/process-i.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

USAGE_ERRORS = 2
METHODS = ("ar", "jacobi", "sjd", "sjd2")
STATS_FILE = "stats.json"
GRID_FILE = "grid.png"
MANIFEST_FILE = "manifest.json"
MAX_SEED = 2**32 - 1


class InferError(Exception):
    """Bad input to `python -m infer`; printed as one `error:` line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: unwinds like Ctrl-C, so the temporary output folder is removed."""


class _Signals:
    """The SIGINT/SIGTERM that arrived during a run, if any.

    The handler raises at once, but Python swallows an exception raised while it runs a gc
    callback or a __del__ (JAX registers one); the recorded signal is checked again before the
    output is committed, so a swallowed one still stops the run."""

    def __init__(self) -> None:
        self.received: int | None = None

    def raise_if_received(self) -> None:
        if self.received == signal.SIGTERM:
            raise Terminated()
        if self.received is not None:
            raise KeyboardInterrupt()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=None, help="sjd2-jax checkpoint folder (default: the bundled MNIST demo model)"
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a prompt (repeat for several; default: the demo's 10 prompts, one per digit)",
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="UTF-8 text file, one prompt per line (blank lines and lines starting with # skipped)",
    )
    p.add_argument("--method", choices=METHODS, default="sjd2", help="decoding method (default sjd2)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed (default 0); image i of the run draws from (seed, i) whatever --batch-size",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=10,
        help="rows decoded together (default 10); with more prompts, a finished row takes the next prompt "
        "inside the compiled loop",
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="SPEC",
        help="shard over a device mesh, e.g. data=2,tensor=4 (train's --mesh syntax: axes data, fsdp, tensor, "
        "sizes multiplying to the device count): rows split over data x fsdp (--batch-size a multiple of it), "
        "parameters over tensor (it must divide the heads) and fsdp; in a multi-process job each process writes "
        "its own images into OUT/process-I "
        "(default: one device)",
    )
    p.add_argument("--out", type=Path, default=Path("out/infer"), help="output folder (default out/infer)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    s = p.add_argument_group("sampling (default: the checkpoint's, else the family's published settings)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None, help="0 = off")
    s.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1.0 = off)")
    j = p.add_argument_group("Jacobi window and SJD2 options (default: the checkpoint's)")
    j.add_argument("--window", type=int, default=None, help="window length W (jacobi, sjd, sjd2)")
    j.add_argument("--levels", type=int, default=None, help="SJD2 noise levels K (must match the fine-tune)")
    j.add_argument(
        "--allow-schedule-mismatch",
        action="store_true",
        help="SJD2: decode with --levels other than the schedule the checkpoint was fine-tuned with",
    )
    j.add_argument(
        "--denoise-stride",
        type=int,
        default=None,
        help="SJD2 levels per denoise step (exact DDIM jump; positions get clean in K / stride passes)",
    )
    j.add_argument(
        "--paper-mode",
        action="store_true",
        help="SJD2: accept drafts through noisy positions (the paper's verification; not lossless)",
    )
    j.add_argument(
        "--e0-hat",
        choices=["sample", "mean"],
        default=None,
        help="SJD2 denoise target: the sampled token's embedding or the probability-weighted mean",
    )
    x = p.add_argument_group(
        "lossless switches (the output distribution stays exactly AR's, docs/design.md; "
        "coupled refresh is on for sjd and sjd2 and the clean switch for exact sjd2, the others are off by default)"
    )
    x.add_argument(
        "--coupled-refresh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sjd, sjd2 (default on): keep a surviving draft with probability min(1, q_new/q_old), else redraw "
        "from the residual; --no-coupled-refresh gives the published SJD / SJD2 refresh",
    )
    x.add_argument(
        "--clean-switch-level",
        type=int,
        default=None,
        help="sjd2: feed a position its draft's clean embedding once its level falls to this (exact sjd2 "
        "default: levels - denoise stride, i.e. after one denoise step; 0 with --no-coupled-refresh gives "
        "the published SJD2)",
    )
    x.add_argument(
        "--clean-stream",
        type=int,
        default=None,
        help="sjd2 (exact): M clean copies of the first noisy positions verify past them (M more inputs per pass)",
    )
    x.add_argument(
        "--front-candidates",
        type=int,
        default=None,
        help="sjd, sjd2 (exact): A more candidates for the first window position, recursive rejection sampling",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the other methods on the same prompts and seeds, the parallel ones at the "
        "same window as --method (their files are prefixed with the method name), and print them side by side",
    )
    p.add_argument("--grid-scale", type=int, default=4, help="enlargement of grid.png (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_prompts(args) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        f = args.prompts_file
        if f.is_dir():
            raise InferError(f"--prompts-file {f}: is a directory, not a text file")
        if not f.is_file():
            raise InferError(f"--prompts-file {f}: no such file")
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InferError(f"--prompts-file {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise InferError(f"--prompts-file {f}: cannot read ({e.strerror})") from None
        got = [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
        if not got:
            raise InferError(f"--prompts-file {f}: no prompts in it (one per line; blank and # lines are skipped)")
        prompts += got
    if any(not p.strip() for p in prompts):
        raise InferError("empty --prompt")
    return prompts or None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args) -> None:
    """Every argument's range, before any work, in the names the user typed."""
    if args.batch_size < 1:
        raise InferError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.grid_scale < 1:
        raise InferError(f"--grid-scale must be >= 1 (got {args.grid_scale})")
    if args.mesh is not None:
        from sjd2_jax.decode.placement import ROW_AXES
        from sjd2_jax.model.sharding import parse_mesh

        try:
            sizes = parse_mesh(args.mesh)
        except ValueError as e:
            raise InferError(str(e)) from None
        rows = sizes[ROW_AXES[0]] * sizes[ROW_AXES[1]]
        if args.batch_size % rows:
            raise InferError(
                f"--batch-size {args.batch_size} is not a multiple of the mesh's data x fsdp = {rows} "
                "(every device decodes the same number of rows)"
            )
    if not 0 <= args.seed <= MAX_SEED:
        raise InferError(f"--seed must be an integer in [0, {MAX_SEED}] (got {args.seed})")
    if args.size is not None and args.size < 1:
        raise InferError(f"--size must be a positive number of pixels (got {args.size})")
    if args.window is not None and args.method == "ar":
        raise InferError("--window does not apply to --method ar")
    if args.window is not None and args.window < 2:
        raise InferError(f"--window must be >= 2 for --method {args.method} (got {args.window})")
    for name in ("levels", "denoise_stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InferError(f"{_flag(name)} must be >= 1 (got {value})")
    from sjd2_jax.decode.options import check_sampling

    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.cfg_scale, name=_flag)
    except ValueError as e:
        raise InferError(str(e)) from None
    if args.allow_schedule_mismatch and args.method != "sjd2":
        raise InferError("--allow-schedule-mismatch applies to --method sjd2 only")
    sjd2_only = [
        n
        for n, v in (
            ("--levels", args.levels),
            ("--paper-mode", args.paper_mode or None),
            ("--e0-hat", args.e0_hat),
            ("--denoise-stride", args.denoise_stride),
            ("--clean-switch-level", args.clean_switch_level),
            ("--clean-stream", args.clean_stream),
        )
        if v is not None
    ]
    if sjd2_only and args.method != "sjd2":
        raise InferError(f"{', '.join(sjd2_only)} apply to --method sjd2 only")
    speculative = [
        n
        for n, v in (("--[no-]coupled-refresh", args.coupled_refresh), ("--front-candidates", args.front_candidates))
        if v is not None
    ]
    if speculative and args.method not in ("sjd", "sjd2"):
        raise InferError(f"{', '.join(speculative)} apply to --method sjd or sjd2 only")
    exact_only = [
        n
        for n, v in (("--clean-stream", args.clean_stream), ("--front-candidates", args.front_candidates))
        if v is not None
    ]
    if exact_only and args.paper_mode:
        raise InferError(f"{', '.join(exact_only)} need exact verification: not with --paper-mode")
    for name in ("clean_switch_level", "clean_stream", "front_candidates"):
        if (v := getattr(args, name)) is not None and v < 0:
            raise InferError(f"{_flag(name)} must be >= 0 (got {v})")


def _check_model_defaults(args, model_dir) -> None:
    """The checkpoint's saved sampling values, and --levels against its recorded SJD2 schedule."""
    from sjd2_jax.decode.options import check_sampling, check_schedule
    from sjd2_jax.io import checkpoint as ckpt

    saved = ckpt.generation_defaults(model_dir)
    stored = saved.get("sampling", {})
    try:
        for knob in ("temperature", "top_k", "top_p", "cfg_scale"):
            if getattr(args, knob) is None and knob in stored:  # a given flag overrides the saved value
                where = f" (in {Path(model_dir) / ckpt.GENERATION_FILE}; {_flag(knob)} overrides it)"
                check_sampling(**{knob: stored[knob]}, where=where)
        check_schedule(
            args.method,
            saved,
            {} if args.levels is None else {"levels": args.levels},
            allow=args.allow_schedule_mismatch,
            name=_flag,
            allow_hint="--allow-schedule-mismatch",
        )
    except ValueError as e:
        raise InferError(str(e)) from None


def _join_multiprocess_job(args) -> Path:
    """In a multi-process job (TPU pod, GPU cluster, or SJD2_NUM_PROCESSES; see
    sjd2_jax.multihost) join it before any device is touched. Each process then writes the
    images it owns into its own folder, --out/process-<index>, so processes that share a
    file system never replace each other's output."""
    import jax

    from sjd2_jax import multihost

    try:
        multihost.initialize_from_environment()
    except ValueError as e:
        raise InferError(f"multi-process setup: {e}") from None
    if jax.process_count() > 1:
        if args.mesh is None:
            raise InferError(
                f"this is process {jax.process_index()} of a {jax.process_count()}-process job: "
                "give --mesh (e.g. --mesh data=N) so that the processes share the work"
            )
        return Path(args.out) / f"process-{jax.process_index()}"
    return Path(args.out)


def _mesh(args, model_dir):
    """--mesh as a device mesh (None without it); refused before any work if the devices or
    the model's heads do not fit it."""
    if args.mesh is None:
        return None
    from sjd2_jax.decode import placement
    from sjd2_jax.io import checkpoint as ckpt

    try:
        mesh = placement.mesh_from_text(args.mesh)
        placement.check_model_mesh(ckpt.read_config(model_dir), mesh)
    except ValueError as e:
        raise InferError(f"--mesh {args.mesh}: {e}") from None
    return mesh


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file written into `folder` (name, size, hash): what a later run may replace."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    record = {"written_by": "python -m infer", "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _not_ours(folder: Path) -> list[str] | None:
    """Entries of an existing folder that no earlier run wrote (unlisted, or changed since);
    None when the folder has files but no readable manifest."""
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return []
    try:
        listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None
    foreign = []
    for name in entries:
        p = folder / name
        if name == MANIFEST_FILE:
            continue
        rec = listed.get(name)
        same = (
            isinstance(rec, dict)
            and p.is_file()
            and not p.is_symlink()
            and p.stat().st_size == rec.get("bytes")
            and _sha256(p) == rec.get("sha256")
        )
        if not same:
            foreign.append(name)
    return foreign


def _check_replaceable(folder: Path, out: Path) -> None:
    foreign = _not_ours(folder)
    if foreign is None:
        raise InferError(
            f"--out {out} exists and is not an earlier infer output (no {MANIFEST_FILE}); "
            "choose a new folder, or empty this one"
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InferError(
            f"--out {out} holds files an earlier infer run did not write or that changed since ({shown}); "
            "infer replaces only its own output: choose a new folder, or move them"
        )


def _prepare_out(out: Path) -> None:
    """Refuse, before any work, an --out that cannot be written or holds someone else's files."""
    if out.is_symlink() and not out.exists():
        raise InferError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist")
    target = out.resolve()  # a symlinked --out is written through: its target folder is replaced
    if target.exists():
        if not target.is_dir():
            raise InferError(f"--out {out} exists and is not a folder")
        _check_replaceable(target, out)
        if not os.access(target, os.W_OK | os.X_OK):
            raise InferError(f"--out {out} is not writable (permission denied)")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InferError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InferError(f"--out {out}: cannot create it in {existing} (not writable)")


def _method_options(args) -> dict:
    opts = {}
    if args.window is not None:
        opts["window"] = args.window
    if args.levels is not None:
        opts["levels"] = args.levels
    if args.paper_mode:
        opts["exact"] = False
    if args.e0_hat is not None:
        opts["e0_hat"] = args.e0_hat
    if args.denoise_stride is not None:
        opts["denoise_stride"] = args.denoise_stride
    if args.allow_schedule_mismatch:
        opts["allow_schedule_mismatch"] = True
    if args.coupled_refresh is not None:
        opts["coupled_refresh"] = args.coupled_refresh
    for name in ("clean_switch_level", "clean_stream", "front_candidates"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def to_png(pixels, path: Path, scale: int = 1) -> None:
    """float [H, W, 3] in [0, 1] -> 8-bit PNG, grayscale when the three channels agree
    (nearest-neighbour enlargement by `scale`)."""
    import numpy as np
    from PIL import Image

    img = np.clip(np.rint(np.asarray(pixels) * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    if img.ndim == 3 and (img == img[..., :1]).all():
        img = img[..., 0]
    Image.fromarray(img).save(path)


def tile(images, cols: int | None = None, pad: int = 1):
    """float [N, H, W, C] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] mosaic with a mid-gray border."""
    import numpy as np

    n, H, W, C = images.shape
    cols = cols or min(n, 10)
    rows = -(-n // cols)
    out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 0.5, np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = im
    return out


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its monitoring events), so that
    per-image times can leave compilation out. One listener per process."""

    total = 0.0
    _registered = False

    def __init__(self):
        import jax

        if not _CompileClock._registered:
            jax.monitoring.register_event_duration_secs_listener(_CompileClock._on_event)
            _CompileClock._registered = True

    @staticmethod
    def _on_event(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            _CompileClock.total += duration


def run(args, log=print, signals: _Signals | None = None) -> list[dict]:
    import jax
    import numpy as np
    from tqdm import tqdm

    import sjd2_jax
    from sjd2_jax import families
    from sjd2_jax.decode import placement
    from sjd2_jax.demo import mnist
    from sjd2_jax.io import checkpoint as ckpt

    signals = signals or _Signals()
    _check_args(args)
    args.out = _join_multiprocess_job(args)  # this process's output folder
    prompts = read_prompts(args)
    model_dir = args.model or sjd2_jax.DEMO_MODEL
    if prompts is None:
        if args.model is not None:
            raise InferError("give --prompt or --prompts-file (the default prompts belong to the demo model)")
        prompts = mnist.default_prompts()
    if not (Path(model_dir) / ckpt.CONFIG_FILE).is_file():
        raise InferError(
            f"--model {model_dir}: not an sjd2-jax checkpoint folder (no {ckpt.CONFIG_FILE}); "
            "import one with `python -m convert import`"
        )
    _check_model_defaults(args, model_dir)
    mesh = _mesh(args, model_dir)
    _prepare_out(args.out)
    model = sjd2_jax.load(model_dir, mesh=mesh)
    try:
        families.image_plan(model, args.size)
    except ValueError as e:
        raise InferError(f"--size {args.size}: {e}" if args.size is not None else str(e)) from None
    methods = [args.method] + ([m for m in METHODS if m != args.method] if args.compare else [])
    main_window = 1  # the window the first (asked-for) method used; --compare runs the others at it
    B = min(args.batch_size, len(prompts))
    clock = _CompileClock()
    records = []
    bar = tqdm(
        total=len(prompts) * len(methods),
        desc="images",
        unit="img",
        disable=args.no_progress or jax.process_index() != 0,  # one bar per job, not per process
        file=sys.stderr,
    )
    # Checked by _prepare_out, and again just before the swap (files may have appeared meanwhile).
    replaceable = lambda folder: _check_replaceable(folder, args.out)
    with ckpt.atomic_output_dir(args.out, replace=True, check_replace=replaceable) as tmp:
        for method in methods:
            signals.raise_if_received()
            bar.set_description(f"{method} images")
            prefix = "" if method == args.method else f"{method}-"
            opts = _method_options(args) if method == args.method else {}
            if method != args.method and method != "ar" and main_window > 1:
                opts["window"] = main_window  # --compare: every parallel method at the same window
            if method != args.method and method in ("sjd", "sjd2") and args.coupled_refresh is not None:
                opts["coupled_refresh"] = args.coupled_refresh  # --compare: SJD and SJD2 with the same refresh
            pixels = []
            done = [0]

            def progress(n, done=done):  # finished images, told from inside the compiled loop
                bar.update(n - done[0])
                done[0] = n

            t0, c0 = time.perf_counter(), clock.total
            # One call per method: more prompts than --batch-size form a queue inside the compiled
            # loop (a finished row takes the next prompt), so no row waits for its batch's slowest.
            g = sjd2_jax.generate(
                model,
                prompts,
                method=method,
                size=args.size,
                seed=args.seed,  # image i of the run draws from (seed, i), whatever the batch size
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                cfg_scale=args.cfg_scale,
                batch_size=B,
                on_progress=progress,
                **opts,
            )
            compile_s = clock.total - c0
            if method == args.method:
                main_window = g.window
            dt = max(time.perf_counter() - t0 - compile_s, 0.0) / len(prompts)
            mine = set(placement.own_rows(len(prompts), mesh).tolist())  # multi-host: this host's rows
            for i, prompt in enumerate(prompts):
                if i not in mine:
                    continue
                if g.images is not None:  # the checkpoint has an image codec: generate decoded
                    name = f"{prefix}{i:03d}.png"
                    img = g.images[i].astype(np.float32) / 255.0
                    to_png(img, tmp / name)
                    pixels.append(img)
                else:
                    name = f"{prefix}{i:03d}.npy"
                    np.save(tmp / name, g.codes[i])
                records.append(
                    {
                        "prompt": prompt,
                        "method": method,
                        "window": int(g.window),
                        "image": name,
                        "tokens": int(g.plan.num_generated),
                        "steps": int(g.steps[i]),
                        "step_compression": round(float(g.step_compression[i]), 3),
                        "seconds": round(dt, 4),
                        "compile_seconds_of_run": round(compile_s, 2),
                        "wasted_row_passes_of_run": round(g.wasted_fraction, 4),
                        "seed": args.seed,
                        "batch_size": B,
                    }
                )
            if pixels:
                grid = GRID_FILE if not prefix else f"grid-{method}.png"
                to_png(tile(np.stack(pixels)), tmp / grid, args.grid_scale)
        bar.close()
        (tmp / STATS_FILE).write_text(json.dumps(records, indent=2) + "\n")
        write_manifest(tmp)
        signals.raise_if_received()  # a signal whose exception was swallowed: never commit after it
    if records:
        log(summary(records, args.out, device=jax.default_backend()))
    else:  # multi-host, tensor axis across hosts: another host holds (and writes) every row
        log(f"process {jax.process_index()}: the other hosts wrote every image of this run")
    return records


SPEED_COLUMN = "images/s relative to AR"


def summary(records: list[dict], out: Path, device: str | None = None) -> str:
    """One row per method: steps, step compression, seconds per image (compilation excluded),
    and speed relative to AR with a note on reading it; `device` is the backend the run used."""
    import numpy as np

    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    ar_secs = np.mean([r["seconds"] for r in by["ar"]]) if "ar" in by else None
    head = ["method", "images", "tokens/img", "steps/img (min-max)", "step compression", "s/img", SPEED_COLUMN]
    rows = []
    slower = []
    for method, rs in by.items():
        steps = np.array([r["steps"] for r in rs])
        tokens = np.array([r["tokens"] for r in rs])
        secs = float(np.mean([r["seconds"] for r in rs]))
        if ar_secs and secs > 0 and method != "ar" and ar_secs / secs < 1.0:
            slower.append(method)
        rows.append(
            [
                method,
                str(len(rs)),
                f"{tokens.mean():.0f}",
                f"{steps.mean():.1f} ({steps.min()}-{steps.max()})",
                f"{tokens.sum() / steps.sum():.2f}x",
                f"{secs:.3f}",
                f"{ar_secs / secs:.2f}" if ar_secs and secs > 0 else "-",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    lines = [fmt(head), *(fmt(r) for r in rows)]
    kind = (
        GRID_FILE
        if records[0]["image"].endswith(".png")
        else "NNN.npy code grids; the checkpoint has no image codec: add one with python -m convert add-codec "
        "CKPT --vqgan vqgan.ckpt (Lumina-mGPT) or --from SOURCE_FOLDER (Emu3, Janus-Pro)"
    )
    lines.append(
        f"step compression = generated tokens / forward passes; s/img excludes compilation. "
        f"Output: {out}/ ({STATS_FILE}, {kind})"
    )
    if ar_secs:
        lines.append(f"{SPEED_COLUMN}: above 1 = faster than AR, below 1 = slower (this run's device: {device}).")
    if slower:
        lines.append(
            f"Why {', '.join(slower)} can be slower than AR despite fewer forward passes: where a pass is "
            "compute-bound (a CPU, or a tiny model like the demo), a pass over a W-token window costs about "
            "as much as several one-token passes, so fewer passes do not save time. Step compression pays "
            "off where a pass is memory-bound (reading the weights dominates; large models on GPU/TPU): "
            "there a window pass costs about the same as a one-token pass."
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sjd2_jax.io.checkpoint import CheckpointError

    signals = _Signals()
    try:
        with _interrupts_recorded(signals):
            run(args, signals=signals)
        signals.raise_if_received()  # arrived after the commit: the output is whole, the exit says why
    except (InferError, ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERRORS
    except Terminated:
        print("terminated; no partial output was left", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _interrupts_recorded(signals: _Signals):
    """For the duration, SIGTERM raises Terminated and SIGINT KeyboardInterrupt, and both are
    recorded in `signals`: the run unwinds and removes its temporary folder instead of dying
    with it in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        signals.received = signum
        signals.raise_if_received()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def console_main() -> None:
    """Entry point of the installed console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
