"""The query path (Algorithm 1 step 3) as an ONNX graph, and a runner for it on onnxruntime.

The graph is a pure function of one task's memories: inputs `images` (n, 1, S, S), the six tensors
of Q* (`q_fast_0` .. `q_fast_5`), `R` (N, d), `M` (N, P), `attention_bias` (N,) (see
`TaskMemory.attention_bias`) and `n_way` (int64 scalar); outputs `probs` (n, max_way), calibrated
and zero for class ids >= n_way, `attention` (n, N) and `similarity` (n,). The number of queries n
and of support examples N are dynamic. `b`'s per-query kernels are batched matmuls over im2col
columns (`model.layers.conv_trunk_per_sample`): ONNX's Conv fixes `group` in the graph, so it could
not hold one kernel per query. Registration stays in torch (`MetaNet.register`).

onnx and onnxruntime are optional dependencies (extra `onnx`), imported when used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.errors import CheckpointError
from model.metanet import ClassifyOutput, MetaNet, TaskMemory, _cosine

INPUTS_AFTER_IMAGES = ("R", "M", "attention_bias", "n_way")
OUTPUTS = ("probs", "attention", "similarity")
OPSET = 18


class QueryPath(nn.Module):
    """`MetaNet`'s read of one task's memories, with the memories as arguments (for export)."""

    def __init__(self, model: MetaNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        *q_fast, R, M, attention_bias, n_way = args
        model = self.model
        r = model.u(images, q_fast)
        cosine = _cosine(r, R)
        attention = torch.softmax(cosine + attention_bias, dim=1)
        W_fast = model._unflatten(attention @ M, model.b_params())
        logits = model.b(images, W_fast, None) / model.temperature[n_way]
        keep = torch.arange(logits.shape[1], device=logits.device) < n_way
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=1)
        return probs, attention, cosine.amax(dim=1)


def input_names(model: MetaNet) -> list[str]:
    n_q = len(model.u_path_params())
    return ["images", *(f"q_fast_{k}" for k in range(n_q)), *INPUTS_AFTER_IMAGES]


def export_onnx(model: MetaNet, path: Path | str) -> Path:
    """Write the query path of `model` (on CPU, float32) to `path`; returns the path.

    A JSON sidecar `<path>.json` records the model version the graph was exported from, so a
    runner refuses a graph that does not match the weights it serves with.
    """
    import onnx  # noqa: F401  (fail early with a clear ImportError when the extra is missing)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_copy(model)
    example = _example_inputs(cpu)
    n_query = torch.export.Dim("n_query", min=1, max=65536)
    n_support = torch.export.Dim("n_support", min=2, max=cpu.config.max_examples)
    n_q = len(cpu.u_path_params())
    dynamic = ({0: n_query}, (*[None] * n_q, {0: n_support}, {0: n_support}, {0: n_support}, None))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes exporting at once do not mix
    # The exporter logs a warning for each torchvision operator it cannot register: not ours.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export and onnxscript warn about their own internals (deprecations, unused names)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            QueryPath(cpu).eval(), example, str(tmp), input_names=input_names(cpu),
            output_names=list(OUTPUTS), dynamic_shapes=dynamic, opset_version=OPSET,
            dynamo=True, optimize=True, verbose=False, external_data=False,
        )
    tmp.replace(path)
    sidecar = {"model_version": model.version, "max_way": model.config.max_way, "opset": OPSET,
               "inputs": input_names(cpu), "outputs": list(OUTPUTS),
               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    side_tmp = Path(f"{path}.{os.getpid()}.json.tmp")
    side_tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    side_tmp.replace(f"{path}.json")
    return path


class OnnxQueryPath:
    """Runs the exported graph with onnxruntime: `classify` as `MetaNet.classify` does.

    Uses the CUDA execution provider when onnxruntime has it and `device` is CUDA, else the CPU.
    """

    def __init__(self, path: Path | str, model: MetaNet, *, threads: int | None = None,
                 device: str = "cpu", one_thread_below: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        sidecar = Path(f"{path}.json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if meta.get("model_version") != model.version:
            raise CheckpointError(
                f"{path} was exported from model {meta.get('model_version', 'unknown')}, not "
                f"{model.version}; export it again with `metanet export-onnx`"
            )
        if meta.get("inputs") != input_names(model) or meta.get("outputs") != list(OUTPUTS):
            raise CheckpointError(
                f"{path} was exported by an older version of this software (its graph's inputs or "
                f"outputs differ); export it again with `metanet export-onnx`"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # onnxruntime's threads spin between runs by default: in a server that leaves no core for
        # the request handling between batches. Sleep instead (like OMP_WAIT_POLICY=PASSIVE).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        # Fewer images than `one_thread_below` run on a second, one-thread CPU session: waking a
        # sleeping thread pool costs more than a small batch gains from it.
        self._one_thread_below, self._solo = 0, self.session
        if one_thread_below > 0 and providers == ["CPUExecutionProvider"] and threads != 1:
            options.intra_op_num_threads = 1
            self._solo = ort.InferenceSession(str(path), options, providers=providers)
            self._one_thread_below = one_thread_below
        self._model = model
        self._names = input_names(model)

    def classify(
        self, memory: TaskMemory, images: Tensor, *, return_attention: bool = False
    ) -> ClassifyOutput:
        """Class probabilities of shape (n_query, n_way), as `MetaNet.classify`."""
        images = self._model._check_images(images, field="images", limit=None)
        feeds = dict(zip(self._names, [
            images, *memory.Q_fast, memory.R, memory.M.float(), memory.attention_bias,
        ], strict=False))
        arrays = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in feeds.items()}
        arrays["n_way"] = np.array(memory.n_way, dtype=np.int64)
        session = self._solo if len(images) < self._one_thread_below else self.session
        probs, attention, similarity = session.run(None, arrays)
        probs_t = torch.from_numpy(probs[:, : memory.n_way])
        return ClassifyOutput(probs_t, torch.from_numpy(attention) if return_attention else None,
                              torch.from_numpy(similarity))


def _cpu_copy(model: MetaNet) -> MetaNet:
    if next(model.parameters()).device.type == "cpu":
        return model
    copy = MetaNet(model.config)
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    copy.version, copy.max_way = model.version, model.max_way
    return copy


def _example_inputs(model: MetaNet) -> tuple[Tensor, ...]:
    """Inputs of the right shapes for tracing: 3 queries, a 2-way task of 4 examples."""
    size, n_support = model.config.image_size, 4
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(3, 1, size, size, generator=gen) > 0.8).float()
    q_fast = [torch.randn(p.shape, generator=gen) * 0.01 for p in model.u_path_params()]
    R = torch.randn(n_support, model.config.rep_dim, generator=gen)
    M = torch.randn(n_support, model.n_fast_b, generator=gen) * 0.01
    bias = -torch.log(torch.tensor([1.0, 3.0, 3.0, 3.0]))
    return (images, *q_fast, R, M, bias, torch.tensor(2, dtype=torch.int64))


__all__ = ["OnnxQueryPath", "QueryPath", "export_onnx"]
