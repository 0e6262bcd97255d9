"""Summarising and rendering bench/farm.py's runs: the digest of one run's rank results
(``_digest``: medians, maxima, CPU sums, compile counts, farm answers, fallbacks), the
medians over repetitions per model and config (``summarise``, ratios against
stock-separate), the targets (``targets``: reported beside the numbers, not asserted),
the markdown report (``markdown``) and the one-line progress note (``_note``). Functions
of the records only, so ``--from-json`` renders saved runs again with them.
"""

from __future__ import annotations

import statistics
from typing import Any

from _farm_configs import BASELINE, FARM_CONFIGS, REFERENCE, SEQ_EXTRA, STOCK_CONFIGS

# Targets (reported beside the numbers, not asserted).
TARGET_UNTIL_COMPILED = 1.1  # until every rank runs compiled code <= 1.1 x stock first call
TARGET_CPU_SLACK = 1.1  # total compile CPU <= (stock's / K) x 1.1
TARGET_STORE_FIRST = 1.2  # store warm: first call <= 1.2 x aot_eager's first call
TARGET_WARM_MISS_FIRST = 1.0  # warm farm, store miss: first call <= 1.0 x stock's


def _digest(record: dict[str, Any]) -> None:
    ranks = [r for r in record["ranks"] if not r.get("error")]
    record["ok_ranks"] = len(ranks)
    first = [r["first_output_s"] for r in ranks if r.get("first_output_s") is not None]
    done = [r["compiled_s"] for r in ranks if r.get("compiled_s") is not None]
    full = len(ranks) == record["k"]
    record["first_output_median_s"] = statistics.median(first) if first else None
    record["first_output_max_s"] = max(first) if first and full else None
    record["until_all_compiled_s"] = max(done) if done and full else None
    record["rank_cpu_s"] = sum(r.get("cpu_exit_s") or 0.0 for r in record["ranks"])
    record["rank_cpu_window_s"] = sum(r.get("cpu_window_s") or 0.0 for r in record["ranks"])
    farm_cpu = record.get("farm_cpu_s") or 0.0
    record["compile_cpu_s"] = record["rank_cpu_s"] + farm_cpu
    record["compile_cpu_window_s"] = record["rank_cpu_window_s"] + farm_cpu
    record["compiles_in_ranks"] = sum(int(r.get("inductor_compiles_here") or 0)
                                      for r in ranks)
    record["graphs_per_rank"] = max((int(r.get("dynamo_unique_graphs") or 0) for r in ranks),
                                    default=None)
    config = record["config"]
    if config in STOCK_CONFIGS or config == REFERENCE:
        record["compiles"] = record["compiles_in_ranks"]
    elif config == "subprocess":
        record["compiles"] = record["compiles_in_ranks"] + sum(
            int(r.get("graphs_offloaded") or 0) for r in ranks)
    # farm configs: set by the caller from the farm's counters
    outcomes: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for r in ranks:
        for how, n in (r.get("farm") or {}).items():
            outcomes[how] = outcomes.get(how, 0) + int(n)
        for why, n in (r.get("fallbacks") or {}).items():
            fallbacks[why] = fallbacks.get(why, 0) + int(n)
        for why, n in (r.get("compiled_in_process") or {}).items():
            fallbacks[f"in_process:{why}"] = fallbacks.get(f"in_process:{why}", 0) + int(n)
    record["farm_outcomes"] = outcomes
    record["farm_files_installed"] = sum(int(r.get("farm_files_installed") or 0)
                                         for r in ranks)
    record["fallbacks"] = fallbacks
    record["fxgraph"] = {k: sum(int((r.get("fxgraph") or {}).get(k, 0)) for r in ranks)
                         for k in ("miss", "hit", "bypass")}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


FIELDS = ("compiles", "farm_compiles", "compiles_in_ranks", "until_all_compiled_s",
          "first_output_median_s", "first_output_max_s", "compile_cpu_s",
          "compile_cpu_window_s", "rank_cpu_s", "farm_cpu_s", "farm_up_s", "graphs_per_rank")


def summarise(records: list[dict[str, Any]], configs: list[str],
              models: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        rows = []
        for config in configs:
            these = [r for r in records if r["model"] == model and r["config"] == config]
            ok = [r for r in these if not r.get("errors")]
            row: dict[str, Any] = {"config": config, "n": len(these), "ok": len(ok),
                                   "k": these[0]["k"] if these else None,
                                   "seq": these[0].get("seq") if these else None}
            for f in FIELDS:
                row[f] = _median([r.get(f) for r in ok])
            row["per_rep"] = {f: [r.get(f) for r in these] for f in
                              ("compiles", "until_all_compiled_s", "first_output_median_s",
                               "compile_cpu_s")}
            outcomes: dict[str, int] = {}
            fallbacks: dict[str, int] = {}
            for r in ok:
                for how, n in (r.get("farm_outcomes") or {}).items():
                    outcomes[how] = outcomes.get(how, 0) + n
                for why, n in (r.get("fallbacks") or {}).items():
                    fallbacks[why] = fallbacks.get(why, 0) + n
            row["farm_outcomes"] = outcomes  # summed over reps
            row["load_before"] = _median([(r.get("loadavg_before") or [None])[0]
                                          for r in these])
            row["farm_files_installed"] = sum(int(r.get("farm_files_installed") or 0)
                                              for r in ok)
            row["fallbacks"] = fallbacks  # summed over reps
            row["per_key_max"] = max((r.get("farm_compiles_per_key_max") or 0 for r in ok),
                                     default=None) if config in FARM_CONFIGS else None
            row["errors"] = [f"rep {r['rep'] + 1}: {e}" for r in these
                             for e in r.get("errors", [])]
            rows.append(row)
        # a farm block that failed as a whole
        for r in records:
            if r["model"] == model and r["config"] == "farm":
                rows.append({"config": "farm", "n": 1, "ok": 0, "k": r["k"],
                             **dict.fromkeys(FIELDS), "per_rep": {}, "farm_outcomes": {},
                             "fallbacks": {}, "per_key_max": None,
                             "errors": [f"rep {r['rep'] + 1}: {e}" for e in r["errors"]]})
        base = next((r for r in rows if r["config"] == BASELINE), None)
        for row in rows:
            for f, bf in (("until_all_compiled_s", "first_output_median_s"),
                          ("compile_cpu_s", "compile_cpu_s"),
                          ("compile_cpu_window_s", "compile_cpu_window_s")):
                b = base.get(bf) if base else None
                row[f"{f}_x_stock"] = (row[f] / b if b and row.get(f) is not None
                                       else None)
        out[model] = rows
    return out


def targets(summary: dict[str, list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(model: str, config: str, target: str, measured: str, met: bool | None,
            reps: int) -> None:
        out.append({"model": model, "config": config, "target": target,
                    "measured": measured, "met": met, "reps": reps})

    for model, rows in summary.items():
        by = {r["config"]: r for r in rows}
        base, ref = by.get(BASELINE), by.get(REFERENCE)
        stock_first = base.get("first_output_median_s") if base else None
        stock_cpu = base.get("compile_cpu_s") if base else None
        stock_cpu_w = base.get("compile_cpu_window_s") if base else None
        for config in FARM_CONFIGS:
            r = by.get(config)
            if r is None or not r["ok"]:
                continue
            # graphs per rank: what each stock rank compiled (forward and backward of
            # every Dynamo graph), else two per Dynamo graph
            graphs = r.get("graphs_per_rank")
            want = (base["compiles"] / base["k"] if base and base.get("compiles")
                    else None if graphs is None else 2 * graphs)
            if config != "farm-store" and r.get("farm_compiles") is not None:
                met = (want is not None and r["farm_compiles"] == want
                       and (r.get("per_key_max") or 0) <= 1)
                add(model, config, f"K={r['k']} ranks -> exactly 1 compile per graph "
                    "(forward and backward of each Dynamo graph) on the farm",
                    f"{r['farm_compiles']:g} farm compiles (median) for {want:g} graphs; "
                    f"max {r.get('per_key_max')} per key", met, r["ok"])
            if config == "farm-store" and r.get("farm_compiles") is not None:
                add(model, config, "store warm -> 0 compiles",
                    f"{r['farm_compiles']:g} farm compiles", r["farm_compiles"] == 0, r["ok"])
            u = r.get("until_all_compiled_s")
            if u is not None and stock_first:
                v = u / stock_first
                add(model, config, f"until every rank runs compiled code <= "
                    f"{TARGET_UNTIL_COMPILED}x stock-separate's median first call",
                    f"{v:.2f}x ({u:.2f} s / {stock_first:.2f} s)",
                    v <= TARGET_UNTIL_COMPILED, r["ok"])
            c = r.get("compile_cpu_s")
            if c is not None and stock_cpu:
                limit = stock_cpu / k * TARGET_CPU_SLACK
                add(model, config, f"compile CPU-s (ranks at exit + farm) <= stock's / K "
                    f"+ 10% ({limit:.1f} s)", f"{c:.1f} s ({c / stock_cpu:.2f}x stock's "
                    f"{stock_cpu:.1f} s)", c <= limit, r["ok"])
            cw = r.get("compile_cpu_window_s")
            if cw is not None and stock_cpu_w:
                limit = stock_cpu_w / k * TARGET_CPU_SLACK
                add(model, config, f"the same from READY on (no imports/model build) <= "
                    f"stock's / K + 10% ({limit:.1f} s)", f"{cw:.1f} s "
                    f"({cw / stock_cpu_w:.2f}x stock's {stock_cpu_w:.1f} s)", cw <= limit,
                    r["ok"])
            f = r.get("first_output_median_s")
            if config == "farm-store" and f is not None and ref and \
                    ref.get("first_output_median_s"):
                # The target is a new process's first call: K ranks at once share the
                # machine's cores, while the aot_eager reference runs alone.
                a = ref["first_output_median_s"]
                add(model, config, f"store warm: first call (median over ranks) <= "
                    f"{TARGET_STORE_FIRST}x aot_eager's (one rank)"
                    + ("" if r["k"] == 1 else f"; at K={r['k']} for information: the "
                       "target is K=1's"),
                    f"{f / a:.2f}x ({f:.2f} s / {a:.2f} s)",
                    (f / a <= TARGET_STORE_FIRST) if r["k"] == 1 else None, r["ok"])
            if config == "farm-warm" and f is not None and stock_first:
                add(model, config, f"warm farm, store miss: first call (median over ranks)"
                    f" <= {TARGET_WARM_MISS_FIRST}x stock-separate's",
                    f"{f / stock_first:.2f}x ({f:.2f} s / {stock_first:.2f} s)",
                    f / stock_first <= TARGET_WARM_MISS_FIRST, r["ok"])
    return out


def _met(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "no"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(summary: dict[str, list[dict[str, Any]]], tg: list[dict[str, Any]],
             meta: dict[str, Any]) -> str:
    a = meta["args"]
    lines = [
        "# Compile farm: K ranks at once",
        "",
        "```sh",
        *[f"{i['command']}  # {i.get('when', '?')}, {i['runs']} runs, included"
          for i in meta.get("included") or []],
        meta["command"],
        "```",
        "",
        "- code measured: "
        + "; ".join(f"{g.get('head', '?')}"
                    + (f" with uncommitted {', '.join(x.split()[-1] for x in g['src_changes'])}"
                       if g.get("src_changes") else "")
                    for g in [*(i.get("git") or {} for i in meta.get("included") or []),
                              meta.get("git") or {}]),
        f"- {meta['when']}; torch {meta.get('torch_version', '?')}, Python "
        f"{meta.get('child_python', '?')}, Ray {meta.get('ray_version', '?')}, "
        f"{meta['host_cpus']} CPUs, {meta.get('mem_gib', '?')} GiB",
        f"- device {a['device']}, dtype {a['dtype']}, size {a['size']}, one training step "
        f"(forward + backward); K = {a['k']} ranks (aot_eager: 1), {a['reps']} rep(s), "
        f"farm workers {a['farm_workers']}; medians over reps; times from the common "
        "start (all ranks ready, released at once)",
        "- ratios (x) are against stock-separate in the same run: time against its median "
        "first output, CPU against its CPU",
        f"- {meta.get('netns', '')}",
        "",
    ]
    for model, rows in summary.items():
        lines += [
            f"## {model}",
            "",
            "| config | K | compiles | in ranks | until all compiled (s) | x | first output "
            "median / max (s) | compile CPU-s: ranks + farm | x | from READY | x | farm CPU-s "
            "| farm up (s) | farm answers | fallbacks | load | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
        ]
        for r in rows:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["farm_outcomes"].items()))
            if outcomes:
                outcomes += f"; kernel files installed {r.get('farm_files_installed', 0)}"
            name = r["config"] + (f" (seq {r['seq']})" if r.get("seq") else "")
            fb = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallbacks"].items())) or "none"
            comp = "-" if r.get("compiles") is None else f"{r['compiles']:g}"
            in_ranks = _fmt(r.get("compiles_in_ranks"), 0)
            lines.append(
                f"| {name} | {r['k']} | {comp} | {in_ranks} "
                f"| {_fmt(r['until_all_compiled_s'])} | {_x(r['until_all_compiled_s_x_stock'])} "
                f"| {_fmt(r['first_output_median_s'])} / {_fmt(r['first_output_max_s'])} "
                f"| {_fmt(r['compile_cpu_s'], 1)} | {_x(r['compile_cpu_s_x_stock'])} "
                f"| {_fmt(r['compile_cpu_window_s'], 1)} "
                f"| {_x(r['compile_cpu_window_s_x_stock'])} | {_fmt(r['farm_cpu_s'], 1)} "
                f"| {_fmt(r['farm_up_s'])} | {outcomes or '-'} | {fb} "
                f"| {_fmt(r.get('load_before'), 1)} | {r['ok']}/{r['n']} |")
        lines.append("")
        errors = [(r["config"], e) for r in rows for e in r["errors"]]
        if errors:
            lines += ["Errors:", ""] + [f"- {c} {e.splitlines()[0][:300]}" for c, e in errors]
            lines.append("")
    if tg:
        lines += ["## Targets (reported, not asserted)", "",
                  "| model | config | target | measured (median) | met | reps |",
                  "|---|---|---|---|---|---:|"]
        lines += [f"| {t['model']} | {t['config']} | {t['target']} | {t['measured']} "
                  f"| {_met(t['met'])} | {t['reps']} |" for t in tg]
        lines.append("")
    lines += [
        "Columns: *compiles*, Inductor compiles of the run (stock: in the ranks; "
        "subprocess: in the ranks' pools and the ranks; farm: the farm's `compiles` delta "
        "plus any in a rank, *in ranks*); *until all compiled*, the last rank's time to "
        "having run compiled code (async: after `fxoffload.wait()` and one more step); "
        "*compile CPU-s*, the ranks' CPU at exit (self + reaped children) plus the farm's "
        "processes' CPU over the run; *from READY*, the same without each rank's imports "
        "and model build; *farm CPU-s* includes the idle farm's own "
        f"({_fmt(meta.get('farm_idle_cpu_per_s'), 3)} CPU-s per s when idle, measured after "
        "`farm up`); *farm answers*, the ranks' `fxoffload.stats().farm`, summed over reps.",
        "",
        "One farm per model and repetition, in this order: farm-cold (started right before "
        "its ranks, `farm up` timed apart); farm-warm, the same farm with its counters zeroed "
        "(registry `reset_stats`, no restart) asked for graphs it has not seen: the same "
        f"model at a longer sequence (+{SEQ_EXTRA['farm-warm']}), so every graph misses the "
        "store and is compiled by a warm worker (the same graphs again would only be "
        "store hits); farm-store, counters "
        "zeroed, store kept, the base shape again: farm-cold's graphs; async+farm, store "
        "emptied (`clear_store`), at "
        f"+{SEQ_EXTRA['async+farm']}. *kernel files installed*: the ranks' "
        "`stats().farm_files_installed`, summed over ranks and reps. *load*: the 1-minute "
        "load average just before the ranks started (median; the machine is shared).",
        "",
    ]
    return "\n".join(lines)


def _note(rec: dict[str, Any]) -> str:
    if rec.get("errors"):
        return (f"{rec['model']} rep {rec['rep'] + 1} {rec['config']}: ERROR "
                f"{'; '.join(rec['errors'])[:400]}")
    farm = (f", farm {rec['farm_outcomes']} (kernel files installed "
            f"{rec.get('farm_files_installed')})" if rec.get("farm_outcomes") else "")
    return (f"{rec['model']} rep {rec['rep'] + 1} {rec['config']} (K={rec['k']}, load "
            f"{rec['loadavg_before'][0]:.1f}): "
            f"compiles {rec.get('compiles')}, until all compiled "
            f"{_fmt(rec.get('until_all_compiled_s'))} s, first output median/max "
            f"{_fmt(rec.get('first_output_median_s'))}/{_fmt(rec.get('first_output_max_s'))} s"
            f", CPU {_fmt(rec.get('compile_cpu_s'), 1)} s (window "
            f"{_fmt(rec.get('compile_cpu_window_s'), 1)}, farm "
            f"{_fmt(rec.get('farm_cpu_s'), 1)}"
            + (f": {rec['farm_cpu_by_kind']}" if rec.get("farm_cpu_by_kind") else "")
            + f"){farm}"
            + (f", fallbacks {rec['fallbacks']}" if rec.get("fallbacks") else ""))
