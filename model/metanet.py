"""Meta Networks (Munkhdalai & Yu, ICML 2017) for few-shot image classification.

Two phases with no hidden state: `register(support) -> TaskMemory` (Algorithm 1, steps 1-2: Q*, R
and M) and `classify(memory, queries)` (step 3: attention over R reads W* from M). `episode_loss` is
step 4, used by meta-training; `batched_episode_loss` is step 4 for several episodes of one shape
in one pass (several episodes per optimizer step).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from model.config import MetaNetConfig
from model.errors import InvalidTaskError
from model.layers import (
    CoordinateLSTM,
    CoordinateMLP,
    conv_trunk,
    conv_trunk_per_sample,
    conv_trunk_per_task,
    preprocess_grad,
)

# Coordinates handed to `m` in one go at registration: bounds its (coords, 20) hidden activations.
_M_BLOCK_COORDS = 4_000_000
# Queries through `b` in one go at classification: bounds the (n_query, P) mixed fast weights.
_QUERY_BLOCK = 64
# Two support examples of different classes whose representations are at least this similar
# (cosine of their rows of R) are ones the model cannot tell apart (`MetaNet.check_support`).
CONFUSABLE_COSINE = 0.99
# Initial scale of the meta learners' output layers (see `reset_parameters`).
_FAST_INIT_SCALE = 0.02


@dataclass(frozen=True)
class TaskMemory:
    """Everything a registered task needs at query time; immutable once built.

    Attributes:
        labels: class names; class id k is labels[k] (order of first appearance in the support set).
        support_labels: class id of each support example, of shape (n_support,).
        Q_fast: task-level fast weights Q* of u, one tensor per layer on the path to r.
        R: memory of representations r'_i, of shape (n_support, rep_dim).
        M: memory of example-level fast weights W*_i (all of b's layers, flattened),
            of shape (n_support, P).
    """

    labels: tuple[str, ...]
    support_labels: Tensor
    Q_fast: tuple[Tensor, ...]
    R: Tensor
    M: Tensor

    @property
    def n_way(self) -> int:
        return len(self.labels)

    @property
    def n_support(self) -> int:
        return int(self.R.shape[0])

    @property
    def device(self) -> torch.device:
        return self.R.device

    @property
    def attention_bias(self) -> Tensor:
        """-log(examples of its class) per support example, of shape (n_support,): added to the
        attention's scores, it weighs each example by 1 / its class's size, so every class offers
        the same total weight to the read of M whatever its number of examples (a class of two
        would otherwise pull twice the fast weights of a class of one). Zero where classes are even
        sized: softmax is unchanged by a constant shift."""
        counts = torch.bincount(self.support_labels, minlength=self.n_way)
        return -torch.log(counts[self.support_labels].to(self.R.dtype))

    @property
    def nbytes(self) -> int:
        tensors = [self.support_labels, self.R, self.M, *self.Q_fast]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> TaskMemory:
        return TaskMemory(
            labels=self.labels,
            support_labels=self.support_labels.to(device),
            Q_fast=tuple(q.to(device) for q in self.Q_fast),
            R=self.R.to(device),
            M=self.M.to(device),
        )

    def with_m_dtype(self, dtype: torch.dtype) -> TaskMemory:
        """The same memory with M held in `dtype` (float16/bfloat16 halve the footprint)."""
        return TaskMemory(self.labels, self.support_labels, self.Q_fast, self.R, self.M.to(dtype))


class ClassifyOutput(NamedTuple):
    probs: Tensor  # (n_query, n_way), calibrated: softmax(logits / temperature[n_way])
    attention: Tensor | None  # (n_query, n_support): the read of M (see TaskMemory.attention_bias)
    similarity: Tensor  # (n_query,): the best cosine of the query's r to the rows of R


class SupportCheck(NamedTuple):
    """What the model makes of a task's own support set (`MetaNet.check_support`)."""

    predicted: Tensor  # (n_support,): the class id each support image is classified as
    confidence: Tensor  # (n_support,): the probability of that class
    confusable: list[tuple[int, int, float]]  # (i, j, cosine) of examples of different classes


class MetaNet(nn.Module):
    """The Omniglot MetaNet: u (Q, Q*), b (W, W*), meta learners d (G) and m (Z)."""

    def __init__(self, config: MetaNetConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or MetaNetConfig()
        self.version = "untrained"  # set by model.checkpoint.load_model from the weights' hash
        # Largest task this model answers: the heads' size, or less when the weights were trained
        # on smaller episodes only (a checkpoint's "trained_max_way"): the untrained slots of the
        # softmax layer would outvote the trained ones, so such tasks are refused, not misanswered.
        self.max_way = cfg.max_way
        conv_shapes = [(cfg.channels, 1, 3, 3)] + [(cfg.channels, cfg.channels, 3, 3)] * (
            cfg.n_blocks - 1
        )
        # Slow weights Q of u: conv kernels, FC to r, and the auxiliary head of the representation
        # loss. W of b: conv kernels, FC + ReLU, softmax layer. No biases anywhere (authors' code).
        self.u_convs = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in conv_shapes])
        self.u_fc = nn.Parameter(torch.empty(cfg.rep_dim, cfg.channels))
        # The auxiliary head only shapes the gradients fed to d; the query loss cannot reach it
        # (meta information is first-order), so it is a fixed random projection, not trained.
        self.register_buffer("u_aux", torch.empty(cfg.max_way, cfg.rep_dim))
        self.b_convs = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in conv_shapes])
        self.b_fc = nn.Parameter(torch.empty(cfg.hidden_dim, cfg.channels))
        self.b_out = nn.Parameter(torch.empty(cfg.max_way, cfg.hidden_dim))
        # Meta learners, one for conv-kernel coordinates and one for FC coordinates (authors' code).
        self.m_conv = CoordinateMLP(cfg.meta_hidden)  # Z
        self.m_fc = CoordinateMLP(cfg.meta_hidden)
        self.d_conv = CoordinateLSTM(cfg.meta_hidden)  # G
        self.d_fc = CoordinateLSTM(cfg.meta_hidden)

        # The meta learners emit O(1) values per coordinate; scaling them by 1/sqrt(fan_in) of
        # their layer keeps a fast branch's activations on the scale of the slow branch's. (Our
        # choice: the paper and code leave the scale to the meta learner alone, which made the
        # untrained 5-layer fast branch overflow in our runs.)
        # Calibration: a task of n classes answers softmax(logits / temperature[n]); 1 until
        # fitted on held-out alphabets (model.calibrate), then saved with the weights. One value
        # per class count: the logits sharpen as the class count falls (a fitted T runs from
        # about 5 at 2 classes to 0.7 at 50), so one T for all leaves some counts miscalibrated.
        self.register_buffer("temperature", torch.ones(cfg.max_way + 1))
        self.register_buffer("u_gain", self._gain_vector(self.u_path_params()), persistent=False)
        self.register_buffer("b_gain", self._gain_vector(self.b_params()), persistent=False)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- parameters

    def reset_parameters(self) -> None:
        for w in [*self.u_convs, self.u_fc, self.u_aux, *self.b_convs, self.b_fc, self.b_out]:
            nn.init.kaiming_normal_(w, nonlinearity="relu")
        for module in (self.m_conv, self.m_fc, self.d_conv, self.d_fc):
            for layer in module.modules():
                if isinstance(layer, (nn.Linear, nn.LSTM)):
                    layer.reset_parameters()
            # Start the fast branches small: the meta learners' outputs are nearly the same for
            # every coordinate at first, and such coherent kernels would swamp the slow branch.
            last = module.net[-1] if isinstance(module, CoordinateMLP) else module.out
            with torch.no_grad():
                last.weight.mul_(_FAST_INIT_SCALE)
                last.bias.mul_(_FAST_INIT_SCALE)

    def u_path_params(self) -> tuple[Tensor, ...]:
        """Q on the path to r; these get task-level fast twins Q*.

        The auxiliary head's fast twin would never touch an output (the representation loss runs
        on slow weights only), so d does not produce one.
        """
        return (*self.u_convs, self.u_fc)

    def b_params(self) -> tuple[Tensor, ...]:
        """W, all seven layers of b; each support example gets fast twins W*_i (a row of M)."""
        return (*self.b_convs, self.b_fc, self.b_out)

    def param_groups(self) -> dict[str, list[Tensor]]:
        """Slow weights by the paper's names: Q (u), W (b), G (d), Z (m)."""
        return {
            "Q": list(self.u_path_params()),
            "W": list(self.b_params()),
            "G": [*self.d_conv.parameters(), *self.d_fc.parameters()],
            "Z": [*self.m_conv.parameters(), *self.m_fc.parameters()],
        }

    @property
    def n_fast_b(self) -> int:
        """P: floats per row of M."""
        return sum(p.numel() for p in self.b_params())

    @staticmethod
    def _gain_vector(params: Sequence[Tensor]) -> Tensor:
        gains = [torch.full((p.numel(),), 1.0 / math.sqrt(p[0].numel())) for p in params]
        return torch.cat(gains)

    def _n_conv_coords(self, params: Sequence[Tensor]) -> int:
        return sum(p.numel() for p in params if p.dim() == 4)

    @staticmethod
    def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        """(..., P) -> tensors of shapes (..., *p.shape) for p in like."""
        out, start = [], 0
        for p in like:
            out.append(flat[..., start : start + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            start += p.numel()
        return out

    # ---------------------------------------------------------------------------- networks

    def u(self, x: Tensor, Q_fast: Sequence[Tensor] | None) -> Tensor:
        """Representation r of images (n, 1, S, S) -> (n, rep_dim); Q_fast None = slow only."""
        h = conv_trunk(x, self.u_convs, None if Q_fast is None else Q_fast[:-1])
        r = h @ self.u_fc.T
        if Q_fast is not None:
            r = r + h @ Q_fast[-1].T
        return r

    def b(self, x: Tensor, W_fast: Sequence[Tensor] | None, n_way: int | None) -> Tensor:
        """Logits of images (n, 1, S, S) -> (n, max_way), classes >= n_way masked to -inf
        (n_way None: no mask).

        W_fast holds per-image fast weights, each of shape (n, *w.shape), or None for slow only.
        """
        if W_fast is None:
            h = conv_trunk(x, self.b_convs, None)
            h1 = F.relu(h @ self.b_fc.T)
            logits = h1 @ self.b_out.T
        else:
            logits = b_with_fast_weights(x, self.b_params(), W_fast)
        return logits if n_way is None else _mask_classes(logits, n_way)

    # ------------------------------------------------------------------------ meta information

    def _per_example_grads(self, x: Tensor, y: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """First-order meta information: per-example loss gradients w.r.t. the slow weights.

        Forward passes use slow weights only and the results are constants (no gradient flows back
        through them). One vmap, no Python loop over examples.
        Returns:
            grads of u's representation loss w.r.t. Q (path to r), of shape (n, P_u), and of b's
            task loss w.r.t. W, of shape (n, P_b).
        """
        q = tuple(p.detach() for p in self.u_path_params())
        aux = self.u_aux.detach()
        aux_relu = self.config.aux_relu
        w = tuple(p.detach() for p in self.b_params())

        def u_loss(q_params: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
            h = conv_trunk(xi[None], q_params[:-1], None)
            r = h @ q_params[-1].T
            if aux_relu:  # the authors' head: ReLU, then the auxiliary FC layer
                r = F.relu(r)
            logits = _mask_classes(r @ aux.T, n_way)
            return F.cross_entropy(logits, yi[None])

        def b_loss(w_params: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
            h = conv_trunk(xi[None], w_params[:-2], None)
            logits = _mask_classes(F.relu(h @ w_params[-2].T) @ w_params[-1].T, n_way)
            return F.cross_entropy(logits, yi[None])

        with torch.no_grad():
            gu = vmap(grad(u_loss), in_dims=(None, 0, 0))(q, x, y)
            gb = vmap(grad(b_loss), in_dims=(None, 0, 0))(w, x, y)
        flat_u = torch.cat([g.flatten(1) for g in gu], dim=1)
        flat_b = torch.cat([g.flatten(1) for g in gb], dim=1)
        return flat_u, flat_b

    def _task_fast_weights(self, grads_u: Tensor, chunks: Sequence[Tensor], y: Tensor) -> list[Tensor]:
        """Q* = d(G, [grad_1 .. grad_T]), grad_t the class-balanced mean representation-loss gradient
        of chunk t (see `chunk_means`)."""
        member = torch.zeros(len(chunks), grads_u.shape[0], device=grads_u.device, dtype=grads_u.dtype)
        for t, idx in enumerate(chunks):
            member[t, idx] = 1.0
        seq = preprocess_grad(chunk_means(member, y) @ grads_u, self.config.grad_p)  # (T, P_u, 2)
        n_conv = self._n_conv_coords(self.u_path_params())
        flat = torch.cat([self.d_conv(seq[:, :n_conv]), self.d_fc(seq[:, n_conv:])])
        return self._unflatten(flat * self.u_gain, self.u_path_params())

    def _example_fast_weights(self, grads_b: Tensor) -> Tensor:
        """M: row i is W*_i = m(Z, grad_i), of shape (n_support, P)."""
        n_conv = self._n_conv_coords(self.b_params())
        rows_per_block = max(1, _M_BLOCK_COORDS // grads_b.shape[1])
        blocks = []
        for g in grads_b.split(rows_per_block):  # blocks of examples, only to bound memory
            feats = preprocess_grad(g, self.config.grad_p)  # (n, P, 2)
            blocks.append(
                torch.cat([self.m_conv(feats[:, :n_conv]), self.m_fc(feats[:, n_conv:])], dim=1)
            )
        return torch.cat(blocks) * self.b_gain

    def _build_memory(
        self, x: Tensor, y: Tensor, n_way: int, chunks: Sequence[Tensor]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Algorithm 1 steps 1-2 on class ids y: returns (Q*, R, M), differentiable in G, Z, Q."""
        grads_u, grads_b = self._per_example_grads(x, y, n_way)
        Q_fast = self._task_fast_weights(grads_u, chunks, y)
        M = self._example_fast_weights(grads_b)
        R = self.u(x, Q_fast)
        return Q_fast, R, M

    def _read(
        self, x: Tensor, Q_fast: Sequence[Tensor], R: Tensor, M: Tensor, attention_bias: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 step 3: logits (n, max_way) and attention (n, n_support) for queries x."""
        r = self.u(x, Q_fast)
        attention = torch.softmax(_cosine(r, R) + attention_bias, dim=1)
        W_fast_flat = attention @ M.to(attention.dtype)  # (n, P): a per-query mix of the rows of M
        W_fast = self._unflatten(W_fast_flat, self.b_params())
        return self.b(x, W_fast, n_way), attention

    # ------------------------------------------------------------------------------ public API

    def register(self, images: Tensor, labels: Sequence[str]) -> TaskMemory:
        """Build a task's memories from its support set.

        Args:
            images: support images of shape (n_support, 1, S, S) (or (n_support, S, S)), float,
                ink = 1, background = 0, S = config.image_size.
            labels: one non-empty string per image; 2..max_way distinct, any number per class.
        Returns:
            the task's immutable memory, on the model's device. Deterministic: the chunking of the
            support set is seeded from its own content.
        """
        images = self._check_images(images, field="images", limit=self.config.max_examples)
        class_names, y = self._check_labels(labels, len(images))
        chunks = content_chunks(images, y, self.config.n_chunks)
        # no_grad, not inference_mode: torch.func.grad inside inference_mode silently yields
        # no meta information on some builds (seen with torch 2.11 on CUDA: chance accuracy).
        with torch.no_grad():
            Q_fast, R, M = self._build_memory(images, y, len(class_names), chunks)
        return TaskMemory(tuple(class_names), y, tuple(Q_fast), R, M)

    def classify(
        self, memory: TaskMemory, images: Tensor, *, return_attention: bool = False
    ) -> ClassifyOutput:
        """Class probabilities for a batch of queries, of shape (n_query, n_way).

        Args:
            memory: a task from `register` (on this model's device).
            images: query images of shape (n_query, 1, S, S) or (n_query, S, S).
            return_attention: also return the attention over the support examples.
        """
        return self.classify_many([(memory, images)], return_attention=return_attention)[0]

    def check_support(self, memory: TaskMemory, images: Tensor) -> SupportCheck:
        """Classify a task's own support images against it and find pairs of examples of
        different classes whose representations (rows of R) are nearly the same, at cosine
        `CONFUSABLE_COSINE` or more: a support set the model cannot answer from.

        Args:
            memory: the task `register` built from `images`.
            images: its support images, in the order they were registered.
        """
        out = self.classify(memory, images)
        confidence, predicted = out.probs.max(dim=1)
        y = memory.support_labels
        with torch.inference_mode():
            cosine = _cosine(memory.R, memory.R)
            pairs = (cosine >= CONFUSABLE_COSINE) & (y[:, None] != y[None, :])
            i, j = torch.triu(pairs, diagonal=1).nonzero(as_tuple=True)
        confusable = [(int(a), int(b), float(cosine[a, b])) for a, b in zip(i, j, strict=True)]
        return SupportCheck(predicted, confidence, confusable)

    def classify_many(
        self, requests: Sequence[tuple[TaskMemory, Tensor]], *, return_attention: bool = False
    ) -> list[ClassifyOutput]:
        """Queries of several tasks at once: one result per (memory, images) pair, in order.

        Everything per query runs over the queries of every task together: `u` with each query's
        task-level Q* and `b` with its own W* as batched matmuls (`conv_trunk_per_sample`); only the
        attention over a task's R, the read of its M and the final softmax are per task, over the
        queries of all its requests at once (one matmul each).
        """
        checked = [(mem, self._check_images(x, field="images", limit=None, pixels=False))
                   for mem, x in requests]
        tasks: dict[int, int] = {}  # id(memory) -> task number, so repeated memories share a row
        of_task: dict[int, list[int]] = {}  # task number -> its requests, in order
        for j, (memory, _) in enumerate(checked):
            of_task.setdefault(tasks.setdefault(id(memory), len(tasks)), []).append(j)
        bounds = [0]
        for _, x in checked:
            bounds.append(bounds[-1] + len(x))
        with torch.inference_mode():
            x_all = torch.cat([x for _, x in checked])
            if not _pixels_in_range(x_all):  # one check for the batch; the culprit named below
                for _, x in requests:
                    self._check_images(x, field="images", limit=None)
            task_of = torch.cat([torch.full((len(x),), tasks[id(m)], dtype=torch.long) for m, x in checked])
            memories = list({id(m): m for m, _ in checked}.values())
            # Several tasks: each layer's Q* of every task, stacked once for all query blocks.
            Q_stacked = None if len(memories) == 1 else [
                torch.stack([m.Q_fast[k] for m in memories]) for k in range(len(memories[0].Q_fast))
            ]
            r_all = torch.cat([
                self._represent(memories, Q_stacked, x, idx.to(x.device))
                for x, idx in zip(x_all.split(_QUERY_BLOCK), task_of.split(_QUERY_BLOCK), strict=True)
            ])
            rows = {t: _rows(js, bounds, x_all.device) for t, js in of_task.items()}  # in x_all
            attentions: dict[int, Tensor] = {}
            similarities: dict[int, Tensor] = {}
            # W* per query, a (n, numel) block per layer of b: each query's kernels of a layer in one
            # piece and the queries' pieces in a row, so `per_sample_conv3x3` reads a block as one
            # grouped kernel in place (columns of one (n, P) block would be a copy away from that).
            shapes = [p.shape for p in self.b_params()]
            bounds_b = list(itertools.accumulate((math.prod(shape) for shape in shapes), initial=0))
            W_layers = [r_all.new_empty((len(x_all), stop - start))
                        for start, stop in itertools.pairwise(bounds_b)]
            for t, js in of_task.items():
                memory = checked[js[0]][0]
                cosine = _cosine(r_all[rows[t]], memory.R)  # (n, n_support)
                similarities[t] = cosine.amax(dim=1)
                attention = torch.softmax(cosine + memory.attention_bias, dim=1)
                attentions[t] = attention
                M = memory.M.to(attention.dtype)
                for W, (start, stop) in zip(W_layers, itertools.pairwise(bounds_b), strict=True):
                    if isinstance(rows[t], slice):  # written in place: W* is tens of MB a batch
                        torch.mm(attention, M[:, start:stop], out=W[rows[t]])  # a mix of the rows of M
                    else:
                        W[rows[t]] = attention @ M[:, start:stop]
            logits = torch.cat([
                self.b(x_all[i : i + _QUERY_BLOCK],
                       [W[i : i + _QUERY_BLOCK].view(-1, *shape)
                        for W, shape in zip(W_layers, shapes, strict=True)],
                       self.config.max_way)
                for i in range(0, len(x_all), _QUERY_BLOCK)
            ])
        outputs: list[ClassifyOutput | None] = [None] * len(checked)
        for t, js in of_task.items():
            memory = checked[js[0]][0]
            sizes = [bounds[j + 1] - bounds[j] for j in js]
            # unused heads dropped
            probs = torch.softmax(logits[rows[t], : memory.n_way] / self.temperature[memory.n_way],
                                  dim=1).split(sizes)
            attention = attentions[t].split(sizes) if return_attention else (None,) * len(js)
            similarity = similarities[t].split(sizes)
            for j, p, a, s in zip(js, probs, attention, similarity, strict=True):
                outputs[j] = ClassifyOutput(p, a, s)
        return outputs  # type: ignore[return-value]

    def _represent(
        self, memories: Sequence[TaskMemory], Q_stacked: Sequence[Tensor] | None, x: Tensor, task_of: Tensor
    ) -> Tensor:
        """r for queries x of shape (n, 1, S, S), query i under memories[task_of[i]].Q_fast
        (`Q_stacked`: each layer's Q* of every task stacked, None when there is one task).

        One task: its Q* is shared by the batch (plain convolutions, slow and fast fused). Several:
        each query gets its task's Q* and the trunk runs as per-image batched matmuls.
        """
        first = int(task_of[0])
        if Q_stacked is None or bool((task_of == first).all()):
            return self.u(x, memories[first].Q_fast)
        per_query = [Q[task_of] for Q in Q_stacked]
        h = conv_trunk_per_sample(x, self.u_convs, per_query[:-1])
        return h @ self.u_fc.T + torch.einsum("noc,nc->no", per_query[-1], h)

    def episode_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
        generator: np.random.Generator,
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 step 4: summed query cross-entropy and the number of correct queries."""
        perm = torch.as_tensor(generator.permutation(len(support_x)), device=support_x.device)
        chunks = list(perm.tensor_split(min(self.config.n_chunks, len(support_x))))
        Q_fast, R, M = self._build_memory(support_x, support_y, n_way, chunks)
        counts = torch.bincount(support_y, minlength=n_way)
        bias = -torch.log(counts[support_y].to(R.dtype))  # as TaskMemory.attention_bias
        logits, _ = self._read(query_x, Q_fast, R, M, bias, n_way)
        loss = F.cross_entropy(logits, query_y, reduction="sum")
        correct = (logits.argmax(1) == query_y).sum()
        return loss, correct

    def batched_episode_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, n_way: int,
        generator: np.random.Generator, *, bf16: bool = False, read: BatchedRead | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 step 4 for B episodes of one shape in one pass, with no loop over them: each
        episode's summed query cross-entropy and its number of correct queries, both of shape (B,).
        Their mean is the loss of a step of B episodes (B = 1: `episode_loss`, to float rounding).

        The per-example gradients of every support example of every episode are one vmap (the n_way
        mask is shared); m and d run over every episode's coordinates at once (they are
        per-coordinate: episodes fold into their rows); u runs with each episode's Q* on its support
        and query images (`conv_trunk_per_task`); the attention is one batched matmul, and b runs
        per query with its own W*.

        Args:
            support_x: (B, n_support, 1, S, S); support_y: (B, n_support), class ids < n_way.
            query_x: (B, n_query, 1, S, S); query_y: (B, n_query).
            generator: draws each episode's chunking of its support set, episode after episode,
                as `episode_loss` would for each in turn.
            bf16: bfloat16 autocast for the conv trunks and b's query path; the meta information
                (the gradients, their preprocessing, m and d) and the attention stay float32.
            read: step 3 for the batch, `read_batched` (the default) or a compiled version of it.
        """
        n_tasks, n_support = support_y.shape
        # Each episode's chunks as episode_loss draws them: a permutation split into T runs.
        n_chunks = min(self.config.n_chunks, n_support)
        sizes = [len(c) for c in np.array_split(np.arange(n_support), n_chunks)]
        chunk_of = np.repeat(np.arange(n_chunks), sizes)  # chunk of each position of a permutation
        perms = np.stack([generator.permutation(n_support) for _ in range(n_tasks)])
        member = np.zeros((n_tasks, n_chunks, n_support), dtype=np.float32)
        member[np.arange(n_tasks)[:, None], chunk_of[None], perms] = 1.0
        avg_t = chunk_means(torch.as_tensor(member, device=support_x.device, dtype=support_x.dtype),
                            support_y)

        grads_u, grads_b = self._per_example_grads(support_x.flatten(0, 1), support_y.flatten(), n_way)
        Q_fast = self._task_fast_weights_batched(grads_u.view(n_tasks, n_support, -1), avg_t)
        M = self._example_fast_weights(grads_b).view(n_tasks, n_support, -1)
        counts = F.one_hot(support_y, n_way).sum(1)  # (B, n_way)
        bias = -torch.log(counts.gather(1, support_y).to(M.dtype))  # as TaskMemory.attention_bias
        logits = (read or read_batched)(support_x, query_x, Q_fast, M, bias, self.u_path_params(),
                                        self.b_params(), n_way, bf16)
        losses = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none")
        correct = (logits.argmax(-1) == query_y).sum(1)
        return losses.view(n_tasks, -1).sum(1), correct

    def _task_fast_weights_batched(self, grads_u: Tensor, avg: Tensor) -> list[Tensor]:
        """Each episode's Q*: grads_u (B, n, P_u) and avg (B, T, n), which averages an episode's
        gradients over its chunks -> one tensor per layer of u's path, of shape (B, *shape)."""
        n_tasks = grads_u.shape[0]
        seq = preprocess_grad(torch.bmm(avg, grads_u), self.config.grad_p).transpose(0, 1)  # (T, B, P_u, 2)
        n_conv = self._n_conv_coords(self.u_path_params())
        steps = seq.shape[0]
        conv = self.d_conv(seq[:, :, :n_conv].reshape(steps, -1, 2)).view(n_tasks, -1)
        fc = self.d_fc(seq[:, :, n_conv:].reshape(steps, -1, 2)).view(n_tasks, -1)
        return self._unflatten(torch.cat([conv, fc], dim=1) * self.u_gain, self.u_path_params())

    # -------------------------------------------------------------------------------- guards

    def _check_images(self, images: Tensor, *, field: str, limit: int | None, pixels: bool = True) -> Tensor:
        """`images` as (n, 1, S, S) on the model's device, or InvalidTaskError naming what is wrong
        (`pixels=False`: the caller checks the pixel values itself, see `_bad_pixels`)."""
        s = self.config.image_size
        if not isinstance(images, Tensor):
            raise InvalidTaskError(f"{field} must be a tensor, got {type(images).__name__}", field=field)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, s, s):
            raise InvalidTaskError(
                f"{field} must have shape (n, 1, {s}, {s}), got {tuple(images.shape)}", field=field
            )
        if len(images) == 0:
            raise InvalidTaskError(f"{field} is empty: give at least one image", field=field)
        if limit is not None and len(images) > limit:
            raise InvalidTaskError(
                f"{field} holds {len(images)} examples, more than max_examples={limit}", field=field
            )
        if not images.is_floating_point():
            raise InvalidTaskError(f"{field} must be floating point, got {images.dtype}", field=field)
        bad = _bad_pixels(images) if pixels else None
        if bad is not None and bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise InvalidTaskError(
                f"{field}[{i}] has pixels that are NaN, infinite or outside [0, 1]",
                field=field, index=i,
            )
        device = self.u_fc.device
        return images.to(device=device, dtype=self.u_fc.dtype)

    def _check_labels(self, labels: Sequence[str], n_images: int) -> tuple[list[str], Tensor]:
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise InvalidTaskError("labels must be a sequence of strings", field="labels")
        if len(labels) != n_images:
            raise InvalidTaskError(
                f"got {len(labels)} labels for {n_images} images: give one label per image",
                field="labels",
            )
        index: dict[str, int] = {}
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label:
                raise InvalidTaskError(
                    f"labels[{i}] must be a non-empty string", field="labels", index=i
                )
            index.setdefault(label, len(index))
        if len(index) < 2:
            raise InvalidTaskError(
                f"a task needs at least 2 distinct labels, got {len(index)}", field="labels"
            )
        if len(index) > self.max_way:
            raise InvalidTaskError(
                f"a task may have at most max_way={self.max_way} distinct labels, "
                f"got {len(index)}",
                field="labels",
            )
        y = torch.tensor([index[label] for label in labels], device=self.u_fc.device)
        return list(index), y


def content_chunks(images: Tensor, y: Tensor, n_chunks: int) -> list[Tensor]:
    """Split the support set into T chunks in an order seeded from its own content.

    Sorted-by-class uploads would otherwise give chunks of one class each; seeding from the bytes
    makes a task rebuilt from its stored support set get the same chunks, hence the same Q*.
    """
    digest = hashlib.sha256(images.detach().cpu().numpy().tobytes())
    digest.update(y.cpu().numpy().astype(np.int64).tobytes())
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
    perm = torch.as_tensor(rng.permutation(len(images)), device=images.device)
    return list(perm.tensor_split(min(n_chunks, len(images))))


def chunk_means(member: Tensor, y: Tensor) -> Tensor:
    """Weights that average each chunk's gradients with every class's examples weighing as much in
    all as one example would (1 / its class's size each), so a class of three does not steer Q*
    three times as hard as a class of one; plain means where the classes are even.

    Args:
        member: (..., T, n) 1 where example i is in chunk t, else 0.
        y: (..., n) class ids.
    Returns:
        (..., T, n) weights, each chunk's summing to 1.
    """
    same = (y[..., :, None] == y[..., None, :]).to(member.dtype)  # (..., n, n)
    weights = member / same.sum(-1)[..., None, :]
    return weights / weights.sum(-1, keepdim=True)


def b_with_fast_weights(x: Tensor, W: Sequence[Tensor], W_fast: Sequence[Tensor]) -> Tensor:
    """b's logits (n, max_way), unmasked, for images x (n, 1, S, S) with slow weights W (b's seven
    layers) and per-image fast weights W_fast, each of shape (n, *w.shape)."""
    fast_convs, fast_fc, fast_out = W_fast[:-2], W_fast[-2], W_fast[-1]
    h = conv_trunk_per_sample(x, W[:-2], fast_convs)
    h1 = F.relu(h @ W[-2].T) + F.relu(torch.einsum("noc,nc->no", fast_fc, h))
    return h1 @ W[-1].T + torch.einsum("nko,no->nk", fast_out, h1)


def read_batched(
    support_x: Tensor, query_x: Tensor, Q_fast: Sequence[Tensor], M: Tensor, attention_bias: Tensor,
    Q: Sequence[Tensor], W: Sequence[Tensor], n_way: int, bf16: bool,
) -> Tensor:
    """Algorithm 1 step 3 for B episodes (`MetaNet.batched_episode_loss`): logits (B, n_query,
    max_way) of their queries. A function of tensors alone, so torch.compile takes it whole
    (`TrainConfig.compile`).

    Args:
        support_x: (B, n_support, 1, S, S); query_x: (B, n_query, 1, S, S).
        Q_fast: each episode's Q*, one tensor per layer of u's path, of shape (B, *shape).
        M: (B, n_support, P); attention_bias: (B, n_support).
        Q, W: the slow weights of u's path and of b.
        bf16: bfloat16 autocast of u's trunk and b; the attention and W* stay in M's dtype.
    """
    n_tasks, n_support = support_x.shape[:2]
    with torch.autocast(support_x.device.type, dtype=torch.bfloat16, enabled=bf16):
        h = conv_trunk_per_task(torch.cat([support_x, query_x], dim=1), Q[:-1], Q_fast[:-1])
        r_all = h @ Q[-1].T + torch.einsum("bnc,boc->bno", h, Q_fast[-1])  # (B, n_s + n_q, rep)
    r_all = F.normalize(r_all.to(M.dtype), dim=-1, eps=1e-8)
    R, r = r_all[:, :n_support], r_all[:, n_support:]
    scores = torch.bmm(r, R.transpose(1, 2)) + attention_bias[:, None]  # (B, n_query, n_support)
    W_fast_flat = torch.bmm(torch.softmax(scores, dim=-1), M)  # (B, n_query, P): W* per query
    W_fast = MetaNet._unflatten(W_fast_flat.flatten(0, 1), W)
    with torch.autocast(support_x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = _mask_classes(b_with_fast_weights(query_x.flatten(0, 1), W, W_fast), n_way)
    return logits.to(M.dtype).view(n_tasks, query_x.shape[1], -1)


# (support_x, query_x, Q_fast, M, attention_bias, Q, W, n_way, bf16) -> logits: `read_batched`'s type
BatchedRead = Callable[[Tensor, Tensor, Sequence[Tensor], Tensor, Tensor, Sequence[Tensor], Sequence[Tensor],
                        int, bool], Tensor]


def _mask_classes(logits: Tensor, n_way: int) -> Tensor:
    """Logits for class ids >= n_way become -inf: the heads are sized for max_way."""
    if n_way >= logits.shape[-1]:
        return logits
    keep = torch.arange(logits.shape[-1], device=logits.device) < n_way
    return logits.masked_fill(~keep, float("-inf"))


def _pixels_in_range(images: Tensor) -> bool:
    """Is every pixel of the batch in [0, 1]? One reduction: a NaN makes the min and max NaN, and
    an infinity is out of range, so both fail the test as `_bad_pixels` would."""
    if images.numel() == 0:
        return True
    low, high = torch.aminmax(images)
    return bool(low >= 0) and bool(high <= 1)


def _bad_pixels(images: Tensor) -> Tensor:
    """Per image: has it a pixel that is NaN, infinite or outside [0, 1]?"""
    flat = images.flatten(1)
    return ~(torch.isfinite(flat).all(1) & (flat >= 0).all(1) & (flat <= 1).all(1))


def _rows(requests: Sequence[int], bounds: Sequence[int], device: torch.device) -> slice | Tensor:
    """The rows of the given requests (consecutive numbers: a slice) in the concatenated batch,
    where request j holds rows bounds[j]:bounds[j + 1]."""
    if requests[-1] - requests[0] == len(requests) - 1:
        return slice(bounds[requests[0]], bounds[requests[-1] + 1])
    return torch.cat([torch.arange(bounds[j], bounds[j + 1], device=device) for j in requests])


def _cosine(r: Tensor, R: Tensor) -> Tensor:
    """(n, d) x (N, d) -> (n, N) cosine similarities, clamped to [-1, 1] (float32 rounding puts a
    vector's cosine to itself a few ulps past 1)."""
    return (F.normalize(r, dim=-1, eps=1e-8) @ F.normalize(R, dim=-1, eps=1e-8).T).clamp(-1.0, 1.0)
