"""One MetaNet task, end to end (paper, Algorithm 1).

Per task (`task_forward`):

1. task-level meta information: chunk gradients of u's representation loss w.r.t. Q;
2. Q* = d(G, gradients)                                      (task-level fast weights);
3. example-level meta information: per-example gradients of b's loss w.r.t. W;
4. W*_i = m(Z, gradient_i)                                    (example-level fast weights);
5. memory write: values M = [W*_i], keys r'_i = u(Q, Q*, x'_i);
6. query keys r_j = u(Q, Q*, x_j);
7. attention read a_j = softmax(cos(R, r_j)), W*_j = a_j M;
8. logits_j = b(W, W*_j, x_j); loss = sum_j CE(logits_j, y_j).

b and u are Flax modules (`networks.Networks`; `None`: the built-in ones of
`config.architecture`). Every function here takes them as `networks=` and reads what it needs
(the augmented layers, BatchNorm) with `networks.learners`. `metanet_jax.batching` maps these
per-task functions over a task batch.

BatchNorm statistics (Mini-ImageNet network; `MetaNetConfig.bn_statistics`). "authors", as
the authors' MetaNetPartial.py: steps 1 and 3 (and MetaNet+'s chunks of b) normalise with the
statistics of the whole support set, each chunk's or example's loss taken on its own rows of
that one pass; step 5 normalises the support set by itself and step 6 the queries by
themselves. "per_pass" (before the field existed): every pass normalises over its own
examples, one example in step 3 (instance normalisation), one chunk in step 1, the support
set and the queries together in steps 5-6. In both, step 8 normalises over the query set, as
the authors' code does while training (its `predict` switched Chainer's BatchNorm to running
averages, which this implementation does not keep: tests normalise like training).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metanet_jax.config import MetaNetConfig
from metanet_jax.model import generators, layers, memory
from metanet_jax.model import networks as nets
from metanet_jax.model.networks import Learner, Networks
from metanet_jax.types import Array, Episode, FastWeights, Params, PRNGKey

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


# ----------------------------------------------------------------------------- init
def init(key: PRNGKey, config: MetaNetConfig, *, networks: Networks | None = None) -> Params:
    """Slow weights theta = {W, Q, Z, G} as a Flax-style params dict.

    Depends only on the networks and the architecture fields of `config` (output units, image
    shape, variant, generator sizes): never on shots or query counts. Same key, same numbers.

    Args:
      key: a typed PRNG key (`jax.random.key`).
      config: the model configuration.
      networks: b and u as Flax modules, or `None` for the built-in ones.

    Returns:
      `{"base": W, "representation": Q, "example_generator": Z, "task_generator": G}`; Q holds
      u's module params and the representation head `"head"` `[D, output_units]`.
    """
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        raise ValueError("init expects a typed PRNG key from jax.random.key(seed)")
    b, u = nets.learners(config, networks)
    kb, kq, kz, kg = (jax.random.fold_in(key, i) for i in range(4))
    base = b.init(kb)
    rep = u.init(kq)
    rep[nets.HEAD_LAYER] = nets.init_head(
        kq, u.out_shape[-1], config.output_units, config.network_init
    )
    hid, gen_init = config.generator_hidden, config.generator_init
    example_gen = {
        kind: generators.init_mlp_generator(jax.random.fold_in(kz, i), hid, gen_init)
        for i, kind in enumerate(b.kinds)
    }
    task_gen = {}
    if config.has_task_fast_weights:
        task_gen["representation"] = {
            kind: generators.init_lstm_generator(
                jax.random.fold_in(kg, i), config.lstm_hidden, gen_init
            )
            for i, kind in enumerate(u.kinds)
        }
    if config.variant == "metanet+":
        task_gen["base"] = {
            kind: generators.init_lstm_generator(
                jax.random.fold_in(kg, 10 + i), config.lstm_hidden, gen_init
            )
            for i, kind in enumerate(b.kinds)
        }
    return {
        "base": base,
        "representation": rep,
        "example_generator": example_gen,
        "task_generator": task_gen,
    }


# ----------------------------------------------------------------------------- episode logits
def episode_logits(logits: Array, config: MetaNetConfig, support_y: Array) -> Array:
    """The logits an episode's losses and predictions use.

    `label_units="first"`: the first `ways` of the output units (METANET.md, output size).
    `"any"`: all output units, those that no support label names masked to -1e9, so the
    softmax runs over the episode's own classes wherever their units are.

    Args:
      logits: `[n, output_units]`.
      config: the configuration.
      support_y: `[N]` the task's support labels.

    Returns:
      `[n, ways]` ("first") or `[n, output_units]` ("any").
    """
    if config.label_units == "first":
        return logits[:, : config.ways]
    present = jnp.zeros((logits.shape[-1],), bool).at[support_y].set(True)
    return jnp.where(present, logits, jnp.asarray(-1e9, logits.dtype))


# ----------------------------------------------------------------------------- meta information
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy, `[n, C], [n] -> [n]` (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def chunk_layout(n: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """min(T, n) chunks of sizes as equal as possible, in support order (METANET.md step 1).

    Returns:
      `(index [C, S], mask [C, S])`: example indices per chunk, padded (mask 0) to the
      largest chunk size S.
    """
    count = min(chunks, n)
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    width = max(sizes)
    index = np.zeros((count, width), np.int32)
    mask = np.zeros((count, width), np.float32)
    start = 0
    for c, size in enumerate(sizes):
        index[c, :size] = np.arange(start, start + size)
        mask[c, :size] = 1.0
        start += size
    return index, mask


def pair_layout(n: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """All support pairs (i < j) in order, cut into min(T, pairs) chunks.

    Returns:
      `(pairs [C, S, 2], mask [C, S])`.
    """
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)], np.int32)
    index, mask = chunk_layout(len(pairs), chunks)
    return pairs[index], mask


def _map_chunks(fn, shared, args, mask: np.ndarray, learner: Learner):
    """`fn(shared, *chunk_args, weights)` for every chunk, outputs stacked on a new axis 0.

    One `vmap` over the padded chunks (`args` `[C, S, ...]`, padding at the end, `mask`
    `[C, S]` marks the real examples). A network with BatchNorm would take the padding into
    its statistics, which must span the chunk's own examples only: then, when the chunks
    differ in size, each chunk runs alone, without its padding.
    """
    if mask.all() or not learner.has_batchnorm:
        in_axes = (None,) + (0,) * (len(args) + 1)
        return jax.vmap(fn, in_axes)(shared, *args, jnp.asarray(mask))
    outs = []
    for c, row in enumerate(mask):
        size = int(row.sum())
        outs.append(fn(shared, *(a[c, :size] for a in args), jnp.ones((size,), jnp.float32)))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _weighted_cross_entropy(logits: Array, labels: Array, w: Array) -> Array:
    """A chunk's loss: the mean cross-entropy over its real examples (`w`: 1, padding 0)."""
    return jnp.sum(cross_entropy(logits, labels) * w) / jnp.sum(w)


def _contrastive(config, ea, eb, same, w):
    ea, eb = (e.astype(jnp.promote_types(e.dtype, jnp.float32)) for e in (ea, eb))
    d2 = jnp.sum(jnp.square(ea - eb), axis=-1)
    far = jax.nn.relu(config.contrastive_margin - jnp.sqrt(d2 + 1e-12))
    loss = same * d2 + (1.0 - same) * jnp.square(far)
    return jnp.sum(loss * w) / jnp.sum(w)


def _cross_entropy_groups(config: MetaNetConfig, labels: Array, head=None):
    """`group_loss(embed, index, w)`: the weighted cross-entropy of the support rows `index`
    (b's logits, or u's keys through `head`, the representation head)."""

    def group_loss(embed, index, w):
        out = embed(index)
        logits = episode_logits(out if head is None else head(out), config, labels)
        return _weighted_cross_entropy(logits, labels[index], w)

    return group_loss


def _contrastive_groups(config: MetaNetConfig, labels: Array):
    """`group_loss(embed, pairs, w)`: the contrastive loss of the support pairs `pairs [S, 2]`
    (u's keys of the first and of the second members, each from a pass of its own)."""

    def group_loss(embed, pairs, w):
        first, second = pairs[:, 0], pairs[:, 1]
        same = (labels[first] == labels[second]).astype(jnp.float32)
        return _contrastive(config, embed(first), embed(second), same, w)

    return group_loss


def _support_pairs(n: int, chunks: int, key: PRNGKey | None) -> tuple[Array, np.ndarray]:
    """The contrastive loss's pairs: all (i < j) cut into min(T, pairs) chunks (`pair_layout`),
    or, given a `key`, T sampled pairs (i != j), one per chunk. `(pairs [C, S, 2], mask)`."""
    if key is None:
        pairs, mask = pair_layout(n, chunks)
        return jnp.asarray(pairs), mask
    ki, kj = jax.random.split(key)
    i = jax.random.randint(ki, (chunks,), 0, n)
    j = jax.random.randint(kj, (chunks,), 0, n - 1)
    j = j + (j >= i)
    return jnp.stack([i, j], -1)[:, None, :], np.ones((chunks, 1), np.float32)


def support_statistics(config: MetaNetConfig, learner: Learner) -> bool:
    """Whether the support-set passes through `learner` normalise with the whole support
    set's statistics: `bn_statistics == "authors"` and the network has BatchNorm (without
    BatchNorm both settings run the same per-pass program)."""
    return config.bn_statistics == "authors" and learner.has_batchnorm


def _support_statistics_grads(learner: Learner, params, x, group_loss, *group_args):
    """Per-group loss and gradient w.r.t. the augmented kernels, with whole-set statistics.

    Each group's loss (one support example, or one chunk) sees the network's output rows as
    computed in one pass over all of `x` (BatchNorm statistics of the whole set, themselves
    functions of the weights and differentiated through, as Chainer's backward does). The pass
    depends on no mapped argument, so under the `vmap` over groups it runs once, unbatched;
    its layers before the first augmented one do not depend on the differentiated kernels
    either, so no group's backward pass enters them.

    Args:
      learner: the network.
      params: its slow weights.
      x: `[N, *input]` the support inputs.
      group_loss: `(embed, *args) -> scalar`; `embed(index) -> [S, F]` gives the
        network's output on those rows.
      *group_args: arrays with a leading group axis `[C, ...]`, mapped over.

    Returns:
      `(losses [C], grads)`, the grads `[C, *k]` per augmented kernel.
    """

    def loss(sub, *args):
        out = learner.apply(learner.merge(params, sub), x)
        return group_loss(lambda index: out[index], *args)

    in_axes = (None,) + (0,) * len(group_args)
    return jax.vmap(jax.value_and_grad(loss), in_axes)(learner.subtree(params), *group_args)


def _group_meta_info(config, learner: Learner, params, x, group_loss, groups, mask):
    """Meta information: per-group losses and gradients w.r.t. `learner`'s augmented kernels.

    A group is a few support rows (a chunk, a chunk of pairs, one example). Its loss sees the
    network's output on its rows from one pass over the whole support set
    (`support_statistics`: BatchNorm statistics of the set) or from a pass over those rows
    alone (each chunk, example or side of the pairs normalised by itself).

    Args:
      config: the configuration.
      learner: the network (b or u).
      params: its slow weights (W or Q).
      x: `[N, *input]` the support inputs.
      group_loss: `(embed, group, w) -> scalar`; `embed(index [S]) -> [S, F]`.
      groups: `[C, S, ...]` row indices per group, padded to the largest group.
      mask: `[C, S]` 1 for a real row, 0 for padding.

    Returns:
      `(losses [C], grads)`, the grads `[C, *k]` per augmented kernel.
    """
    if support_statistics(config, learner):
        return _support_statistics_grads(learner, params, x, group_loss, groups, jnp.asarray(mask))

    def loss(sub, group, w):
        merged = learner.merge(params, sub)
        return group_loss(lambda index: learner.apply(merged, x[index]), group, w)

    return _map_chunks(jax.value_and_grad(loss), learner.subtree(params), (groups,), mask, learner)


def representation_meta_info(
    rep_params: Params,
    support: Episode,
    config: MetaNetConfig,
    key: PRNGKey | None = None,
    *,
    networks: Networks | None = None,
) -> tuple[FastWeights, Array]:
    """Task-level meta information: gradients of u's representation loss (Alg. 1, l. 2-4).

    Cross-entropy through u's head over min(T, N) support chunks (authors' code), or the
    contrastive loss over support pairs (paper, shots > 1): all pairs cut into min(T, pairs)
    chunks, or T sampled pairs when a `key` is given. BatchNorm statistics: of the whole
    support set (`bn_statistics="authors"`) or of each chunk's examples (`"per_pass"`; the
    contrastive path normalises a chunk's first and second pair members separately).

    Args:
      rep_params: Q.
      support: one task, `x [N, *image_shape]`, `y [N]`.
      config: the configuration.
      key: optional typed key; samples T pairs for the contrastive loss.
      networks: b and u, or `None` for the built-in ones.

    Returns:
      `(grads, losses)`: per-chunk gradients `[C, *k]` w.r.t. u's augmented kernels (a tree
      that mirrors them), and the `[C]` chunk losses.
    """
    _, u = nets.learners(config, networks)
    n = support.x.shape[0]
    if config.uses_contrastive:
        groups, mask = _support_pairs(n, config.rep_chunks, key)
        group_loss = _contrastive_groups(config, support.y)
    else:
        groups, mask = chunk_layout(n, config.rep_chunks)
        head = functools.partial(nets.representation_head, rep_params)
        group_loss = _cross_entropy_groups(config, support.y, head)
    losses, grads = _group_meta_info(config, u, rep_params, support.x, group_loss, groups, mask)
    return grads, losses


def base_meta_info(
    base_params: Params,
    inputs: Array,
    labels: Array,
    config: MetaNetConfig,
    *,
    networks: Networks | None = None,
) -> FastWeights:
    """Example-level meta information: per-example gradients of b's loss (Alg. 1, l. 7-8).

    One gradient per example, not one batch gradient: each support example is a group of
    its own (`_group_meta_info`, a `vmap` of `grad` over the support set). BatchNorm
    statistics: of the whole support set (`bn_statistics="authors"`, example i's loss on its
    row of one pass over the set) or of example i alone (`"per_pass"`: instance
    normalisation).

    Args:
      base_params: W.
      inputs: `[N, *input]` support inputs of b (x', or r' when `base_input == "r"`).
      labels: `[N]`.
      config: the configuration.
      networks: b and u, or `None` for the built-in ones.

    Returns:
      Gradients `[N, *k]` w.r.t. b's augmented kernels (a tree that mirrors them).
    """
    b, _ = nets.learners(config, networks)
    n = inputs.shape[0]
    examples, mask = np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.float32)
    group_loss = _cross_entropy_groups(config, labels)
    return _group_meta_info(config, b, base_params, inputs, group_loss, examples, mask)[1]


# ----------------------------------------------------------------------------- query path
def query_path(config: MetaNetConfig) -> str:
    """The memory mode of b's query pass: "stacked" or "patches" (`config.query_path`,
    "auto" by backend)."""
    path = config.resolved_query_path()
    if path not in layers.MEMORY_MODES:
        raise ValueError(
            f"query_path {path!r} is not a query path of the library; use "
            "'stacked' or 'patches' (or 'auto')"
        )
    return path


def base_learner_queries(
    base_params: Params,
    values: FastWeights,
    attention: Array,
    inputs: Array,
    config: MetaNetConfig,
    task_fast: FastWeights | None = None,
    *,
    networks: Networks | None = None,
) -> Array:
    """b(W, W*_j, x_j) for every query j, with W*_j = sum_i a_ji M_i (Alg. 1, l. 13-15).

    b's augmented layers read the memory per query (`layers`): "stacked", each augmented
    layer runs one conv with the N memory kernels stacked along the output channels and mixes
    the N outputs with a_j (linearity); "patches", each augmented conv builds W*_j and runs it
    as a batched matmul over the query's patches (dense layers stack). "auto" resolves by
    backend (`MetaNetConfig.resolved_query_path`). The literal per-query oracle (W*_j built,
    b mapped over queries) lives in the tests.

    Args:
      base_params: W.
      values: memory values `[N, *k]` per augmented kernel of b.
      attention: `[L, N]`.
      inputs: `[L, *input]` query inputs of b.
      config: the configuration.
      task_fast: MetaNet+ task-level fast weights of b, or `None`.
      networks: b and u, or `None` for the built-in ones.

    Returns:
      `[L, output_units]` logits.
    """
    b, _ = nets.learners(config, networks)
    with layers.options(memory_mode=query_path(config)):
        return b.apply(base_params, inputs, task_fast=task_fast, memory=values, mix=attention)


# ----------------------------------------------------------------------------- one task
def _dtypes(config: MetaNetConfig) -> tuple[Any, Any]:
    """`(compute, result)` dtypes: the networks run in `compute_dtype`; what leaves them (keys,
    fast weights, logits) is at least float32 (bfloat16 compute, float32 results)."""
    dtype = _DTYPES[config.compute_dtype]
    return dtype, jnp.promote_types(dtype, jnp.float32)


def _generate(generator, gen_params: Params, meta_info: FastWeights, config: MetaNetConfig):
    """A generator (m or d) on meta information, in the result dtype; without
    `second_order` the meta information is a constant of the outer gradient."""
    if not config.second_order:
        meta_info = lax.stop_gradient(meta_info)
    kernel = config.resolved_generator_kernel()
    return generator(gen_params, meta_info, config.grad_p, _dtypes(config)[1], kernel=kernel)


def _task_level(params: Params, support: Episode, config: MetaNetConfig, key, networks):
    """Q* = d(G, {grad_Q L_t}) (Alg. 1, l. 2-5; `None` for MetaNet-) and the `[C]` chunk losses
    of the representation loss."""
    rep_grads, rep_losses = representation_meta_info(
        params["representation"], support, config, key, networks=networks
    )
    if not config.has_task_fast_weights:
        return None, rep_losses
    g = params["task_generator"]["representation"]
    return _generate(generators.task_fast_weights, g, rep_grads, config), rep_losses


def _keys(rep: Params, q_star, xs: Array, xq: Array, config: MetaNetConfig, u: Learner):
    """Keys r'_i = u(Q, Q*, x'_i) of the support set (the memory's) and r_j of the queries
    (Alg. 1, l. 10 and 12): one pass through u, or (the authors' BatchNorm statistics) one
    pass for each set, each normalised by itself."""
    out_dtype = _dtypes(config)[1]
    if support_statistics(config, u):
        r_support = u.apply(rep, xs, fast=q_star).astype(out_dtype)
        return r_support, u.apply(rep, xq, fast=q_star).astype(out_dtype)
    r_all = u.apply(rep, jnp.concatenate([xs, xq]), fast=q_star).astype(out_dtype)
    return r_all[: xs.shape[0]], r_all[xs.shape[0] :]


def _example_level(params: Params, inputs: Array, labels: Array, config: MetaNetConfig, networks):
    """The memory values W*_i = m(Z, grad_W L_i) (Alg. 1, l. 7-9) `[N, *k]`, and MetaNet+'s
    task-level fast weights of b (`None` otherwise).

    MetaNet+ (our reading): d(G, chunk gradients of b's task loss w.r.t. W), the chunks and
    their BatchNorm statistics as in `representation_meta_info`.
    """
    base = params["base"]
    base_grads = base_meta_info(base, inputs, labels, config, networks=networks)
    z = params["example_generator"]
    values = _generate(generators.example_fast_weights, z, base_grads, config)
    if config.variant != "metanet+":
        return values, None
    b, _ = nets.learners(config, networks)
    index, mask = chunk_layout(inputs.shape[0], config.rep_chunks)
    group_loss = _cross_entropy_groups(config, labels)
    chunk_grads = _group_meta_info(config, b, base, inputs, group_loss, index, mask)[1]
    g = params["task_generator"]["base"]
    return values, _generate(generators.task_fast_weights, g, chunk_grads, config)


def _tree_norm(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _diagnostics(attention: Array, rep_losses: Array, values, q_star) -> dict[str, Any]:
    """A task's aux: the attention `[L, N]` and scalars to watch while training."""
    entropy = -jnp.sum(attention * jnp.log(attention + 1e-12), axis=-1).mean()
    return {
        "attention": attention,
        "rep_loss": jnp.sum(rep_losses),
        "attention_entropy": entropy,
        "example_fast_weight_norm": _tree_norm(values) / np.sqrt(attention.shape[-1]),
        "task_fast_weight_norm": _tree_norm(q_star),
    }


def task_forward(
    params: Params,
    support: Episode,
    query_x: Array,
    config: MetaNetConfig,
    key: PRNGKey | None = None,
    *,
    networks=None,
) -> tuple[Array, dict[str, Any]]:
    """Logits of one task's queries (Alg. 1 without the loss).

    BatchNorm layers (if any) normalise over the examples `config.bn_statistics` names (module
    docstring); b's queries always over the query set `query_x`.

    Args:
      params: theta.
      support: one task: `x [N, *image_shape]`, `y [N]`.
      query_x: `[L, *image_shape]`.
      config: the configuration.
      key: optional typed key (sampled contrastive pairs).
      networks: b and u as Flax modules (`networks.Networks`), or `None` for the built-in ones.

    Returns:
      `(logits [L, ways], aux)` with `attention [L, N]`, `rep_loss`, norms and entropy
      (`[L, output_units]` logits with `label_units="any"`, see `episode_logits`).
    """
    _, u = nets.learners(config, networks)
    query_path(config)  # a path the library lacks fails here, before any work
    dtype, out_dtype = _dtypes(config)
    support = Episode(support.x.astype(dtype), support.y)
    xq = query_x.astype(dtype)

    # 1-2. task level: Q* = d(G, chunk gradients of the representation loss).
    q_star, rep_losses = _task_level(params, support, config, key, networks)
    # 5-6. keys for the support set (memory) and the queries.
    r_support, r_query = _keys(params["representation"], q_star, support.x, xq, config, u)
    if config.base_input == "x":
        b_support, b_query = support.x, xq
    else:
        b_support, b_query = r_support.astype(dtype), r_query.astype(dtype)
    # 3-4. example level: W*_i = m(Z, per-example gradients of b's loss).
    values, task_fast = _example_level(params, b_support, support.y, config, networks)
    # 5, 7. memory write and attention read.
    values, mem_keys = memory.write(values, r_support)
    attention = memory.cosine_attention(r_query, mem_keys, config.attention_scale)
    # 8. augmented forward of b on the queries.
    logits = base_learner_queries(
        params["base"], values, attention, b_query, config, task_fast, networks=networks
    )
    logits = episode_logits(logits, config, support.y).astype(out_dtype)
    return logits, _diagnostics(attention, rep_losses, values, q_star)


def task_loss(
    params: Params,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    key: PRNGKey | None = None,
    *,
    networks=None,
) -> tuple[Array, dict[str, Any]]:
    """One task's loss: the sum over queries of cross-entropy (authors' code sums).

    Arguments as `task_forward`, with `query` `x [L, *image_shape]`, `y [L]`.

    Returns:
      `(loss, aux)`; aux holds `logits [L, ways]`, `accuracy`, `attention [L, N]`, ...
    """
    logits, aux = task_forward(params, support, query.x, config, key, networks=networks)
    ce = cross_entropy(logits, query.y)
    loss = jnp.sum(ce)
    if config.rep_loss_in_objective:
        loss = loss + aux["rep_loss"]
    aux = dict(aux, logits=logits, accuracy=jnp.mean(jnp.argmax(logits, -1) == query.y))
    aux["query_loss"] = jnp.sum(ce)
    return loss, aux
