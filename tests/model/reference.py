"""An independent, loop-based MetaNet used only to check the vectorised library.

Python loops over support examples, chunks, pairs and queries; a plain `jax.grad` per
example; an explicit weighted sum of memory slots per query; coordinate-major generators
applied leaf by leaf. It shares nothing with `metanet_jax` but the params layout and the
config: the layer names and the augmented layers are read from the config here, after
METANET.md, not from `metanet_jax.networks`.

It is differentiable: `jax.grad` of `episode(...)[0]` w.r.t. the params is the outer
gradient of theta that the paper's mathematics gives (METANET.md, "Gradient flow"): the meta
information (the gradients fed to m and d) passes through `lax.stop_gradient` unless
`config.second_order`, and nothing else does; the representation loss joins the objective
when `config.rep_loss_in_objective`. No hand-written VJP is used: JAX differentiates the
plain loops (including the max-pool, here `lax.reduce_window`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BN_EPS = 1e-5
COSINE_EPS = 1e-6


def conv(h, k):
    """One example `[H, W, C]`, a 3x3 kernel `[3, 3, C, F]`, 'SAME' -> `[H, W, F]`."""
    out = lax.conv_general_dilated(
        h[None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out[0]


def pool(h):
    """2x2 max-pool, stride 2, ceil mode ('SAME'), one example `[H, W, C]`."""
    return lax.reduce_window(h, -jnp.inf, lax.max, (2, 2, 1), (2, 2, 1), "SAME")


# ----------------------------------------------------------------------------- BatchNorm
# All BatchNorm of the reference is here. Every `forward` call normalises with the statistics
# of the examples it is given; which examples pass together is `config.bn_statistics`
# (METANET.md, the authors' MetaNetPartial.py):
#                                           "per_pass"                  "authors"
#   u's representation-loss chunk          the chunk's examples (a      rows of one pass over
#                                          contrastive chunk: first     the whole support set
#                                          and second members apart)
#   b's per-example meta information       the one support example      rows of one pass over
#                                                                       the whole support set
#   b's chunks (MetaNet+ task level)       the chunk's examples         same
#   u's keys                               support and queries together support, queries apart
#   b on the queries                       the L queries                the L queries
def batch_norm(hs, bn):
    """Normalise a list of slow-path activations `[H, W, C]` (or `[D]`) with the mean and
    (biased) variance over all of them and all their positions, per channel."""
    stacked = jnp.stack(hs)
    axes = tuple(range(stacked.ndim - 1))
    mean = jnp.mean(stacked, axes)
    var = jnp.mean(jnp.square(stacked - mean), axes)
    return [(h - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"] + bn["offset"] for h in hs]


# ----------------------------------------------------------------------------- networks
def layer_names(config, which):
    """b's (`which="base"`) or u's layers up to the key, by name (METANET.md)."""
    if which == "base" and config.base_input == "r":
        return ["fc_0", "out"]  # b is an MLP on u's representation
    n_conv = 0 if config.architecture == "mlp" else config.resolved("num_conv_layers")
    convs = [f"conv_{i}" for i in range(n_conv)]
    if config.architecture == "rows_lstm":
        convs = ["lstm"]  # the rows through one LSTM (see `lstm_forward`)
    if which == "base":
        if config.architecture == "mlp":
            return [f"fc_{i}" for i in range(config.num_hidden_layers)] + ["out"]
        return convs + ["fc_0", "out"]
    if config.architecture == "mlp":
        return [f"fc_{i}" for i in range(config.num_hidden_layers - 1)] + ["key"]
    return convs + ["key"]


def augmented(config, which):
    """The augmented layers: the config's choice, else all of them, except Mini-ImageNet's
    (the last two convs and the dense layers; METANET.md)."""
    names = layer_names(config, which)
    chosen = config.augment_base if which == "base" else config.augment_representation
    if chosen is not None:
        names = [n for n in names if n in chosen]
    elif config.architecture == "mini_imagenet_cnn":
        convs = [n for n in names if n.startswith("conv")]
        names = convs[-2:] + [n for n in names if not n.startswith("conv")]
    # The LSTM's two kernels are two augmented kernels (flat names, see `flat`).
    return [k for n in names for k in ((f"{n}/input", f"{n}/recurrent") if n == "lstm" else (n,))]


def forward(names, slow, xs, fasts=None):
    """Examples `xs` (a list of `[H, W, C]` or `[D]`) through a network, one at a time but
    for BatchNorm, whose statistics span the list (see `batch_norm`).

    An augmented layer is `act(slow(h)) + sum_f act(f(h))` over the example's fast kernels
    (`fasts[i]`, a tuple of `{name: {"kernel": k}}` dicts or `None`s); `act` is ReLU, or the
    identity for the linear layers "out" and "key"; BatchNorm acts on the slow path only.
    """
    fasts = [()] * len(xs) if fasts is None else fasts
    hs = list(xs)
    for name in names:
        if name == "lstm":
            hs = [lstm_forward(slow, h, fast) for h, fast in zip(hs, fasts, strict=True)]
            continue
        is_conv = name.startswith("conv")
        if not is_conv:
            hs = [h.reshape(-1) for h in hs]

        def linear(h, k, is_conv=is_conv):
            return conv(h, k) if is_conv else h @ k

        slow_out = [linear(h, slow[name]["kernel"]) for h in hs]
        if f"bn_{name}" in slow:
            slow_out = batch_norm(slow_out, slow[f"bn_{name}"])
        new = []
        for h, s, fast in zip(hs, slow_out, fasts, strict=True):
            outs = [s] + [linear(h, f[name]["kernel"]) for f in fast if f is not None and name in f]
            if name not in ("out", "key"):
                outs = [jax.nn.relu(o) for o in outs]
            h = sum(outs[1:], outs[0])
            new.append(pool(h) if is_conv else h)
        hs = new
    return hs


def lstm_forward(slow, x, fast):
    """The rows of one image `x` `[H, W, C]` (H steps of W*C pixels) through the augmented
    LSTM, written out: gate pre-activations `z = x_t W_x + h W_h + b` plus, for each fast
    weight f of the example, `x_t f_x + h f_h` (linear augmentation, no ReLU); gates in the
    order i, f, g, o; `c = sigmoid(f) c + sigmoid(i) tanh(g)`, `h = sigmoid(o) tanh(c)`.
    Returns the last `h` `[H']`."""
    rows = x.reshape(x.shape[0], -1)
    wx, wh, b = slow["lstm/input"]["kernel"], slow["lstm/recurrent"]["kernel"], slow["lstm"]["bias"]
    hid = wh.shape[0]
    h = jnp.zeros(hid, rows.dtype)
    c = jnp.zeros(hid, rows.dtype)
    for t in range(rows.shape[0]):
        z = rows[t] @ wx + h @ wh + b
        for f in fast:
            if f is not None and "lstm/input" in f:
                z = z + rows[t] @ f["lstm/input"]["kernel"] + h @ f["lstm/recurrent"]["kernel"]
        i, fg, g, o = (z[k * hid : (k + 1) * hid] for k in range(4))
        c = jax.nn.sigmoid(fg) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h


def flat(group):
    """A network's params with nested layers flattened into `"layer/sub"` entries: the
    LSTM's `{"lstm": {"input": {"kernel"}, "recurrent": {"kernel"}, "bias"}}` becomes
    `"lstm/input"`, `"lstm/recurrent"` (each `{"kernel"}`) and `"lstm"` (`{"bias"}`); other
    layers as they are."""
    out = {}
    for name, layer in group.items():
        for key, value in layer.items():
            if isinstance(value, dict):
                out[f"{name}/{key}"] = value
            else:
                out.setdefault(name, {})[key] = value
    return out


def ce(logits, y):
    return -jax.nn.log_softmax(logits)[y]


# ----------------------------------------------------------------------------- generators
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
    """min(t, n) consecutive chunks of range(n), sizes as equal as possible, larger first."""
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


# ----------------------------------------------------------------------------- losses
def contrastive_pair_loss(ea, eb, same, margin):
    """Contrastive loss of one pair of embeddings: `|ea - eb|^2` for a pair of one class,
    `max(0, margin - |ea - eb|)^2` otherwise (Hadsell et al. 2006; the paper's pairs)."""
    d2 = jnp.sum(jnp.square(ea - eb))
    if same:
        return d2
    return jnp.square(jax.nn.relu(margin - jnp.sqrt(d2 + 1e-12)))


def support_pairs(n):
    """All pairs i < j of the support set, in order."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def support_rows(names, prm, xs, idx, config, fasts=None):
    """Outputs of support rows `idx`: rows of one pass over the whole support set `xs`
    ("authors") or one pass over those rows alone ("per_pass")."""
    if config.bn_statistics == "authors":
        outs = forward(names, prm, list(xs), fasts)
        return [outs[i] for i in idx]
    return forward(
        names, prm, [xs[i] for i in idx], None if fasts is None else [fasts[i] for i in idx]
    )


def representation_meta_info(Q, config, xs, ys):
    """Chunk gradients of u's representation loss w.r.t. u's augmented layers, and the
    chunk losses (cross-entropy through u's head, or the contrastive loss over all pairs
    cut into chunks)."""
    ways, names = config.ways, augmented(config, "representation")
    u_names = layer_names(config, "representation")
    n = len(xs)
    contrastive = config.rep_loss == "contrastive" or (
        config.rep_loss == "auto" and config.shots > 1
    )
    if not contrastive:
        groups = chunks(n, config.rep_chunks)

        def chunk_loss(q_aug, idx):
            q = {**Q, **q_aug}
            keys = support_rows(u_names, q, xs, idx, config)
            losses = [
                ce((jax.nn.relu(key) @ q["head"]["kernel"])[:ways], ys[i])
                for key, i in zip(keys, idx, strict=True)
            ]
            return sum(losses) / len(losses)
    else:
        pairs = support_pairs(n)
        groups = [[pairs[k] for k in idx] for idx in chunks(len(pairs), config.rep_chunks)]

        def chunk_loss(q_aug, chunk):
            q = {**Q, **q_aug}
            if config.bn_statistics == "authors":
                ea = support_rows(u_names, q, xs, [i for i, _ in chunk], config)
                eb = support_rows(u_names, q, xs, [j for _, j in chunk], config)
            else:
                ea = forward(u_names, q, [xs[i] for i, _ in chunk])
                eb = forward(u_names, q, [xs[j] for _, j in chunk])
            losses = [
                contrastive_pair_loss(a, b, int(ys[i]) == int(ys[j]), config.contrastive_margin)
                for a, b, (i, j) in zip(ea, eb, chunk, strict=True)
            ]
            return sum(losses) / len(losses)

    q_aug = {k: Q[k] for k in names}
    out = [jax.value_and_grad(chunk_loss)(q_aug, g) for g in groups]
    return [g for _, g in out], [v for v, _ in out]


# ----------------------------------------------------------------------------- one task
def task_outputs(params, config, xs, ys, xq):
    """Reference logits `[L, ways]`, attention `[L, N]` and summed representation loss of
    one task. `ys` are concrete labels."""
    p, ways = config.grad_p, config.ways
    stop = (lambda t: t) if config.second_order else lax.stop_gradient
    W, Q = flat(params["base"]), flat(params["representation"])
    b_names, u_names = layer_names(config, "base"), layer_names(config, "representation")
    b_aug, u_aug = augmented(config, "base"), augmented(config, "representation")
    n = xs.shape[0]
    xs_list = [xs[i] for i in range(n)]
    xq_list = [xq[j] for j in range(xq.shape[0])]

    # Task level: Q* = d(G, chunk gradients of the representation loss).
    chunk_grads, chunk_losses = representation_meta_info(Q, config, xs_list, ys)
    q_star = None
    if config.variant != "metanet-":
        q_star = task_level(params["task_generator"]["representation"], u_aug, stop(chunk_grads), p)

    # Memory keys and query keys: u with Q and Q*, support and queries in one pass (per_pass)
    # or in two (authors).
    if config.bn_statistics == "authors":
        keys = forward(u_names, Q, xs_list, [(q_star,)] * n)
        r_query = forward(u_names, Q, xq_list, [(q_star,)] * len(xq_list))
    else:
        r_all = forward(u_names, Q, xs_list + xq_list, [(q_star,)] * (n + len(xq_list)))
        keys, r_query = r_all[:n], r_all[n:]
    b_support, b_query = (xs_list, xq_list) if config.base_input == "x" else (keys, r_query)

    # Example level: per-example gradients of b's loss, one jax.grad call each; W*_i = m(Z, .).
    def ex_loss(w_aug, i):
        return ce(support_rows(b_names, {**W, **w_aug}, b_support, [i], config)[0][:ways], ys[i])

    w_aug = {k: W[k] for k in b_aug}
    values = []
    for i in range(n):
        g = stop(jax.grad(ex_loss)(w_aug, i))
        z = params["example_generator"]
        values.append({k: {"kernel": mlp_ref(z[kind(W[k]["kernel"])], g[k]["kernel"], p)}
                       for k in b_aug})  # fmt: skip

    task_fast = None
    if config.variant == "metanet+":

        def b_chunk_loss(wa, idx):
            outs = support_rows(b_names, {**W, **wa}, b_support, idx, config)
            return sum(ce(o[:ways], ys[i]) for o, i in zip(outs, idx, strict=True)) / len(idx)

        bgrads = [jax.grad(b_chunk_loss)(w_aug, idx) for idx in chunks(n, config.rep_chunks)]
        task_fast = task_level(params["task_generator"]["base"], b_aug, stop(bgrads), p)

    # Attention read per query (explicit weighted sum of the memory slots), then b.
    fasts, att_all = [], []
    for r in r_query:
        sims = jnp.stack(
            [jnp.dot(r, k) / jnp.sqrt(jnp.dot(r, r) * jnp.dot(k, k) + COSINE_EPS) for k in keys]
        )
        a = jax.nn.softmax(config.attention_scale * sims)
        fast = {}
        for name in b_aug:
            acc = 0.0
            for i in range(n):
                acc = acc + a[i] * values[i][name]["kernel"]
            fast[name] = {"kernel": acc}
        fasts.append((fast, task_fast))
        att_all.append(a)
    logits = [o[:ways] for o in forward(b_names, W, b_query, fasts)]
    return jnp.stack(logits), jnp.stack(att_all), sum(chunk_losses)


def episode(params, config, support, query):
    """Reference `(loss, logits [B, L, ways], attention [B, L, N])`: the mean over tasks of
    each task's summed query cross-entropy (+ its representation loss when
    `config.rep_loss_in_objective`). Labels must be concrete (they choose the pairs)."""
    all_logits, all_att, losses = [], [], []
    sy, qy = np.asarray(support.y), np.asarray(query.y)
    for b in range(support.x.shape[0]):
        logits, att, rep = task_outputs(params, config, support.x[b], sy[b], query.x[b])
        loss = sum(ce(logits[j], qy[b, j]) for j in range(logits.shape[0]))
        if config.rep_loss_in_objective:
            loss = loss + rep
        losses.append(loss)
        all_logits.append(logits)
        all_att.append(att)
    return sum(losses) / len(losses), jnp.stack(all_logits), jnp.stack(all_att)


def relative_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def norm_relative_error(a, b) -> float:
    """`|a - b| / |b|` over all the leaves of two pytrees (Frobenius norms); 0 when both are
    exactly zero, inf when only `b` is."""
    la = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)]
    diff = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True)))
    ref = math.sqrt(sum(float(np.sum(y**2)) for y in lb))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref
