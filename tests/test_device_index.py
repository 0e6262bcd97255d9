"""Ranks that differ only in their CUDA device index ask the farm for one compile
(fxoffload.device_index).

On any machine (a virtual GPU stands in for the devices; nothing is compiled): a farm
request of a graph on cuda:1 is the bytes of the same graph's request on cuda:0, so their
content keys are equal; a graph on two devices, or another executor, keeps its index;
the rewrite of generated code and the kernel files' dir. The GPU machine checks the whole
path (tests/test_virtual_gpu.py: compiled for cuda:1, rebound to cuda:0, code and outputs
equal stock's)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import H100
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxoffload import offload, protocol, virtual_gpu
from fxoffload.content_key import content_key
from fxoffload.device_index import Rebind, kernel_file, rebind_code
from fxoffload.errors import ProtocolError
from fxoffload.settings import Settings


def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # device constants in the graph (aten.arange, aten.ones with device=...)
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
    return torch.relu(x @ w) + pos + torch.ones(3, device=x.device).sum()


def two_devices(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w).to("cuda:0") + 1


def request(fn: Any, index: int, mode: str = "farm", *, local: bool = False) -> bytes:
    from torch._inductor.cudagraph_utils import BoxedDeviceIndex

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    with fake_mode:
        x = torch.randn(4, 8, device=f"cuda:{index}")
        w = torch.randn(8, 8, device=f"cuda:{index}")
    gm = make_fx(fn, tracing_mode="fake")(x, w)
    settings = Settings(mode=mode, farm="127.0.0.1:1") if mode == "farm" else Settings(mode=mode)
    # a backward's box: the device its forward ran on (cudagraphs)
    graph_kwargs = {"boxed_forward_device_index": BoxedDeviceIndex(index)}
    args = (settings, gm, [x, w], [], graph_kwargs, None, fake_mode)
    if not local:
        return offload.build_request(*args)
    shared, own = offload.build_requests(*args)
    # the shared one, as build_request writes it (request ids aside)
    assert protocol.split_request(shared)[1] == protocol.split_request(
        offload.build_request(*args))[1]
    assert own is not None
    return own


@pytest.fixture
def two_gpus() -> Any:
    with virtual_gpu.installed({"0": H100, "1": H100}):
        yield


def test_ranks_on_two_devices_send_the_same_request(two_gpus: None) -> None:
    on0, on1 = request(step, 0), request(step, 1)
    assert content_key(on0) == content_key(on1)
    (p0, body0), (p1, body1) = (protocol.split_request(r) for r in (on0, on1))
    assert body0 == body1  # byte for byte: devices, fake tensors, the graph's code
    assert p0.cuda_rebind is None and p1.cuda_rebind == [0, 1]
    assert p1.summary["devices"] == ["cuda:0"] and list(p1.gpus or {}) == ["0"]
    # the canonical request decodes to a graph on cuda:0
    decoded = protocol.decode_request_body(body1, FakeTensorMode(shape_env=ShapeEnv()))
    assert {t.device for t in decoded.example_inputs} == {torch.device("cuda:0")}
    assert "index=1" not in decoded.gm.code
    assert decoded.graph_kwargs["boxed_forward_device_index"].value == 0


def test_what_keeps_its_index(two_gpus: None) -> None:
    # another executor: nothing is shared, nothing rebound
    sub0, sub1 = request(step, 0, "subprocess"), request(step, 1, "subprocess")
    assert content_key(sub0) != content_key(sub1)
    assert protocol.split_request(sub1)[0].cuda_rebind is None
    # a farm request to be compiled here (a background stage's fallback): its own device
    local = protocol.split_request(request(step, 1, local=True))[0]
    assert local.cuda_rebind is None and local.summary["devices"] == ["cuda:1"]
    # a graph on two devices names both, as they are
    both = protocol.split_request(request(two_devices, 1))[0]
    assert both.cuda_rebind is None and both.summary["devices"] == ["cuda:1"]


# The device sites of a wrapper module that Inductor (torch 2.11) generated on an H100
# for a graph on cuda:0, cut down (and its long lines wrapped): guards, stream, a
# fallback's device literal, a kernel's DeviceProperties and benchmark harness.
WRAPPER = """
from torch import device, empty_strided
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton_heuristics.pointwise(
    size_hints={'x': 32}, filename=__file__,
    triton_meta={'signature': {'in_ptr0': '*fp32', 'xnumel': 'i32'},
        'device': DeviceProperties(type='cuda', index=0, multi_processor_count=132, cc=90,
        major=9, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
        warp_size=32), 'constants': {}},
    inductor_meta={'grid_type': 'Grid1D', 'kernel_name': 'triton_poi_fused_add_0',
        'num_load': 1},
    min_elem_per_thread=0
)
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 32
    x0 = xindex
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
''', device_str='cuda')

def call(args):
    arg0_1, = args
    with torch.cuda._DeviceGuard(0):
        torch.cuda.set_device(0)
        buf0 = empty_strided_cuda((4, 8), (8, 1), torch.float32)
        buf1 = torch.ops.aten.arange.default(8, device=device(type='cuda', index=0))
        buf2 = torch.empty(8, device=torch.device('cuda', 0))
        stream0 = get_raw_stream(0)
        triton_poi_fused_add_0.run(arg0_1, buf0, 32, stream=stream0)
        raw_stream0 = get_raw_stream(0)  # torch 2.13's name
        triton_poi_fused_add_0.run(arg0_1, buf0, 32, stream=raw_stream0)
        seed = torch.cuda.default_generators[0].graphsafe_get_state()
    return (buf0, )

def benchmark_compiled_module(times=10, repeat=10):
    arg0_1 = rand_strided((4, 8), (8, 1), device='cuda:0', dtype=torch.float32)
"""


def test_rebind_code_names_the_rank_device() -> None:
    out = rebind_code(WRAPPER, Rebind(canonical=0, real=3))
    for site in ("_DeviceGuard(3)", "set_device(3)", "stream3 = get_raw_stream(3)",
                 "stream=stream3", "raw_stream3 = get_raw_stream(3)", "stream=raw_stream3",
                 "default_generators[3]", "device(type='cuda', index=3)",
                 "DeviceProperties(type='cuda', index=3,", "device='cuda:3'",
                 "torch.device('cuda', 3)"):
        assert site in out, site
    # the numbers that are not devices stay: sizes, strides, kernel names and counts
    assert "empty_strided_cuda((4, 8), (8, 1)" in out and "triton_poi_fused_add_0" in out
    assert "'num_load': 1" in out and "xnumel = 32" in out
    assert rebind_code(out, Rebind(canonical=3, real=0)) == WRAPPER  # and back


def test_rebind_refuses_a_device_it_does_not_know() -> None:
    unknown = WRAPPER + "\n    torch.cuda.synchronize('cuda:0' if True else None)\n" \
        + "    x = other_api(device_index=0, index=0)\n"
    with pytest.raises(ProtocolError, match=r"could not be rebound to cuda:2.*index=0") as e:
        rebind_code(unknown, Rebind(canonical=0, real=2))
    assert e.value.reason == "device_rebind_failed"


def test_kernel_files_go_to_the_rank_device_dir() -> None:
    rebind = Rebind(canonical=0, real=5)
    assert kernel_file("inductor/triton/0/ABC/k.cubin", rebind) == "inductor/triton/5/ABC/k.cubin"
    assert kernel_file("inductor/ab/cabc.py", rebind) == "inductor/ab/cabc.py"
    assert kernel_file("triton/ABC/k.cubin", rebind) == "triton/ABC/k.cubin"
