"""One repetition of one configuration, in a fresh process (started by first_call.py).

    python bench/_child.py '<json spec>'

The parent has already set up this process's environment: a fresh, empty
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR, and TORCHINDUCTOR_FX_COMPILE_MODE for the
stock modes (it must be set before torch is imported, which is why every sample is its
own process). This script builds the model, starts the clock, runs the torch.compile'd
model's first call (Dynamo + AOTAutograd + Inductor compile + run; forward+backward with
--train), stops the clock after a device synchronize, and then times a plain eager call
for reference. Whatever happens, its last stdout line is ``RESULT_MARKER`` + one JSON
object; a configuration that crashes records the error there instead of a time.

Keep this file free of APIs newer than torch 2.11.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

RESULT_MARKER = "FIRST_CALL_RESULT "

STOCK_MODES = {"stock-normal": None, "stock-serialize": "SERIALIZE",
               "stock-subprocess": "SUBPROCESS"}
FXOFFLOAD_MODES = {"fxoffload-serde": ("serde", False),
                   "fxoffload-subprocess": ("subprocess", True),
                   "fxoffload-subprocess-cold": ("subprocess", False)}
# As a new user would: torch.compile(model, backend="fxoffload"), no FXOFFLOAD_* variables
# (the parent unsets them), no fxoffload import and no warmup() before the first call.
FXOFFLOAD_DEFAULT = "fxoffload-default"

# Model sizes. "tiny" is the test-suite model (tests/models.py: transformers_model);
# "bench" is the reference GPU configuration (GPT-2 small, BERT-base, a ~0.2B Llama).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "batch": 2, "seq": 16,
        "gpt2": {"vocab_size": 128, "n_positions": 64, "n_embd": 64, "n_layer": 2,
                 "n_head": 4},
        "bert": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "intermediate_size": 128,
                 "max_position_embeddings": 64},
        "llama": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "max_position_embeddings": 64},
    },
    "bench": {
        "batch": 8, "seq": 512,
        "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                 "n_head": 12},
        "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072,
                 "max_position_embeddings": 512},
        "llama": {"vocab_size": 32000, "hidden_size": 1024, "num_hidden_layers": 8,
                  "num_attention_heads": 16, "num_key_value_heads": 8,
                  "intermediate_size": 2816, "max_position_embeddings": 2048},
    },
}


def build_model(name: str, size: str, device: str, dtype: Any, train: bool,
                batch: int | None = None, seq: int | None = None
                ) -> tuple[Any, Callable[[], dict[str, Any]]]:
    """A randomly initialised GPT-2 / BERT / Llama from ``transformers`` configs, and an
    input factory (no downloads). With ``train`` the inputs carry labels, so the forward
    returns a loss to call backward on."""
    import torch
    import transformers as tf

    spec = SIZES[size]
    batch = batch or spec["batch"]
    seq = seq or spec["seq"]
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = tf.GPT2Config(**spec["gpt2"])
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(**spec["bert"])
        model = tf.BertForMaskedLM(cfg)
    elif name == "llama":
        cfg = tf.LlamaConfig(**spec["llama"])
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config.use_cache = False
    model = model.to(device=device, dtype=dtype)
    model.train(train)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    if train:
        return model, lambda: {"input_ids": ids, "labels": ids}
    return model, lambda: {"input_ids": ids}


class _LogCounter(logging.Handler):
    """Counts WARNING+ records (and keeps the first few distinct messages) from torch and
    fxoffload, and names each stock SERIALIZE/SUBPROCESS "Unable to pickle input graph"
    fall-back by the exception logged with it."""

    LOGGERS = ("torch", "torch._inductor", "torch._dynamo", "torch._functorch", "torch.fx",
               "fxoffload")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.pickle_failures: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    def install(self) -> None:
        # torch's loggers do not all propagate to "torch", so listen on each of them.
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.handlers:
                logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "_first_call_seen", False):  # reached us via two loggers
            return
        record._first_call_seen = True  # type: ignore[attr-defined]
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the bench
            message = str(record.msg)
        if "Unable to pickle" in message:
            exc = record.exc_info[1] if record.exc_info else None
            why = f"{type(exc).__name__}: {exc}" if exc is not None else message
            self.pickle_failures[why.splitlines()[0][:200]] += 1
        first = message.splitlines()[0][:200] if message else ""
        key = f"{record.name}: {first}"
        if key in self.messages or len(self.messages) < 10:
            self.messages[key] += 1


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model: Any, inputs: dict[str, Any], train: bool, torch: Any) -> Any:
    if train:
        out = model(**inputs)
        out.loss.backward()
        return out
    with torch.no_grad():
        return model(**inputs)


def _stock_compile_stats() -> dict[str, int]:
    """Inductor's own per-scheme count of compiles run in this process."""
    fx = sys.modules.get("torch._inductor.compile_fx")
    stats = getattr(getattr(fx, "FxCompile", None), "_compile_stats", None) or {}
    return {getattr(k, "__name__", str(k)): int(getattr(v, "codegen_and_compile", 0))
            for k, v in stats.items()}


def run(spec: dict[str, Any], result: dict[str, Any]) -> None:
    config = spec["config"]
    device = spec["device"]
    train = spec["train"]
    counter = _LogCounter()
    counter.install()
    result["log_warnings"] = counter.messages  # filled in as we go

    t_import = time.perf_counter()
    import torch

    counter.install()  # again: importing torch may have replaced logger set-up
    result["torch_version"] = torch.__version__
    result["python"] = sys.version.split()[0]
    result["import_torch_s"] = time.perf_counter() - t_import
    if device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(0)
    else:
        import platform

        result["device_name"] = platform.processor() or platform.machine()
    result["cpu_count"] = os.cpu_count()
    dtype = getattr(torch, spec["dtype"])

    model, make_inputs = build_model(spec["model"], spec["size"], device, dtype, train,
                                     spec.get("batch"), spec.get("seq"))
    inputs = make_inputs()
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    result["input_shape"] = list(inputs["input_ids"].shape)

    fxo: Any = None
    if config in STOCK_MODES:
        backend: Any = "inductor"
    elif config == FXOFFLOAD_DEFAULT:
        backend = "fxoffload"  # the entry point; --workers does not apply
    elif config in FXOFFLOAD_MODES:
        import fxoffload as fxo

        mode, warm = FXOFFLOAD_MODES[config]
        kwargs: dict[str, Any] = {"mode": mode}
        if spec.get("workers"):
            kwargs["workers"] = spec["workers"]
        backend = fxo.backend(**kwargs)
        result["workers"] = backend.settings.workers
        if warm:
            t0 = time.perf_counter()
            fxo.warmup(mode=mode, workers=backend.settings.workers)
            result["warmup_s"] = time.perf_counter() - t0
    else:
        raise ValueError(f"unknown config {config!r}")

    compiled = torch.compile(model, backend=backend)
    _sync(torch, device)

    # ---- the measurement: the compiled model's first call -------------------------
    t0 = time.perf_counter()
    out = _step(compiled, inputs, train, torch)
    _sync(torch, device)
    result["first_call_s"] = time.perf_counter() - t0
    # ------------------------------------------------------------------------------

    fx = sys.modules.get("torch._inductor.compile_fx")
    mode_seen = getattr(fx, "fx_compile_mode", None)
    result["inductor_fx_compile_mode"] = getattr(mode_seen, "name", str(mode_seen))
    result["stock_compile_stats"] = _stock_compile_stats()
    result["unable_to_pickle"] = dict(counter.pickle_failures)
    try:
        from torch._dynamo.utils import counters

        result["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
        result["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    except Exception as e:  # noqa: BLE001 - informational only
        result["dynamo_counters_error"] = repr(e)

    if config == FXOFFLOAD_DEFAULT:
        import fxoffload as fxo  # already imported by Dynamo's entry-point lookup

        with contextlib.suppress(Exception):  # informational: the pool size it chose
            from torch._dynamo.backends.registry import lookup_backend

            result["workers"] = lookup_backend("fxoffload").settings.workers
    if fxo is not None:
        snap = fxo.stats()
        result["graphs_offloaded"] = snap.graphs_offloaded
        result["fallbacks"] = dict(snap.fallbacks)
        # Newer fields; getattr so that an older fxoffload still runs the benchmark.
        result["compiled_in_process"] = dict(getattr(snap, "compiled_in_process", {}) or {})
        result["fx_cache_hits"] = getattr(snap, "fx_cache_hits", None)
        result["aot_cache_hits"] = getattr(snap, "aot_cache_hits", None)
        # Field by field: Snapshot.as_dict() trips over its MappingProxyType fields.
        result["fxoffload_stats"] = {
            f.name: (dict(v) if isinstance(v, Mapping) else v)
            for f in dataclasses.fields(snap) for v in [getattr(snap, f.name)]}
    else:
        stats = result["stock_compile_stats"]
        in_process = stats.get("_InProcessFxCompile", 0)
        if config == "stock-serialize":
            # _DebugSerdeFxCompile round-trips through pickle, then compiles in this
            # process (so its compiles are counted under _InProcessFxCompile too).
            crossed = stats.get("_DebugSerdeFxCompile", 0)
            fell_back = max(0, in_process - crossed)
        elif config == "stock-subprocess":
            # The child's in-process compile is counted in the child, not here, so every
            # _InProcessFxCompile here is a graph that never left this process.
            crossed = stats.get("_SubprocessFxCompile", 0)
            fell_back = in_process
        else:
            crossed, fell_back = 0, 0
        result["graphs_offloaded"] = crossed
        # Name the fall-backs by the pickling error torch logged; the rest (e.g. a graph
        # with a higher-order op, skipped at debug level) count as "in_process".
        fallbacks: dict[str, int] = {}
        named = 0
        for why, n in counter.pickle_failures.items():
            if named + n > fell_back:
                break
            short = why.removeprefix("BypassFxGraphCache: ").removeprefix("Unable to pickle ")
            fallbacks[f"unable_to_pickle: {short}"] = n
            named += n
        if fell_back > named:
            fallbacks["in_process"] = fell_back - named
        result["fallbacks"] = fallbacks
        if config == "stock-subprocess":
            result["stock_left_process"] = crossed > 0 and fell_back == 0
            result["stock_left_process_graphs"] = f"{crossed}/{crossed + fell_back}"

    # ---- references, after the measurement -----------------------------------------
    t0 = time.perf_counter()
    out2 = _step(compiled, inputs, train, torch)
    _sync(torch, device)
    result["second_call_s"] = time.perf_counter() - t0

    if train:
        model.zero_grad(set_to_none=True)
    _step(model, inputs, train, torch)  # untimed: eager's own first-call costs
    _sync(torch, device)
    t0 = time.perf_counter()
    ref = _step(model, inputs, train, torch)
    _sync(torch, device)
    result["eager_call_s"] = time.perf_counter() - t0
    if not train:  # dropout makes train-mode outputs differ run to run
        with contextlib.suppress(Exception):
            result["max_abs_diff_vs_eager"] = float(
                (out.logits.float() - ref.logits.float()).abs().max())
    del out2


def main() -> int:
    spec = json.loads(sys.argv[1])
    result: dict[str, Any] = {
        "config": spec["config"], "model": spec["model"], "rep": spec.get("rep"),
        "first_call_s": None, "eager_call_s": None, "warmup_s": None, "fallbacks": {},
        "graphs_offloaded": None, "error": None,
    }
    t_start = time.perf_counter()
    try:
        run(spec, result)
    except BaseException as e:  # noqa: BLE001 - record any failure; the run goes on
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if "fxoffload" in sys.modules:
            try:
                sys.modules["fxoffload"].shutdown()
            except BaseException as e:  # noqa: BLE001
                result["shutdown_error"] = f"{type(e).__name__}: {e}"[:500]
    result["child_total_s"] = time.perf_counter() - t_start
    if "log_warnings" in result:
        result["log_warnings"] = dict(result["log_warnings"])
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
