"""The ``fxoffload`` command line.

    fxoffload --version                           fxoffload's and torch's versions
    fxoffload replay FILE.request.fxo [--quiet] [--cache-dir DIR | --use-captured-cache]
                                                  recompile a captured request here
    fxoffload inspect FILE.fxo                    show what a captured file holds
    fxoffload demo [--model gpt2|block] [--mode subprocess|serde] [--workers N]
    fxoffload farm up [--workers N] [--address ADDR] [--store DIR] | status | down
                                                  a shared compile farm on Ray

Exit codes: 0 success, 1 the compile (or the demo) failed, 2 bad input (including no
torch in this interpreter). Only the standard library is imported before a command runs,
so ``--version`` and the missing-torch message work without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FxOffloadError

_RESULT_MARK = "FXOFFLOAD-DEMO-RESULT "
TORCH_PIN = "2.13.0"  # what scripts/setup.sh installs
TORCH_SUPPORTED = ("2.11", "2.13")  # oldest and newest torch fxoffload runs on
_NEEDS_TORCH = ("replay", "inspect", "demo", "farm")


def _fail(message: str) -> int:
    print(f"fxoffload: error: {message}", file=sys.stderr)
    return 2


def torch_missing_message() -> str:
    """What to say when torch cannot be imported (also ``fxoffload.backend()``'s error)."""
    return (f"torch is not installed in {sys.executable}; install it with: pip install "
            f"torch=={TORCH_PIN} (fxoffload supports torch {TORCH_SUPPORTED[0]} through "
            f"{TORCH_SUPPORTED[1]})")


def version_text() -> str:
    """``fxoffload --version``: found without importing torch (its metadata is enough)."""
    import importlib.metadata

    if importlib.util.find_spec("torch") is None:
        torch_line = f"torch not installed in {sys.executable}"
    else:
        try:
            torch_line = f"torch {importlib.metadata.version('torch')}"
        except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on the path
            import torch

            torch_line = f"torch {torch.__version__}"
    return f"fxoffload {__version__}\n{torch_line}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


# --- replay / inspect -----------------------------------------------------------------

def cmd_replay(args: argparse.Namespace) -> int:
    from . import inspection, protocol

    try:
        data = inspection.read_capture(args.file)
        preamble, _ = protocol.split_request(data)
    except (inspection.BadInput, FxOffloadError) as e:
        return _fail(str(e))
    with _replay_cache_dirs(args, preamble) as (cache_dirs, cache_line):
        from .child import compile_request

        try:
            response = inspection.load_response(compile_request(data, cache_dirs=cache_dirs))
        except FxOffloadError as e:
            print(f"fxoffload: replay produced no readable response: {e}", file=sys.stderr)
            return 1
    lines = [inspection.format_record(r) for r in response.logs]
    lines += ["warning: " + inspection.format_warning(w) for w in response.warnings]
    s, source = preamble.summary, getattr(response.graph, "source_code", None)
    kind = protocol.graph_kind(s)
    lines += [
        f"== replay of {args.file} ==",
        f"request id:    {preamble.request_id}",
        f"compile id:    {s.get('compile_id') or '-'}",
        f"torch:         {preamble.torch_version}",
        f"graph:         {s.get('nodes')} nodes, {s.get('inputs')} inputs, "
        f"devices {', '.join(s.get('devices', [])) or '-'} ({kind})",
        f"compile:       {response.compile_s:.2f} s",
        f"kernels:       {getattr(response.metrics, 'generated_kernel_count', '?')} generated "
        "(generated_kernel_count delta)",
        f"source code:   {len(source or '')} chars",
        f"cache dir:     {cache_line}",
    ]
    if response.error is not None:
        reason, summary, tb = response.error
        lines.append(f"result:        FAILED ({reason}): {summary}")
        print("\n".join(lines + ([tb.rstrip()] if tb and not args.quiet else [])))
        return 1
    print("\n".join([*lines, "result:        ok"]))
    sibling = Path(str(args.file).removesuffix(".request.fxo") + ".response.fxo")
    if str(args.file).endswith(".request.fxo") and sibling.is_file():
        print(_compare_with_capture(sibling, source or "", args.quiet))
    return 0


@contextlib.contextmanager
def _replay_cache_dirs(args: argparse.Namespace, preamble: Any
                       ) -> Iterator[tuple[tuple[str, str] | None, str]]:
    """The (Inductor, Triton) cache dirs replay compiles into, and how to name them: a
    fresh temporary dir removed afterwards (default), ``--cache-dir DIR``, or the captured
    run's (``--use-captured-cache``: None, the request's own dirs)."""
    if args.use_captured_cache:
        where = preamble.cache_dir or "(none recorded: this process's default)"
        yield None, f"{where} (the captured run's, --use-captured-cache)"
    elif args.cache_dir is not None:
        path = os.path.abspath(args.cache_dir)
        yield (path, os.path.join(path, "triton")), f"{path} (--cache-dir)"
    else:
        with tempfile.TemporaryDirectory(prefix="fxoffload-replay-",
                                         ignore_cleanup_errors=True) as path:
            yield (path, os.path.join(path, "triton")), f"{path} (fresh, removed afterwards)"


def _compare_with_capture(path: Path, source: str, quiet: bool) -> str:
    from . import inspection

    try:
        captured = inspection.load_response(inspection.read_capture(path))
    except (inspection.BadInput, FxOffloadError) as e:
        return f"matches capture: unknown ({path.name} unreadable: {e})"
    old = getattr(captured.graph, "source_code", None)
    if old is None:
        return f"matches capture: unknown ({path.name} holds no code: {captured.error})"
    diff = inspection.compare_sources(old, source)
    if not diff:
        return "matches capture: yes (same code after normalizing paths and hashes)"
    shown = [] if quiet else diff[:60] + (["..."] if len(diff) > 60 else [])
    return "\n".join([f"matches capture: NO ({path.name} differs after normalizing)", *shown])


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import inspection

    try:
        lines = inspection.file_lines(inspection.read_capture(args.file))
    except (inspection.BadInput, FxOffloadError) as e:
        return _fail(str(e))
    print("\n".join(lines))
    return 0


# --- demo ---------------------------------------------------------------------------

def _build_model(name: str) -> tuple[Any, dict[str, Any]]:
    """Random-weight models, the same in every process (seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    batch, seq, dim, vocab = 2, 32, 64, 128
    if name == "gpt2":
        import transformers

        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=dim,
                                      n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(cfg)
        model.config.use_cache = False
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
        return model.eval(), {"input_ids": ids}

    class Block(nn.Module):
        """A pre-norm causal transformer block: attention, MLP, residuals."""

        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = (z.view(b, t, 4, d // 4).transpose(1, 2)
                       for z in self.qkv(self.ln1(x)).split(d, dim=-1))
            att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.ln2(x))

    model = Block().eval()
    return model, {"x": torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(1))}


def _demo_child(args: argparse.Namespace) -> int:
    """One measured run in this (fresh) process; prints one JSON result line."""
    import torch

    model, inputs = _build_model(args.model)
    result: dict[str, Any] = {"variant": args._child, "model": args.model}
    with torch.no_grad():
        model(**inputs)
        t = time.perf_counter()
        model(**inputs)
        eager_s = time.perf_counter() - t
        if args._child != "stock":
            import fxoffload

            if args._child == "warm":  # the pool started ahead, e.g. while data loads
                t = time.perf_counter()
                fxoffload.warmup(mode=args.mode, workers=args.workers)
                result["warmup_s"] = time.perf_counter() - t
            backend: Any = fxoffload.backend(mode=args.mode, workers=args.workers)
        else:
            backend = "inductor"
        compiled = torch.compile(model, backend=backend)
        t = time.perf_counter()
        out = compiled(**inputs)
        first_s = time.perf_counter() - t
    out = getattr(out, "logits", out).detach().cpu()
    torch.save(out, args._out)
    result.update(eager_s=eager_s, first_output_s=first_s, compile_s=first_s - eager_s,
                  checksum=float(out.double().sum()))
    if args._child != "stock":
        import fxoffload

        result["stats"] = fxoffload.stats().as_dict()
        fxoffload.shutdown()
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


def _run_child(variant: str, args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    work = tmp / variant
    work.mkdir()
    src = str(Path(__file__).resolve().parent.parent)  # importable even if not installed
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
           "TRITON_CACHE_DIR": str(work / "triton-cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
    cmd = [sys.executable, "-m", "fxoffload.cli", "demo", "--model", model, "--mode",
           args.mode, "--_child", variant, "--_out", str(work / "out.pt")]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    print(f"compiling {model} with {variant} in a fresh process ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"the {variant} run failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1].removeprefix(_RESULT_MARK))
    result["out"] = str(work / "out.pt")
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    if args._child:
        return _demo_child(args)
    model = args.model
    if model == "gpt2" and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: using the built-in block instead of gpt2")
        model = "block"
    with tempfile.TemporaryDirectory(prefix="fxoffload-demo-") as name:
        try:
            runs = {v: _run_child(v, args, model, Path(name)) for v in _VARIANTS}
        except RuntimeError as e:
            print(f"fxoffload demo: {e}", file=sys.stderr)
            return 1
        import torch

        reference = torch.load(runs["stock"]["out"])
        diffs = {}
        for variant in _VARIANTS[1:]:
            out = torch.load(runs[variant]["out"])
            same_shape = out.shape == reference.shape
            diffs[variant] = (float((out - reference).abs().max()) if same_shape
                              else float("nan"))
    return _report(args, model, runs, diffs)


# The demo's three fresh processes: stock Inductor; fxoffload as a new user meets it (no
# warm-up: a compile that comes before any worker is warm runs in-process); and with the
# pool warmed ahead by fxoffload.warmup(), whose time is shown apart and counted too.
_VARIANTS = ("stock", "cold", "warm")


def _report(args: argparse.Namespace, model: str, runs: dict[str, dict[str, Any]],
            diffs: dict[str, float]) -> int:
    stock, cold, warm = (runs[v] for v in _VARIANTS)
    warmup_s = warm.get("warmup_s", 0.0)
    print(f"\n{model}, fxoffload mode {args.mode}, each in a fresh process with empty caches:")
    print(f"  {'':36}{'stock':>9}{'no warm-up':>12}{'warmed ahead':>14}")
    rows = [("warm-up, before the first call (s)", None, None, warmup_s),
            ("first output (s)", stock["first_output_s"], cold["first_output_s"],
             warm["first_output_s"]),
            ("warm-up + first output (s)", stock["first_output_s"], cold["first_output_s"],
             warmup_s + warm["first_output_s"])]
    for label, *values in rows:
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        print(f"  {label:36}{cells[0]:>9}{cells[1]:>12}{cells[2]:>14}")
    base = stock["first_output_s"]
    print(f"  first output against stock: {cold['first_output_s'] / base:.2f}x with no "
          f"warm-up; {warm['first_output_s'] / base:.2f}x with the pool warmed ahead "
          f"({(warmup_s + warm['first_output_s']) / base:.2f}x counting the warm-up)")
    ok = True
    for variant, run in (("no warm-up", cold), ("warmed ahead", warm)):
        st = run["stats"]
        fallbacks = sum(st["fallbacks"].values())
        here = dict(st.get("compiled_in_process", {}))
        detail = f" {st['fallbacks']}" if fallbacks else ""
        print(f"  {variant}: {st['graphs_offloaded']} graphs offloaded, compiled in-process "
              f"{here or 0}, {fallbacks} fallbacks{detail}, worker starts "
              f"{st['worker_starts']}, worker failures {st['worker_failures'] or 0}")
        ok &= fallbacks == 0
    match = all(d <= 1e-5 for d in diffs.values())
    print(f"outputs match stock's: {'yes' if match else 'no'} (max abs diff "
          f"{max(diffs.values()):.3g})")
    if warm["stats"]["graphs_offloaded"] == 0:
        print("no graph was offloaded with the pool warmed ahead: the demo showed nothing",
              file=sys.stderr)
        ok = False
    return 0 if match and ok else 1


# --- argument parsing ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxoffload", description="Tools for fxoffload: "
                                     "TorchInductor compiles out of the model's process.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print fxoffload's version and torch's, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("replay", help="recompile a captured .request.fxo in this process; "
                       "compare with the captured .response.fxo beside it, if any")
    p.add_argument("file", help="a <pid>-<seq>-<kind>-<dynamo id>-<id>.request.fxo written "
                   "by mode='capture'")
    p.add_argument("--quiet", "-q", action="store_true", help="no traceback, no code diff")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cache-dir", metavar="DIR",
                       help="compile into this Inductor cache dir (Triton's: DIR/triton); "
                       "default: a fresh temporary dir, removed afterwards")
    where.add_argument("--use-captured-cache", action="store_true",
                       help="compile into the captured run's Inductor and Triton cache dirs, "
                       "as a worker would (recreating them if deleted)")
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("inspect", help="show what a captured request or response holds")
    p.add_argument("file", help="a .request.fxo or .response.fxo file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="compile a tiny transformer with stock Inductor and with "
                       "fxoffload, each in a fresh process with an empty cache; compare")
    p.add_argument("--model", choices=("gpt2", "block"), default="gpt2",
                   help="tiny random GPT-2 from transformers (default), or a built-in block")
    p.add_argument("--mode", choices=("subprocess", "serde"), default="subprocess",
                   help="fxoffload mode (default: subprocess)")
    p.add_argument("--workers", type=int, default=None, help="worker processes")
    p.add_argument("--_child", choices=_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    from .farm.command import add_parser

    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        return _fail(torch_missing_message())
    if getattr(args, "workers", None) is not None and args.workers < 1:
        return _fail("--workers must be a positive integer")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
