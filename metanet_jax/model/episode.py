"""One MetaNet episode, end to end (paper, Algorithm 1), per task and over a task batch.

Per task (`task_forward`):

1. task-level meta information: chunk gradients of u's representation loss w.r.t. Q;
2. Q* = d(G, gradients)                                      (task-level fast weights);
3. example-level meta information: per-example gradients of b's loss w.r.t. W;
4. W*_i = m(Z, gradient_i)                                    (example-level fast weights);
5. memory write: values M = [W*_i], keys r'_i = u(Q, Q*, x'_i);
6. query keys r_j = u(Q, Q*, x_j);
7. attention read a_j = softmax(cos(R, r_j)), W*_j = a_j M;
8. logits_j = b(W, W*_j, x_j); loss = sum_j CE(logits_j, y_j).

`episode_loss` maps that over the task batch (`vmap`, or a sequential `lax.map`).

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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metanet_jax.config import MetaNetConfig
from metanet_jax.model import generators, memory
from metanet_jax.model import networks as net
from metanet_jax.types import Array, Episode, FastWeights, Params, PRNGKey

GROUPS = ("base", "representation", "example_generator", "task_generator")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


# ----------------------------------------------------------------------------- init
def _builtin_only(networks) -> None:
    # Transitional (issue 9, in progress): user networks arrive with the Flax layers.
    if networks is not None:
        raise ValueError("networks= is not supported yet; pass None for the built-in ones")


def _kinds(specs, names) -> tuple[str, ...]:
    kinds = {s.kind for s in specs if s.name in names}
    return tuple(k for k in ("conv", "dense") if k in kinds)


def init(key: PRNGKey, config: MetaNetConfig, *, networks=None) -> Params:
    """Slow weights theta = {W, Q, Z, G} as a Flax-style params dict.

    Depends only on the architecture (output units, image shape, architecture, variant,
    augmented layers, generator sizes): never on shots or query counts.

    Args:
      key: a typed PRNG key (`jax.random.key`).
      config: the model configuration.

    Returns:
      `{"base": W, "representation": Q, "example_generator": Z, "task_generator": G}`.
    """
    _builtin_only(networks)
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        raise ValueError("init expects a typed PRNG key from jax.random.key(seed)")
    kb, kq, kz, kg = (jax.random.fold_in(key, i) for i in range(4))
    b_specs, u_specs = net.base_specs(config), net.representation_specs(config)
    b_aug = net.augmented_names(config, "base")
    u_aug = net.augmented_names(config, "representation")
    b_in = config.image_shape if config.base_input == "x" else (u_specs[-1].features,)
    net_init, gen_init = config.network_init, config.generator_init
    base = net.init_network(kb, b_specs, b_in, init=net_init)
    rep = net.init_network(
        kq, u_specs, config.image_shape, extra_head=config.output_units, init=net_init
    )
    hid = config.generator_hidden
    example_gen = {
        kind: generators.init_mlp_generator(jax.random.fold_in(kz, i), hid, gen_init)
        for i, kind in enumerate(_kinds(b_specs, b_aug))
    }
    task_gen = {}
    if config.has_task_fast_weights:
        task_gen["representation"] = {
            kind: generators.init_lstm_generator(
                jax.random.fold_in(kg, i), config.lstm_hidden, gen_init
            )
            for i, kind in enumerate(_kinds(u_specs, u_aug))
        }
    if config.variant == "metanet+":
        task_gen["base"] = {
            kind: generators.init_lstm_generator(
                jax.random.fold_in(kg, 10 + i), config.lstm_hidden, gen_init
            )
            for i, kind in enumerate(_kinds(b_specs, b_aug))
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


def _map_chunks(fn, shared, args, mask: np.ndarray, specs):
    """`fn(shared, *chunk_args, weights)` for every chunk, outputs stacked on a new axis 0.

    One `vmap` over the padded chunks (`args` `[C, S, ...]`, padding at the end, `mask`
    `[C, S]` marks the real examples). A network with BatchNorm would take the padding into
    its statistics, which must span the chunk's own examples only: then, when the chunks
    differ in size, each chunk runs alone, without its padding.
    """
    if mask.all() or not net.has_batchnorm(specs):
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


def _ce_chunk_loss(specs, config, q_full, x, y, w, support_y):
    key_slow = net.apply_network(specs, q_full, x)
    logits = episode_logits(net.representation_head(q_full, key_slow), config, support_y)
    return _weighted_cross_entropy(logits, y, w)


def _contrastive(config, ea, eb, same, w):
    ea, eb = (e.astype(jnp.promote_types(e.dtype, jnp.float32)) for e in (ea, eb))
    d2 = jnp.sum(jnp.square(ea - eb), axis=-1)
    far = jax.nn.relu(config.contrastive_margin - jnp.sqrt(d2 + 1e-12))
    loss = same * d2 + (1.0 - same) * jnp.square(far)
    return jnp.sum(loss * w) / jnp.sum(w)


def _contrastive_chunk_loss(specs, config, q_full, xa, xb, same, w):
    ea = net.apply_network(specs, q_full, xa)
    eb = net.apply_network(specs, q_full, xb)
    return _contrastive(config, ea, eb, same, w)


def support_statistics(config: MetaNetConfig, specs) -> bool:
    """Whether the support-set passes through the network `specs` normalise with the whole
    support set's statistics: `bn_statistics == "authors"` and a layer has BatchNorm (without
    BatchNorm both settings run the same per-pass program)."""
    return config.bn_statistics == "authors" and net.has_batchnorm(specs)


def _support_statistics_grads(specs, params, names, x, group_loss, *group_args):
    """Per-group loss and gradient w.r.t. the subtree `names`, with whole-set statistics.

    Each group's loss (one support example, or one chunk) sees the network's output rows as
    computed in one pass over all of `x` (BatchNorm statistics of the whole set, themselves
    functions of the weights and differentiated through, as Chainer's backward does). The
    layers before the first layer of `names` do not depend on the subtree and run once on all
    of `x`; after them, when no layer normalises, the rows are independent and a group runs
    only its own rows, otherwise every group runs the whole set through the remaining layers.

    Args:
      specs: the network's layers.
      params: its slow weights.
      names: the subtree to differentiate (the augmented layers).
      x: `[N, *input]` the support inputs.
      group_loss: `(embed, *args) -> scalar`; `embed(index [S]) -> [S, F]` gives the
        network's output on those rows.
      *group_args: arrays with a leading group axis `[C, ...]`, mapped over.

    Returns:
      `(losses [C], grads {name: {"kernel": [C, *k]}})`.
    """
    start = net.first_augmented_index(specs, names)
    h = net.apply_network(specs, params, x, stop=start)
    independent = not net.has_batchnorm(specs, start)

    def loss(sub, *args):
        full = {**params, **sub}
        if independent:

            def embed(index):
                return net.apply_network(specs, full, h[index], start=start)

        else:
            out = net.apply_network(specs, full, h, start=start)

            def embed(index):
                return out[index]

        return group_loss(embed, *args)

    in_axes = (None,) + (0,) * len(group_args)
    sub = net.subtree(params, names)
    return jax.vmap(jax.value_and_grad(loss), in_axes)(sub, *group_args)


def representation_meta_info(
    rep_params: Params, support: Episode, config: MetaNetConfig, key: PRNGKey | None = None
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

    Returns:
      `(grads, losses)`: `{name: {"kernel": [C, *k]}}` per-chunk gradients w.r.t. the
      augmented subtree of Q, and the `[C]` chunk losses.
    """
    specs = net.representation_specs(config)
    aug = net.augmented_names(config, "representation")
    q_aug = net.subtree(rep_params, aug)
    x = support.x
    whole_set = support_statistics(config, specs)
    if not config.uses_contrastive:
        index, mask = chunk_layout(x.shape[0], config.rep_chunks)
        if whole_set:

            def ce_loss(embed, idx, w):
                head = net.representation_head(rep_params, embed(idx))
                logits = episode_logits(head, config, support.y)
                return _weighted_cross_entropy(logits, support.y[idx], w)

            losses, grads = _support_statistics_grads(
                specs, rep_params, aug, x, ce_loss, jnp.asarray(index), jnp.asarray(mask)
            )
            return grads, losses

        def loss(qa, xi, yi, w):
            return _ce_chunk_loss(specs, config, {**rep_params, **qa}, xi, yi, w, support.y)

        args = (x[index], support.y[index])
    else:
        if key is None:
            pairs, mask = pair_layout(x.shape[0], config.rep_chunks)
            pairs = jnp.asarray(pairs)
        else:  # T sampled pairs (i != j), one per chunk
            ki, kj = jax.random.split(key)
            n = x.shape[0]
            i = jax.random.randint(ki, (config.rep_chunks,), 0, n)
            j = jax.random.randint(kj, (config.rep_chunks,), 0, n - 1)
            j = j + (j >= i)
            pairs = jnp.stack([i, j], -1)[:, None, :]
            mask = np.ones((config.rep_chunks, 1), np.float32)
        same = (support.y[pairs[..., 0]] == support.y[pairs[..., 1]]).astype(jnp.float32)
        if whole_set:

            def pair_loss(embed, p, s, w):
                return _contrastive(config, embed(p[:, 0]), embed(p[:, 1]), s, w)

            losses, grads = _support_statistics_grads(
                specs, rep_params, aug, x, pair_loss, pairs, same, mask
            )
            return grads, losses

        def loss(qa, xa, xb, s, w):
            return _contrastive_chunk_loss(specs, config, {**rep_params, **qa}, xa, xb, s, w)

        args = (x[pairs[..., 0]], x[pairs[..., 1]], same)
    losses, grads = _map_chunks(jax.value_and_grad(loss), q_aug, args, mask, specs)
    return grads, losses


def base_meta_info(
    base_params: Params, inputs: Array, labels: Array, config: MetaNetConfig
) -> FastWeights:
    """Example-level meta information: per-example gradients of b's loss (Alg. 1, l. 7-8).

    `jax.vmap(jax.grad(...))` over the support set: one gradient per example, not one batch
    gradient. BatchNorm statistics: of the whole support set (`bn_statistics="authors"`,
    example i's loss on its row of one pass over the set) or of example i alone
    (`"per_pass"`: instance normalisation).

    Args:
      base_params: W.
      inputs: `[N, *input]` support inputs of b (x', or r' when `base_input == "r"`).
      labels: `[N]`.
      config: the configuration.

    Returns:
      `{name: {"kernel": [N, *k]}}` gradients w.r.t. the augmented subtree of W.
    """
    specs = net.base_specs(config)
    names = net.augmented_names(config, "base")
    if support_statistics(config, specs):

        def example_loss(embed, idx):
            logits = episode_logits(embed(idx), config, labels)
            return cross_entropy(logits, labels[idx])[0]

        index = jnp.arange(inputs.shape[0])[:, None]
        return _support_statistics_grads(specs, base_params, names, inputs, example_loss, index)[1]
    w_aug = net.subtree(base_params, names)

    def loss(wa, xi, yi):
        logits = net.apply_network(specs, {**base_params, **wa}, xi[None])
        return cross_entropy(episode_logits(logits, config, labels), yi[None])[0]

    return jax.vmap(jax.grad(loss), (None, 0, 0))(w_aug, inputs, labels)


def base_task_meta_info(
    base_params: Params, inputs: Array, labels: Array, config: MetaNetConfig
) -> FastWeights:
    """MetaNet+ (our reading): chunk gradients of b's task loss w.r.t. W, `[C, ...]`.

    BatchNorm statistics as in `representation_meta_info`: the whole support set's or each
    chunk's (`bn_statistics`).
    """
    specs = net.base_specs(config)
    names = net.augmented_names(config, "base")
    w_aug = net.subtree(base_params, names)
    index, mask = chunk_layout(inputs.shape[0], config.rep_chunks)
    if support_statistics(config, specs):

        def chunk_loss(embed, idx, w):
            logits = episode_logits(embed(idx), config, labels)
            return _weighted_cross_entropy(logits, labels[idx], w)

        return _support_statistics_grads(
            specs, base_params, names, inputs, chunk_loss, jnp.asarray(index), jnp.asarray(mask)
        )[1]

    def loss(wa, xi, yi, w):
        logits = episode_logits(net.apply_network(specs, {**base_params, **wa}, xi), config, labels)
        return _weighted_cross_entropy(logits, yi, w)

    return _map_chunks(jax.grad(loss), w_aug, (inputs[index], labels[index]), mask, specs)


# ----------------------------------------------------------------------------- query path
def base_learner_queries(
    base_params: Params,
    values: FastWeights,
    attention: Array,
    inputs: Array,
    config: MetaNetConfig,
    task_fast: FastWeights | None = None,
) -> Array:
    """b(W, W*_j, x_j) for every query j, with W*_j = sum_i a_ji M_i (Alg. 1, l. 13-15).

    "stacked": each augmented layer runs one conv with the N memory kernels stacked along the
    output channels and mixes the N outputs with a_j (linearity). "patches": each augmented
    conv builds W*_j and runs it as a batched matmul over the query's 3x3 patches (dense
    layers stack). "per_query": W*_j is built explicitly and b is `vmap`ped over queries
    (grouped convolutions). "auto" resolves by backend (`MetaNetConfig.resolved_query_path`).

    Args:
      base_params: W.
      values: memory values `{name: {"kernel": [N, *k]}}`.
      attention: `[L, N]`.
      inputs: `[L, *input]` query inputs of b.
      config: the configuration.
      task_fast: MetaNet+ task-level fast weights of b, or `None`.

    Returns:
      `[L, output_units]` logits.
    """
    specs = net.base_specs(config)
    path = config.resolved_query_path()
    if path in ("stacked", "patches"):
        return net.apply_network(
            specs, base_params, inputs, task_fast=task_fast, memory=values, mix=attention,
            memory_mode=path,
        )  # fmt: skip
    start = net.first_augmented_index(specs, net.augmented_names(config, "base"))
    h = net.apply_network(specs, base_params, inputs, stop=start)
    per_query = memory.read(values, attention)

    def one(hj, fast_j):
        out = net.apply_network(
            specs, base_params, hj[None], fast=fast_j, task_fast=task_fast,
            start=start, bn_axis_name="queries",
        )  # fmt: skip
        return out[0]

    return jax.vmap(one, axis_name="queries")(h, per_query)


# ----------------------------------------------------------------------------- one task
def _tree_norm(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


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

    Returns:
      `(logits [L, ways], aux)` with `attention [L, N]`, `rep_loss`, norms and entropy
      (`[L, output_units]` logits with `label_units="any"`, see `episode_logits`).
    """
    _builtin_only(networks)
    dtype = _DTYPES[config.compute_dtype]
    out_dtype = jnp.promote_types(dtype, jnp.float32)  # bfloat16 compute, float32 results
    stop = (lambda t: t) if config.second_order else lax.stop_gradient
    base, rep = params["base"], params["representation"]
    xs = support.x.astype(dtype)
    xq = query_x.astype(dtype)
    n = xs.shape[0]

    # 1-2. task level: Q* = d(G, chunk gradients of the representation loss).
    rep_grads, rep_losses = representation_meta_info(rep, Episode(xs, support.y), config, key)
    q_star = None
    if config.has_task_fast_weights:
        q_star = generators.task_fast_weights(
            params["task_generator"]["representation"], stop(rep_grads), config.grad_p, out_dtype
        )  # fmt: skip

    # 5-6. keys for the support set (memory) and the queries: one pass through u, or (the
    # authors' BatchNorm statistics) one pass for each set, each normalised by itself.
    u_specs = net.representation_specs(config)
    if support_statistics(config, u_specs):
        r_support = net.apply_network(u_specs, rep, xs, fast=q_star).astype(out_dtype)
        r_query = net.apply_network(u_specs, rep, xq, fast=q_star).astype(out_dtype)
    else:
        r_all = net.apply_network(u_specs, rep, jnp.concatenate([xs, xq]), fast=q_star)
        r_all = r_all.astype(out_dtype)
        r_support, r_query = r_all[:n], r_all[n:]
    if config.base_input == "x":
        b_support, b_query = xs, xq
    else:
        b_support, b_query = r_support.astype(dtype), r_query.astype(dtype)

    # 3-4. example level: W*_i = m(Z, per-example gradients of b's loss).
    base_grads = base_meta_info(base, b_support, support.y, config)
    values = generators.example_fast_weights(
        params["example_generator"], stop(base_grads), config.grad_p, out_dtype
    )
    task_fast = None
    if config.variant == "metanet+":
        chunk_grads = base_task_meta_info(base, b_support, support.y, config)
        task_fast = generators.task_fast_weights(
            params["task_generator"]["base"], stop(chunk_grads), config.grad_p, out_dtype
        )

    # 5, 7. memory write and attention read.
    values, mem_keys = memory.write(values, r_support)
    attention = memory.cosine_attention(r_query, mem_keys)

    # 8. augmented forward of b on the queries.
    logits = base_learner_queries(base, values, attention, b_query, config, task_fast)
    logits = episode_logits(logits, config, support.y).astype(out_dtype)
    entropy = -jnp.sum(attention * jnp.log(attention + 1e-12), axis=-1).mean()
    aux = {
        "attention": attention,
        "rep_loss": jnp.sum(rep_losses),
        "attention_entropy": entropy,
        "example_fast_weight_norm": _tree_norm(values) / np.sqrt(n),
        "task_fast_weight_norm": _tree_norm(q_star),
    }
    return logits, aux


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
