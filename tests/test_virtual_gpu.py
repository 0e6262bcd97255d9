"""A worker with no GPU compiles CUDA graphs for the client's GPU (fxoffload.virtual_gpu).

On any machine: the stand-ins answer from the client's description, leave nothing behind,
and fail clearly outside a compile; the description is part of the content key. On the
GPU machine: a farm whose workers run with CUDA_VISIBLE_DEVICES empty compiles a training
step for a GPU client, which loads it without compiling a kernel itself; outputs and
generated code equal stock's."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import H100, assert_same_code

from fxoffload import device_index, patches, protocol, virtual_gpu
from fxoffload.content_key import content_key


def test_stand_ins_answer_from_the_description_and_are_undone() -> None:
    from torch._dynamo.device_interface import get_interface_for_device
    from torch._inductor.runtime.hints import DeviceProperties
    from torch._subclasses import FakeTensorMode

    originals = (torch.cuda.is_available, torch.cuda.get_device_properties)
    available = torch.cuda.is_available()
    with virtual_gpu.installed({"0": H100}):
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        assert torch.cuda.get_device_capability() == (9, 0)
        assert torch.cuda.get_device_name(0) == H100["name"]
        assert torch.cuda.is_bf16_supported()
        interface = get_interface_for_device("cuda")
        assert interface.get_compute_capability(0) == 90
        assert interface.Worker.get_device_properties(0).multi_processor_count == 132
        props = DeviceProperties.create(torch.device("cuda:0"))
        assert (props.multi_processor_count, props.cc, props.warp_size) == (132, 90, 32)
        with torch.cuda.device(0):  # Inductor's device guards
            assert torch.cuda.current_device() == 0
        with pytest.raises(RuntimeError, match="cuda:1 was asked for"):
            torch.cuda.get_device_properties(1)
        with FakeTensorMode() as mode:  # a fake CUDA tensor makes no real one
            fake = torch.empty(3, 4, device="cuda") * 2
        assert fake.device == torch.device("cuda:0") and mode.avoid_device_init
        assert any(p.startswith("virtual_gpu: ") for p in patches.installed())
    assert (torch.cuda.is_available, torch.cuda.get_device_properties) == originals
    assert torch.cuda.is_available() == available
    # a client on cuda:1 describes only it: cuda:0, which Inductor asks in a few places,
    # answers as it; an index past the described ones is refused
    with virtual_gpu.installed({"1": H100}):
        assert torch.cuda.current_device() == 1 and torch.cuda.device_count() == 2
        assert torch.cuda.get_device_properties(0).multi_processor_count == 132
        with pytest.raises(RuntimeError, match="cuda:2 was asked for"):
            torch.cuda.get_device_properties(2)
    assert not any(p.startswith("virtual_gpu: ") for p in patches.installed())
    from torch._dynamo.device_interface import caching_worker_device_properties

    assert "cuda" not in caching_worker_device_properties  # the virtual GPU stays inside
    # A Triton driver built during a compile keeps the stand-ins it bound: they refuse.
    with pytest.raises(RuntimeError, match=r"outside virtual_gpu\.installed"):
        virtual_gpu.get_device_capability(0)


def test_the_client_gpu_is_in_the_key(tmp_path: Path) -> None:
    """A CPU graph's request with a GPU description added: another key, and another
    for another GPU model (a compile for one architecture never serves another)."""
    import fxoffload

    backend = fxoffload.backend(mode="capture", capture_dir=tmp_path)
    torch.compile(lambda x: x + 1, backend=backend)(torch.randn(2))
    (request,) = tmp_path.glob("*.request.fxo")
    data = request.read_bytes()
    preamble, body = protocol.split_request(data)
    assert preamble.gpus is None  # no CUDA tensor in the graph
    keys = {content_key(data)}
    for gpu in (H100, {**H100, "name": "NVIDIA H200", "total_memory": 150_000_000_000},
                {**H100, "major": 8, "name": "NVIDIA A100-SXM4-80GB"}):
        keys.add(content_key(protocol.join_request(
            dataclasses.replace(preamble, gpus={"0": gpu}), body)))
    assert len(keys) == 4
    assert virtual_gpu.describe(["cpu"]) is None


_KERNEL_PATH = re.compile(r"(# kernel path: )\S*/(?=\w\w/\w+\.py)")
CLIENT = textwrap.dedent("""
    import json, sys, torch, fxoffload
    from pathlib import Path
    from torch._inductor.utils import run_and_get_code
    from models import Block
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = Block().cuda()
    x = torch.randn(2, 8, 32, device="cuda")
    backend = "inductor" if mode == "stock" else fxoffload.backend(mode="farm")
    compiled = torch.compile(model, backend=backend)
    def step():
        y = compiled(x)
        y.pow(2).mean().backward()
        return [y.detach()] + [p.grad for p in model.parameters()]
    result, code = run_and_get_code(step)
    report = {"code": code}
    if mode != "stock":
        from fxoffload.executors.farm import INSTALLED
        import os
        cache = Path(sys.argv[3])
        # Installed names are "inductor/..." or "triton/..." (Triton's own dir, which
        # Inductor sets to <cache>/triton/<device> when the first kernel loads)
        roots = {"inductor": cache, "triton": Path(os.environ.get("TRITON_CACHE_DIR", ""))}
        installed = {roots[n.split("/", 1)[0]] / n.split("/", 1)[1] for n in INSTALLED}
        report["compiled_here"] = sorted({p.parent.name[:8] + "/" + p.stem
                                          for p in (cache / "triton").rglob("*")
                                          if p.is_file() and p not in installed
                                          and p.suffix not in (".so", ".c")})  # launchers
        report["stats"] = fxoffload.stats().as_dict()
    torch.save(result, out + ".pt")
    Path(out + ".json").write_text(json.dumps(report))
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_farm_workers_without_a_gpu_compile_for_the_client(tmp_path: Path) -> None:
    import farm_support

    farm_support.require_farm_environment()
    farm = farm_support.start(tmp_path / "farm", workers=1,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        reports: dict[str, Any] = {}
        # "rebind": the client asks for cuda:1 (device_index's canonical index, moved for
        # this test) and rebinds the farm's code to its cuda:0, as a rank on cuda:1 of a
        # machine with two GPUs takes the code the farm compiled for cuda:0
        for mode in ("stock", "farm", "rebind"):
            cache = tmp_path / f"cache-{mode}"
            env = {**farm.env(), "TORCHINDUCTOR_CACHE_DIR": str(cache),
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
            if mode == "rebind":
                env[device_index.CANONICAL_ENV] = "1"
                # its own compiles, not the farm client's whole graphs (farm.graphs: the
                # same AOTAutograd key, as a rank on another device would not have)
                env["FXOFFLOAD_FARM_GRAPHS"] = "0"
            done = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path / mode), mode,
                                   str(cache)], env=env, capture_output=True, text=True,
                                  timeout=600, check=False)
            assert done.returncode == 0, done.stdout + done.stderr[-4000:]
            reports[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
            reports[mode]["stderr"] = done.stderr[-3000:]  # fxoffload's WARNINGs
        stock = torch.load(tmp_path / "stock.pt")
        for mode in ("farm", "rebind"):
            stats = reports[mode]["stats"]
            about = f"{mode}: {json.dumps(stats)}\n{reports[mode]['stderr']}"
            assert stats["fallbacks"] == {}, about
            assert stats["compiled_in_process"] == {}, about
            assert stats["gpu_less_compiles"] == 2, about
            assert stats["device_rebinds"] == (2 if mode == "rebind" else 0), about
            assert stats["farm_files_installed"] > 0, about
            assert reports[mode]["compiled_here"] == [], about  # every kernel: the farm's
            for a, b in zip(torch.load(tmp_path / f"{mode}.pt"), stock, strict=True):
                torch.testing.assert_close(a, b)
            # up to the "# kernel path:" comments, which name the compiling process's
            # cache dir
            try:
                assert_same_code(*([_KERNEL_PATH.sub(r"\1", c) for c in reports[m]["code"]]
                                   for m in (mode, "stock")))
            except AssertionError as e:
                raise AssertionError(f"{mode}: {e}") from None
        # cuda:1's graphs are other graphs to the farm (another key): compiled, not hit
        assert reports["farm"]["stats"]["farm"].get("compiled") == 2
        assert reports["rebind"]["stats"]["farm"].get("compiled") == 2
    finally:
        farm_support.stop(farm)
