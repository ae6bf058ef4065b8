"""Fast-weight generators: gradient preprocessing, m (example level) and d (task level).

Both generators are coordinate-wise: every parameter coordinate of the augmented layers is an
independent input, and all coordinates share the generator's weights. The code keeps one
generator for conv kernels and one for dense kernels (authors' code); so do we.

Generators are pure functions `(gen_params, meta_info) -> fast_weights`, where `meta_info`
and the output mirror the augmented kernels of a network's params (`{..., layer: {"kernel":
...}}`, nested as the network's modules are), the meta
information with a leading axis (N support examples for m, T chunks for d).

Layout: the inputs keep coordinates on the *last* axis (`[features, P]`). Internally the MLP
stays feature-major and the LSTM works coordinate-major (`[P, 4H]`), whichever measured faster.

Two implementations compute m and d (`kernel=`): "xla" (the JAX code below, the reference, on
every backend) and "fused" (float32 C++ kernels for the CPU, `metanet_jax.kernels`: each
coordinate's MLP or LSTM steps in registers, backward by recomputation; reverse mode only, no
reverse-over-reverse). `MetaNetConfig.generator_kernel` chooses (`resolved_generator_kernel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax.types import Array, FastWeights, Params

LOG_EPS = 1e-12
KERNELS = ("xla", "fused")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown generator kernel {kernel!r}; expected one of {KERNELS}")


def preprocess_gradients(g: Array, p: float = 7.0) -> Array:
    """Gradient preprocessing of Andrychowicz et al. (2016), paper section 3.1 (p = 7).

    `g -> (max(log(|g| + eps) / p, -1), clip(g * e^p, -1, 1))`.

    Args:
      g: gradients of any shape `[...]`.
      p: the preprocessing's p.

    Returns:
      `[2, ...]`: the two features, stacked on a new leading axis.
    """
    magnitude = jnp.maximum(jnp.log(jnp.abs(g) + LOG_EPS) / p, -1.0)
    sign = jnp.clip(g * np.exp(p), -1.0, 1.0)
    return jnp.stack([magnitude, sign], axis=0)


# ----------------------------------------------------------------------------- init
def init_mlp_generator(key: Array, hidden: int = 20, init: str = "small") -> Params:
    """m's weights for one kind of coordinate: a 2 -> hidden -> hidden -> 1 MLP (ReLU).

    Args:
      key: a PRNG key.
      hidden: the hidden width (20 in the paper).
      init: "small" (He-normal hidden layers, output layer scaled by 0.01/sqrt(hidden): fast
        weights start as a small perturbation of the slow path) or "authors" (Chainer v1's
        `L.Linear` default, as the authors' code: every weight N(0, 1/fan_in), biases 0).
    """
    k1, k2, k3 = jax.random.split(key, 3)
    if init == "authors":
        scales = (np.sqrt(1.0 / 2), np.sqrt(1.0 / hidden), np.sqrt(1.0 / hidden))
    elif init == "small":
        scales = (np.sqrt(2.0 / 2), np.sqrt(2.0 / hidden), 0.01 / np.sqrt(hidden))
    else:
        raise ValueError(f"unknown generator init {init!r}; expected 'small' or 'authors'")
    return {
        "dense_0": {
            "kernel": jax.random.normal(k1, (2, hidden)) * scales[0],
            "bias": jnp.zeros((hidden,)),
        },
        "dense_1": {
            "kernel": jax.random.normal(k2, (hidden, hidden)) * scales[1],
            "bias": jnp.zeros((hidden,)),
        },
        "dense_2": {
            "kernel": jax.random.normal(k3, (hidden, 1)) * scales[2],
            "bias": jnp.zeros((1,)),
        },
    }


def init_lstm_generator(key: Array, hidden: int = 20, init: str = "small") -> Params:
    """d's weights for one kind of coordinate: LSTM(2 -> hidden) and a linear map to 1.

    Gate order (i, f, g, o).

    Args:
      key: a PRNG key.
      hidden: the LSTM's hidden size (20 in the paper).
      init: "small" (forget-gate bias 1, output map scaled by 0.01/sqrt(hidden)) or
        "authors" (Chainer v1's `L.LSTM` and `L.Linear` defaults, as the authors' code: every
        weight N(0, 1/fan_in), biases 0, forget-gate bias 0).
    """
    k1, k2, k3 = jax.random.split(key, 3)
    if init == "authors":
        bias = jnp.zeros((4 * hidden,))
        out_scale = np.sqrt(1.0 / hidden)
    elif init == "small":
        bias = jnp.zeros((4 * hidden,)).at[hidden : 2 * hidden].set(1.0)
        out_scale = 0.01 / np.sqrt(hidden)
    else:
        raise ValueError(f"unknown generator init {init!r}; expected 'small' or 'authors'")
    return {
        "input_kernel": jax.random.normal(k1, (2, 4 * hidden)) * np.sqrt(1.0 / 2),
        "recurrent_kernel": jax.random.normal(k2, (hidden, 4 * hidden)) * np.sqrt(1.0 / hidden),
        "bias": bias,
        "out_kernel": jax.random.normal(k3, (hidden, 1)) * out_scale,
        "out_bias": jnp.zeros((1,)),
    }


# ----------------------------------------------------------------------------- coordinate-wise nets
# Both generators dominate the train step's time on CPU, where they are bound by memory traffic
# (XLA does not fuse the small matmuls with the elementwise math). They therefore carry
# hand-written VJPs that store no activations: the backward pass recomputes the forward from the
# inputs, which costs a few cheap FLOPs and saves writing and re-reading [hidden, coordinates]
# arrays. The features' cotangent is computed by a separate matmul, so XLA removes it when the
# features are under `stop_gradient` (first-order mode). Both are reverse-mode only (custom_vjp:
# no `jax.jvp`/`jacfwd` through them); reverse-over-reverse works.
# Measured (2-core CPU, float32, fwd+bwd w.r.t. params, medians, side by side): LSTM at
# T=5, P=152k: 1163 -> 779-815 ms; MLP at M=760k: 541-600 -> 280-290 ms. See the commit message.

# The MLP runs on blocks of this many coordinates, unrolled in Python (not in a loop: XLA's CPU
# while loops run ~3x slower), so that a block's [hidden, block] intermediates stay in cache.
_MLP_BLOCK = 96 * 1024


def _mlp_weights(params: Params, dtype):
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return (
        cast(params["dense_0"]["kernel"]),
        cast(params["dense_0"]["bias"]),
        cast(params["dense_1"]["kernel"]),
        cast(params["dense_1"]["bias"]),
        cast(params["dense_2"]["kernel"])[:, 0],
        cast(params["dense_2"]["bias"])[0],
    )


def _mlp_hidden(w0, b0, w1, b1, x):
    """Feature-major hidden layers: `x [2, M] -> (h1, h2)`, both `[hidden, M]`."""
    # Two input features: an outer-product sum fuses better than a K=2 matmul.
    h1 = jax.nn.relu(w0[0][:, None] * x[0] + w0[1][:, None] * x[1] + b0[:, None])
    h2 = jax.nn.relu(w1.T @ h1 + b1[:, None])
    return h1, h2


@jax.custom_vjp
def _mlp_core(w0, b0, w1, b1, w2, b2, x):
    _, h2 = _mlp_hidden(w0, b0, w1, b1, x)
    return w2 @ h2 + b2


def _mlp_core_fwd(w0, b0, w1, b1, w2, b2, x):
    return _mlp_core(w0, b0, w1, b1, w2, b2, x), (w0, b0, w1, b1, w2, x)


def _mlp_core_bwd(res, dy):
    w0, b0, w1, b1, w2, x = res
    h1, h2 = _mlp_hidden(w0, b0, w1, b1, x)  # recomputed, not stored
    dh2 = jnp.where(h2 > 0, w2[:, None] * dy[None, :], 0)
    dh1 = jnp.where(h1 > 0, w1 @ dh2, 0)
    return (
        x @ dh1.T,  # dw0 [2, H]
        dh1.sum(1),
        h1 @ dh2.T,  # dw1 [H, H]
        dh2.sum(1),
        h2 @ dy,  # dw2 [H]
        dy.sum(),
        w0 @ dh1,  # dx [2, M]: dead code unless the features need a gradient
    )


_mlp_core.defvjp(_mlp_core_fwd, _mlp_core_bwd)


def mlp_generator(params: Params, features: Array, kernel: str = "xla") -> Array:
    """m on preprocessed coordinates: `[2, M] -> [M]` (paper eq. for W*_i = m(Z, grad_i)).

    Args:
      params: one MLP's weights (`init_mlp_generator`).
      features: `[2, M]` preprocessed gradient coordinates.
      kernel: "xla" (this module's JAX code) or "fused" (`metanet_jax.kernels.mlp_core`:
        float32 features on the CPU, the kernels built; reverse mode only).

    Returns:
      `[M]` fast-weight coordinates.
    """
    _check_kernel(kernel)
    weights = _mlp_weights(params, features.dtype)
    if kernel == "fused":
        from metanet_jax import kernels

        return kernels.mlp_core(*weights, features)
    m = features.shape[-1]
    if m <= _MLP_BLOCK:
        return _mlp_core(*weights, features)
    nblocks = -(-m // _MLP_BLOCK)
    size = -(-m // nblocks)  # equal blocks, the last one possibly shorter
    outs = [_mlp_core(*weights, features[:, s : s + size]) for s in range(0, m, size)]
    return jnp.concatenate(outs, axis=-1)


def _sigmoid(x):
    """sigmoid(x) = (1 + tanh(x / 2)) / 2: XLA's CPU backend evaluates it faster than
    `jax.nn.sigmoid`'s exp and divide."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _lstm_step(wx, wh, b, x, h, c):
    """One coordinate-major LSTM step: `x [2, P]`, `h, c [P, H]` or None (zero state)."""
    z = x[0][:, None] * wx[0] + x[1][:, None] * wx[1] + b  # [P, 4H]
    if h is not None:
        z = z + h @ wh
    i, f, g, o = jnp.split(z, 4, axis=1)
    i, f, g, o = _sigmoid(i), _sigmoid(f), jnp.tanh(g), _sigmoid(o)
    c = i * g if c is None else f * c + i * g
    h = o * jnp.tanh(c)
    return (i, f, g, o), h, c


def _lstm_forward(wx, wh, b, features, keep: bool):
    h = c = None
    hs, cs, gates = [], [], []
    for t in range(features.shape[0]):
        acts, h, c = _lstm_step(wx, wh, b, features[t], h, c)
        if keep:
            hs.append(h)
            cs.append(c)
            gates.append(acts)
    return h, hs, cs, gates


@jax.custom_vjp
def _lstm_core(wx, wh, b, wo, bo, features):
    h, *_ = _lstm_forward(wx, wh, b, features, keep=False)
    return h @ wo + bo


def _lstm_core_fwd(wx, wh, b, wo, bo, features):
    return _lstm_core(wx, wh, b, wo, bo, features), (wx, wh, b, wo, features)


def _lstm_core_bwd(res, dy):
    wx, wh, b, wo, features = res
    _, hs, cs, gates = _lstm_forward(wx, wh, b, features, keep=True)  # recomputed
    dwo = hs[-1].T @ dy
    dh = dy[:, None] * wo
    dwx = dwh = db = dc = None
    dfeat = [None] * features.shape[0]
    for t in reversed(range(features.shape[0])):
        i, f, g, o = gates[t]
        tc = jnp.tanh(cs[t])
        dc_t = dh * o * (1 - tc * tc)
        dc = dc_t if dc is None else dc + dc_t
        df = dc * cs[t - 1] * f * (1 - f) if t > 0 else jnp.zeros_like(dc)
        dz = jnp.concatenate(
            [dc * g * i * (1 - i), df, dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=1
        )  # [P, 4H]
        x = features[t]
        dwx = x @ dz if dwx is None else dwx + x @ dz
        db = dz.sum(0) if db is None else db + dz.sum(0)
        dfeat[t] = (dz @ wx.T).T  # dead code unless the features need a gradient
        if t > 0:
            dwh = hs[t - 1].T @ dz if dwh is None else dwh + hs[t - 1].T @ dz
            dh = dz @ wh.T
            dc = dc * f
    if dwh is None:  # a single step: no recurrent term
        dwh = jnp.zeros_like(wh)
    return dwx, dwh, db, dwo, dy.sum(), jnp.stack(dfeat)


_lstm_core.defvjp(_lstm_core_fwd, _lstm_core_bwd)


def lstm_generator(params: Params, features: Array, kernel: str = "xla") -> Array:
    """d on preprocessed coordinate sequences: `[T, 2, P] -> [P]` (paper: Q* = d(G, {grad_t})).

    A coordinate-wise LSTM (every coordinate an independent sequence of T steps, all sharing
    G), followed by a linear map of the last hidden state to one value. The T steps are
    unrolled (T is small and static), which XLA fuses better than a `scan` here. Internally
    the state is coordinate-major (`[P, 4H]`, `h @ W`), which measured faster than
    feature-major for forward + backward on CPU.

    Args:
      params: one LSTM's weights (`init_lstm_generator`).
      features: `[T, 2, P]` preprocessed gradients, one row per chunk.
      kernel: "xla" (this module's JAX code) or "fused" (`metanet_jax.kernels.lstm_core`:
        float32 features on the CPU, the kernels built; reverse mode only).

    Returns:
      `[P]` fast-weight coordinates.
    """
    _check_kernel(kernel)
    dtype = features.dtype
    if kernel == "fused":
        from metanet_jax import kernels

        core = kernels.lstm_core
    else:
        core = _lstm_core
    return core(
        params["input_kernel"].astype(dtype),
        params["recurrent_kernel"].astype(dtype),
        params["bias"].astype(dtype),
        params["out_kernel"].astype(dtype)[:, 0],
        params["out_bias"].astype(dtype)[0],
        features,
    )


# ----------------------------------------------------------------------------- pytrees
# The trees mirror the augmented params of any network (nested as its modules are); their
# leaves are the kernels, with `lead` leading axes (N examples, T chunks). A leaf's kind is
# its kernel's rank: 4 (conv, HWIO) or 2 (dense). The generators are coordinate-wise, so the
# order in which the leaves are concatenated changes nothing but the layout.
def _kind(kernel: Array, lead: int) -> str:
    return "conv" if kernel.ndim - lead == 4 else "dense"


def kinds_in(tree: FastWeights, lead: int = 0) -> tuple[str, ...]:
    """Which generator kinds ("conv", "dense") a subtree needs."""
    kinds = {_kind(leaf, lead) for leaf in jax.tree.leaves(tree)}
    return tuple(k for k in ("conv", "dense") if k in kinds)


def _generate(tree: FastWeights, lead: int, generate) -> FastWeights:
    """Applies `generate(kind, flat [*lead, P]) -> [*out_lead, P]` to the leaves of each kind,
    concatenated, and puts the results back in the tree's structure."""
    leaves, treedef = jax.tree.flatten(tree)
    out = list(leaves)
    for kind in kinds_in(tree, lead):
        index = [i for i, leaf in enumerate(leaves) if _kind(leaf, lead) == kind]
        lead_shape = leaves[index[0]].shape[:lead]
        flat = jnp.concatenate([leaves[i].reshape(lead_shape + (-1,)) for i in index], axis=-1)
        values = generate(kind, flat).astype(flat.dtype)
        offset = 0
        for i in index:
            shape = leaves[i].shape[lead:]
            size = int(np.prod(shape))
            out[i] = values[..., offset : offset + size].reshape(values.shape[:-1] + shape)
            offset += size
    return jax.tree.unflatten(treedef, out)


def example_fast_weights(
    gen_params: Params, meta_info: FastWeights, p: float = 7.0, dtype=None, kernel: str = "xla"
) -> FastWeights:
    """Example-level fast weights W*_i = m(Z, grad_W loss_i) (paper, eq. 2 / Alg. 1 line 9).

    Args:
      gen_params: Z, `{"conv": mlp, "dense": mlp}` (kinds that occur).
      meta_info: `{..., layer: {"kernel": [N, *k]}}` per-example gradients of b's loss
        (mirroring b's augmented params).
      p: preprocessing constant.
      dtype: compute dtype of the generator (default: the gradients' dtype).
      kernel: "xla" or "fused" (`mlp_generator`).

    Returns:
      `{..., layer: {"kernel": [N, *k]}}`: the memory values M = [W*_1 .. W*_N].
    """

    def generate(kind, flat):  # [N, P] -> [N, P]
        feats = preprocess_gradients(flat.reshape(-1), p)
        if dtype is not None:
            feats = feats.astype(dtype)
        return mlp_generator(gen_params[kind], feats, kernel).reshape(flat.shape[0], -1)

    return _generate(meta_info, 1, generate)


def task_fast_weights(
    gen_params: Params, meta_info: FastWeights, p: float = 7.0, dtype=None, kernel: str = "xla"
) -> FastWeights:
    """Task-level fast weights Q* = d(G, {grad_Q loss_t}_{t=1..T}) (paper, eq. 1 / Alg. 1 l. 5).

    Args:
      gen_params: G's part for this learner, `{"conv": lstm, "dense": lstm}`.
      meta_info: `{..., layer: {"kernel": [T, *k]}}` chunk gradients of the representation loss
        (or of b's task loss, for MetaNet+).
      p: preprocessing constant.
      dtype: compute dtype of the generator (default: the gradients' dtype).
      kernel: "xla" or "fused" (`lstm_generator`).

    Returns:
      `{..., layer: {"kernel": k}}` shaped like the augmented slow subtree.
    """

    def generate(kind, flat):  # [T, P] -> [P]
        feats = jnp.moveaxis(preprocess_gradients(flat, p), 0, 1)  # [T, 2, P]
        if dtype is not None:
            feats = feats.astype(dtype)
        return lstm_generator(gen_params[kind], feats, kernel)

    return _generate(meta_info, 1, generate)
