"""The content key of a compile request: equal for the same compile asked by any process.

A compile farm runs one compile per key however many processes ask (single flight) and
stores its response under the key, so the key must change with anything that can change
the response, and must not change with anything else.

    content_key(request bytes) -> 64 hex digits (SHA-256)

It is computed from the request bytes alone, without unpickling the body: a key-format
version, the wire protocol version, the preamble less its per-process fields (as sorted
JSON), and the body's bytes. Measured (CPU, torch 2.13): 0.13-0.15 ms for a transformer
block (dim 256; 70-80 KB requests that ``encode_request`` takes 6-10 ms to build), 0.6-0.9
ms for twelve of them (0.4-0.6 MB, 45-110 ms to build); about half of it is the envelope's
own checksum, which ``split_request`` verifies.

**Covered.** The body, byte for byte: the FX graph (nodes, targets, metadata, stack
traces, generated code), the fake example inputs (shapes, strides, dtypes, devices, and
symbolic shapes with their ShapeEnv), the graph kwargs, the tracing context, and the
captured state (Inductor config, torch flags, logger levels, ...). From the preamble: the
torch version, the imports and custom ops the worker loads, the summary (node and input
counts, devices, forward/backward/inference), the client's CPU for a CPU graph
(``host_cpu``) and the properties of its GPUs for a CUDA graph (``gpus``: model, compute
capability, SM count, ...; UUIDs and PCI ids left out, so ranks on GPUs of one model share
a key). A field added to the preamble later is
covered unless it is named in ``EXCLUDED``: a field wrongly covered costs a compile, one
wrongly excluded could serve a wrong artifact.

**Excluded, per process.** ``request_id``, ``created``, ``cuda_rebind``; ``sys_path``
(where modules are found, not which: ``imports`` names them, and temp entries or their
order vary); the cache dirs (``cache_dir``, ``triton_cache_dir``: where the worker
writes, not what it compiles); the summary's ``compile_id`` (Dynamo's frame counter, for
logs). Inside the body, what differed between two fresh processes compiling the same
graph (ids of graphs, modules and SymNodes, function reprs with addresses, logger
creation order) is written in a stable form by the pickler itself
(``pickling._Deterministic``), so the body is hashed as is.

**Not shared, by design or for now.** Stack traces and source locations carry file paths
and line numbers: the same script at another path gives another key (Inductor's FX graph
cache keys on them too, through the graph's code). Per-process counters that depend on
what the process compiled before (``graph_kwargs["graph_id"]``, the tracing context's
``aot_graph_name``, nodes' ``seq_nr``) are in the body: processes that run the same
program agree on them; a process with another history gets another key (a compile, never
a wrong artifact). Sharing across histories would mean sending canonical counters and
patching the parent's own back into the response (``offload.install``).

**Devices.** The key includes the device string of every tensor (in the body and in the
summary). Inductor writes the index into the code it generates (``_DeviceGuard(1)``,
``get_raw_stream(1)``, ...), so a farm request names a rank's single CUDA device by a
canonical index instead (``device_index``): ranks on cuda:0..7 send the same body, and
``cuda_rebind``, which says which device the client rebinds the code to, is excluded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from . import wire
from .protocol import split_request

KEY_VERSION = 1  # bump when what the key covers changes: old stored entries stop matching

# Preamble fields that vary between processes asking for the same compile.
EXCLUDED = frozenset({"request_id", "created", "sys_path", "cache_dir", "triton_cache_dir",
                      "cuda_rebind"})
EXCLUDED_SUMMARY = frozenset({"compile_id"})


def keyed_preamble(request: bytes) -> tuple[dict[str, Any], bytes]:
    """The preamble fields the key covers, and the body (for tests and diagnostics)."""
    preamble, body = split_request(request, check_torch=False)
    fields = {k: v for k, v in dataclasses.asdict(preamble).items() if k not in EXCLUDED}
    fields["summary"] = {k: v for k, v in fields["summary"].items()
                         if k not in EXCLUDED_SUMMARY}
    return fields, body


def content_key(request: bytes) -> str:
    """The hex SHA-256 key of a request's compile: equal for requests of any process
    that compile the same graph under the same inputs, config and torch (module
    docstring); raises ``ProtocolError`` on bytes that are not a request."""
    fields, body = keyed_preamble(request)
    head = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=repr)
    h = hashlib.sha256()
    h.update(b"fxoffload-content-key:%d:%d\0" % (KEY_VERSION, wire.PROTOCOL_VERSION))
    h.update(len(head).to_bytes(8, "big"))
    h.update(head.encode())
    h.update(body)
    return h.hexdigest()
