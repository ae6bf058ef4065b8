"""An independent, loop-based MetaNet used only to check the vectorised library.

Python loops over support examples, chunks and queries; a plain `jax.grad` per example; an
explicit weighted sum of memory slots per query; coordinate-major generators applied leaf by
leaf. It shares nothing with `metanet_jax` but the params layout and the config.

BatchNorm (`bn_<layer>` in the params: the slow path, before the ReLU) normalises over the
examples of one `forward_set` call, with explicit sums and a two-pass variance. Which
examples pass together is `config.bn_statistics` (METANET.md, the authors' MetaNetPartial.py):
"authors": each support example's meta-gradient and each chunk's representation loss are
taken on their rows of one pass over the whole support set; the support keys and the query
keys come from two passes. "per_pass": one pass per example, per chunk, and one pass over the
support set and the queries together for the keys. The queries through b: one pass over the
query set. (The library pads unequal chunks with copies of example 0, which a per-pass chunk's
statistics then include; this reference does not model that: use equal chunks with BatchNorm.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def conv(h, k):
    return lax.conv_general_dilated(
        h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def pool(h):
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


def layer_names(config, which):
    n_conv = 0 if config.architecture == "mlp" else config.resolved("num_conv_layers")
    convs = [f"conv_{i}" for i in range(n_conv)]
    if which == "base":
        if config.architecture == "mlp":
            return [f"fc_{i}" for i in range(config.num_hidden_layers)] + ["out"]
        return convs + ["fc_0", "out"]
    if config.architecture == "mlp":
        return [f"fc_{i}" for i in range(config.num_hidden_layers - 1)] + ["key"]
    return convs + ["key"]


def batch_norm(outs, scale, offset, eps=1e-5):
    """Normalise every `[1, ..., C]` activation in `outs` with the per-channel mean and biased
    variance over all examples and positions of `outs`."""
    rows = [o.reshape(-1, o.shape[-1]) for o in outs]
    count = sum(r.shape[0] for r in rows)
    mean = sum(r.sum(0) for r in rows) / count
    var = sum(jnp.square(r - mean).sum(0) for r in rows) / count
    return [(o - mean) / jnp.sqrt(var + eps) * scale + offset for o in outs]


def forward_set(names, slow, xs, fasts=None):
    """Examples `xs` (`[H, W, C]` or `[D]` each) through a network in one pass: BatchNorm
    layers normalise over all of `xs`; `fasts[e]` is example e's tuple of kernel dicts."""
    fasts = [()] * len(xs) if fasts is None else fasts
    hs = [x[None] for x in xs]
    for name in names:
        is_conv = name.startswith("conv")
        slow_outs, fast_outs = [], []
        for h, f_e in zip(hs, fasts, strict=True):
            h = h if is_conv else h.reshape(1, -1)
            op = conv if is_conv else jnp.matmul
            slow_outs.append(op(h, slow[name]["kernel"]))
            fast_outs.append([op(h, f[name]["kernel"]) for f in f_e if f is not None and name in f])
        if f"bn_{name}" in slow:
            bn = slow[f"bn_{name}"]
            slow_outs = batch_norm(slow_outs, bn["scale"], bn["offset"])
        new = []
        for s_o, f_o in zip(slow_outs, fast_outs, strict=True):
            outs = [s_o] + f_o
            if name not in ("out", "key"):
                outs = [jax.nn.relu(o) for o in outs]
            h = sum(outs[1:], outs[0])
            new.append(pool(h) if is_conv else h)
        hs = new
    return [h[0] for h in hs]


def forward_one(names, slow, x, fasts=()):
    """One example `[H, W, C]` (or `[D]`) through a network; `fasts` are kernel dicts."""
    return forward_set(names, slow, [x], [fasts])[0]


def augmented(config, which):
    """The augmented layers: the config's list, else all of them, except Mini-ImageNet's
    network (the last two convs and the dense layers)."""
    chosen = config.augment_base if which == "base" else config.augment_representation
    names = layer_names(config, which)
    if chosen is not None:
        return [n for n in names if n in chosen]
    if config.architecture == "mini_imagenet_cnn":
        convs = [n for n in names if n.startswith("conv")]
        return convs[-2:] + [n for n in names if not n.startswith("conv")]
    return names


def ce(logits, y):
    return -jax.nn.log_softmax(logits)[y]


def preprocess(g, p):
    return jnp.stack(
        [jnp.maximum(jnp.log(jnp.abs(g) + 1e-12) / p, -1.0), jnp.clip(g * math.exp(p), -1, 1)],
        -1,
    )


def mlp_ref(z, g, p):
    """Coordinate-major m on one gradient leaf (any shape)."""
    x = preprocess(g.reshape(-1), p)  # [P, 2]
    h = jax.nn.relu(x @ z["dense_0"]["kernel"] + z["dense_0"]["bias"])
    h = jax.nn.relu(h @ z["dense_1"]["kernel"] + z["dense_1"]["bias"])
    out = h @ z["dense_2"]["kernel"] + z["dense_2"]["bias"]
    return out[:, 0].reshape(g.shape)


def lstm_ref(gp, gseq, p):
    """Coordinate-major d on one leaf's gradient sequence `[T, *shape]`."""
    shape = gseq.shape[1:]
    xs = [preprocess(g.reshape(-1), p) for g in gseq]
    hid = gp["recurrent_kernel"].shape[0]
    h = jnp.zeros((xs[0].shape[0], hid))
    c = jnp.zeros_like(h)
    for x in xs:
        z = x @ gp["input_kernel"] + h @ gp["recurrent_kernel"] + gp["bias"]
        i, f, g, o = (z[:, k * hid : (k + 1) * hid] for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h @ gp["out_kernel"] + gp["out_bias"])[:, 0].reshape(shape)


def kind(k):
    return "conv" if k.ndim == 4 else "dense"


def chunks(n, t):
    c = min(n, t)
    sizes = [n // c + (1 if i < n % c else 0) for i in range(c)]
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def task_level(gen, names, chunk_grads, p):
    """Task-level fast weights: d applied leaf by leaf to each layer's chunk-gradient sequence."""
    return {
        k: {
            "kernel": lstm_ref(
                gen[kind(chunk_grads[0][k]["kernel"])],
                jnp.stack([g[k]["kernel"] for g in chunk_grads]),
                p,
            )
        }
        for k in names
    }


def task_logits(params, config, xs, ys, xq):
    """Reference logits `[L, ways]` and attention `[L, N]` of one task (CE rep loss)."""
    p = config.grad_p
    ways = config.ways
    W, Q = params["base"], params["representation"]
    b_names, u_names = layer_names(config, "base"), layer_names(config, "representation")
    b_aug, u_aug = augmented(config, "base"), augmented(config, "representation")
    n = xs.shape[0]
    authors = config.bn_statistics == "authors"

    def support_rows(names, prm, idx):
        """Outputs of support rows `idx`: of one pass over the whole support set (authors) or
        of one pass over those rows alone (per_pass)."""
        if authors:
            outs = forward_set(names, prm, list(xs))
            return [outs[i] for i in idx]
        return forward_set(names, prm, [xs[i] for i in idx])

    # Task-level meta info: one gradient per chunk, the chunk's mean CE through u's head.
    def chunk_loss(q_aug, idx):
        q = {**Q, **q_aug}
        losses = []
        for i, key in zip(idx, support_rows(u_names, q, idx), strict=True):
            logits = jax.nn.relu(key) @ q["head"]["kernel"]
            losses.append(ce(logits[:ways], ys[i]))
        return sum(losses) / len(losses)

    q_aug = {k: Q[k] for k in u_aug}
    chunk_grads = [jax.grad(chunk_loss)(q_aug, idx) for idx in chunks(n, config.rep_chunks)]
    q_star = None
    if config.variant != "metanet-":
        q_star = task_level(params["task_generator"]["representation"], u_aug, chunk_grads, p)

    # Example-level: per-example gradients, one jax.grad call each.
    def ex_loss(w_aug, i):
        return ce(support_rows(b_names, {**W, **w_aug}, [i])[0][:ways], ys[i])

    w_aug = {k: W[k] for k in b_aug}
    values = []
    for i in range(n):
        g = jax.grad(ex_loss)(w_aug, i)
        values.append(
            {
                k: {
                    "kernel": mlp_ref(
                        params["example_generator"][kind(W[k]["kernel"])], g[k]["kernel"], p
                    )
                }  # fmt: skip
                for k in b_aug
            }
        )

    task_fast = None
    if config.variant == "metanet+":

        def b_chunk_loss(wa, idx):
            outs = support_rows(b_names, {**W, **wa}, idx)
            return sum(ce(o[:ways], ys[i]) for o, i in zip(outs, idx, strict=True)) / len(idx)

        bgrads = [jax.grad(b_chunk_loss)(w_aug, idx) for idx in chunks(n, config.rep_chunks)]
        task_fast = task_level(params["task_generator"]["base"], b_aug, bgrads, p)

    # Keys: the support set and the queries in two passes (authors) or in one (per_pass).
    length = xq.shape[0]
    if authors:
        keys = forward_set(u_names, Q, list(xs), [(q_star,)] * n)
        query_keys = forward_set(u_names, Q, list(xq), [(q_star,)] * length)
    else:
        both = forward_set(u_names, Q, list(xs) + list(xq), [(q_star,)] * (n + length))
        keys, query_keys = both[:n], both[n:]
    att_all, fasts = [], []
    for r in query_keys:
        sims = jnp.stack(
            [jnp.dot(r, k) / jnp.sqrt(jnp.dot(r, r) * jnp.dot(k, k) + 1e-6) for k in keys]
        )
        a = jax.nn.softmax(sims)
        fast = {}
        for name in b_aug:
            acc = 0.0
            for i in range(n):
                acc = acc + a[i] * values[i][name]["kernel"]
            fast[name] = {"kernel": acc}
        fasts.append((fast, task_fast))
        att_all.append(a)
    # The queries through b: one pass over the query set, each with its own fast weights.
    logits_all = [o[:ways] for o in forward_set(b_names, W, list(xq), fasts)]
    return jnp.stack(logits_all), jnp.stack(att_all)


def episode(params, config, support, query):
    """Reference `(loss, logits [B, L, ways], attention [B, L, N])`."""
    all_logits, all_att, losses = [], [], []
    for b in range(support.x.shape[0]):
        logits, att = task_logits(params, config, support.x[b], support.y[b], query.x[b])
        losses.append(sum(ce(logits[j], query.y[b, j]) for j in range(logits.shape[0])))
        all_logits.append(logits)
        all_att.append(att)
    return sum(losses) / len(losses), jnp.stack(all_logits), jnp.stack(all_att)


def relative_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
