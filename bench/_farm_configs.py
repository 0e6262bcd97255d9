"""The configurations bench/farm.py runs, and the names its modules share: which configs
exist and in what order they run, which use the farm or stock Inductor, the baseline and
reference configs, each fxoffload config's ``mode``, and the longer sequences that give a
warm farm graphs it has not seen. What each config means: bench/farm.py's docstring.
"""

from __future__ import annotations

CONFIGS = ("aot_eager", "stock-separate", "stock-shared", "subprocess", "farm-cold",
           "farm-warm", "farm-store", "async+farm")
FARM_CONFIGS = ("farm-cold", "farm-warm", "farm-store", "async+farm")
STOCK_CONFIGS = ("stock-separate", "stock-shared")
MODELS = ("gpt2", "llama")
BASELINE = "stock-separate"
REFERENCE = "aot_eager"
FXO_MODE = {"subprocess": "subprocess", "farm-cold": "farm", "farm-warm": "farm",
            "farm-store": "farm", "async+farm": "async+farm"}
# Graphs the farm has not seen: farm-warm and async+farm run the same model at a longer
# sequence (static shapes: other graphs, other kernels, the same amount of compiling).
# Asked again for a graph it compiled before, a farm worker finds the kernels in its own
# cache dir, so it neither compiles them nor sends them, and every client compiles them
# itself (fxoffload.farm.actors.CompileWorker.compile): that would be no "store miss".
SEQ_EXTRA = {"farm-warm": 8, "async+farm": 16}
