"""An independent, loop-based MetaNet used only to check the vectorised library.

Python loops over support examples, chunks and queries; a plain `jax.grad` per example; an
explicit weighted sum of memory slots per query; coordinate-major generators applied leaf by
leaf. It shares nothing with `metanet_jax` but the params layout and the config.
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


def forward_one(names, slow, x, fasts=()):
    """One example `[H, W, C]` (or `[D]`) through a network; `fasts` are kernel dicts."""
    h = x[None]
    for name in names:
        linear = name in ("out", "key")
        if name.startswith("conv"):
            outs = [conv(h, slow[name]["kernel"])] + [
                conv(h, f[name]["kernel"]) for f in fasts if f is not None and name in f
            ]
        else:
            h = h.reshape(1, -1)
            outs = [h @ slow[name]["kernel"]] + [
                h @ f[name]["kernel"] for f in fasts if f is not None and name in f
            ]
        if not linear:
            outs = [jax.nn.relu(o) for o in outs]
        h = sum(outs[1:], outs[0])
        if name.startswith("conv"):
            h = pool(h)
    return h[0]


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
    n = xs.shape[0]

    # Task-level meta info: one gradient per chunk, the chunk's mean CE through u's head.
    def chunk_loss(q_aug, idx):
        q = {**Q, **q_aug}
        losses = []
        for i in idx:
            key = forward_one(u_names, q, xs[i])
            logits = jax.nn.relu(key) @ q["head"]["kernel"]
            losses.append(ce(logits[:ways], ys[i]))
        return sum(losses) / len(losses)

    q_aug = {k: Q[k] for k in u_names}
    chunk_grads = [jax.grad(chunk_loss)(q_aug, idx) for idx in chunks(n, config.rep_chunks)]
    q_star = None
    if config.variant != "metanet-":
        q_star = task_level(params["task_generator"]["representation"], u_names, chunk_grads, p)

    # Example-level: per-example gradients, one jax.grad call each.
    def ex_loss(w_aug, x, y):
        return ce(forward_one(b_names, {**W, **w_aug}, x)[:ways], y)

    w_aug = {k: W[k] for k in b_names}
    values = []
    for i in range(n):
        g = jax.grad(ex_loss)(w_aug, xs[i], ys[i])
        values.append(
            {
                k: {
                    "kernel": mlp_ref(
                        params["example_generator"][kind(W[k]["kernel"])], g[k]["kernel"], p
                    )
                }  # fmt: skip
                for k in b_names
            }
        )

    task_fast = None
    if config.variant == "metanet+":

        def b_chunk_loss(wa, idx):
            return sum(ex_loss(wa, xs[i], ys[i]) for i in idx) / len(idx)

        bgrads = [jax.grad(b_chunk_loss)(w_aug, idx) for idx in chunks(n, config.rep_chunks)]
        task_fast = task_level(params["task_generator"]["base"], b_names, bgrads, p)

    keys = [forward_one(u_names, Q, xs[i], (q_star,)) for i in range(n)]
    logits_all, att_all = [], []
    for j in range(xq.shape[0]):
        r = forward_one(u_names, Q, xq[j], (q_star,))
        sims = jnp.stack(
            [jnp.dot(r, k) / jnp.sqrt(jnp.dot(r, r) * jnp.dot(k, k) + 1e-6) for k in keys]
        )
        a = jax.nn.softmax(sims)
        fast = {}
        for name in b_names:
            acc = 0.0
            for i in range(n):
                acc = acc + a[i] * values[i][name]["kernel"]
            fast[name] = {"kernel": acc}
        logits_all.append(forward_one(b_names, W, xq[j], (fast, task_fast))[:ways])
        att_all.append(a)
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
