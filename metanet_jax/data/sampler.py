"""Pure-JAX episode sampler: N-way K-shot episodes drawn on device from a class array.

Layout of every episode (support and query alike), "class-major":

* `ways` classes are drawn without replacement; the class given label `i` is the `i`-th of
  a uniformly random ordering, so the class-to-label assignment is a fresh random
  permutation per episode.
* support: `x[b, i * shots + s]` is the `s`-th example of label `i`; `y[b] = [0]*shots +
  [1]*shots + ... + [ways-1]*shots` (labels `0..ways-1`, each repeated `shots` times).
* query: the same with `queries_per_class` in place of `shots`.
* per class, `shots + queries_per_class` distinct drawers (examples) are drawn without
  replacement: the first `shots` go to the support set, the rest to the query set, so
  support and query are different drawings of the same classes.
* rotation (`rotate=True`): each class gets one random multiple of 90 degrees
  (`jnp.rot90(img, k)`, k in 0..3), the same for its support and query images. With
  `rotations_as_classes=True` the class pool is `classes * 4`: class `c + r * classes` is
  class `c` rotated by `r * 90` degrees, a class of its own (`rotate` is then ignored).
* pixel permutations (permuted MNIST, `permutations` of shape `[P, H*W]`): the pool is
  `classes * P` (`* 4` with rotations as classes); class `c + p * classes` is class `c` with
  its pixels reordered by `permutations[p]` (`x_flat[permutations[p]]`), applied on the fly.
  Index order of the pool: `c + classes * (p + P * r)`.
* translation (`translate=s > 0`, not in the paper): every image, support and query alike,
  is moved by its own random whole number of pixels in `[-s, s]` down and right (negative:
  up and left), after any rotation or permutation; pixels moved in from outside are 0 (no
  ink). An augmentation of training episodes only; evaluation episodes are never moved.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax.types import Episode


class EpisodeIndices(NamedTuple):
    """What `sample_episode_indices` drew (all `[B, ways, ...]`, label `i` at position `i`).

    Attributes:
      classes: `[B, ways]` int32, base class of each label (index into `images`' first axis).
      drawers: `[B, ways, shots + queries]` int32, example index per class (first `shots`:
        support, the rest: query), distinct within a class.
      rotations: `[B, ways]` int32, multiples of 90 degrees (`jnp.rot90` k), 0 when not rotated.
      permutations: `[B, ways]` int32, index into the pixel permutations (0 when none).
      shifts: `[B, ways, shots + queries, 2]` int32, each image's (down, right) translation
        in pixels, in `[-translate, translate]` (all 0 when not translated).
    """

    classes: jax.Array
    drawers: jax.Array
    rotations: jax.Array
    permutations: jax.Array
    shifts: jax.Array


class EpisodeShape(NamedTuple):
    """The sizes and layout of a batch of episodes: what fixes its arrays' shapes.

    Hashable, so the jitted samplers take it (or its fields) as static arguments.

    Attributes:
      ways: classes per episode (labels `0..ways-1`).
      shots: support examples per class.
      queries_per_class: query examples per class.
      batch_size: episodes per batch `B`.
      rotate: a random multiple of 90 degrees per class, the same for its support and query
        images (ignored with rotations as classes).
      rotations_as_classes: the 4 rotations of a class are 4 classes.
      translate: each image moved by up to this many pixels in each direction (0: off).
    """

    ways: int
    shots: int
    queries_per_class: int
    batch_size: int
    rotate: bool = True
    rotations_as_classes: bool = False
    translate: int = 0

    def class_pool(self, num_classes: int, num_drawers: int, num_permutations: int) -> int:
        """The classes to draw from: `num_classes * num_permutations`, times 4 with rotations
        as classes.

        Raises:
          ValueError: non-positive sizes, `ways` above the pool or `shots +
            queries_per_class` above `num_drawers`, the examples per class.
        """
        ways, shots, queries, batch = self[:4]
        if ways < 1 or shots < 1 or queries < 0 or batch < 1 or self.translate < 0:
            raise ValueError(
                f"Need ways >= 1, shots >= 1, queries_per_class >= 0, batch_size >= 1, "
                f"translate >= 0; got ways={ways}, shots={shots}, queries_per_class={queries}, "
                f"batch_size={batch}, translate={self.translate}."
            )
        pool = num_classes * num_permutations * (4 if self.rotations_as_classes else 1)
        if ways > pool:
            raise ValueError(
                f"ways={ways} is more than the {pool} classes available ({num_classes} classes "
                "before rotations/permutations)."
            )
        if shots + queries > num_drawers:
            raise ValueError(
                f"shots + queries_per_class = {shots + queries} is more than the "
                f"{num_drawers} examples per class."
            )
        return pool


@functools.partial(
    jax.jit, static_argnames=("num_classes", "num_drawers", "shape", "num_permutations")
)
def sample_episode_indices(
    key: jax.Array,
    num_classes: int,
    num_drawers: int,
    shape: EpisodeShape,
    num_permutations: int = 1,
) -> EpisodeIndices:
    """Draws the classes, examples, rotations, permutations and translations of a batch.

    Args:
      key: a PRNG key.
      num_classes: `C`, classes in the image array.
      num_drawers: `D`, examples per class.
      shape: the episodes' sizes, rotations and translation (static).
      num_permutations: `P` pixel permutations, each making `C` more classes.

    Returns:
      `EpisodeIndices`, see its docstring.
    """
    ways, shots, queries_per_class, batch_size = shape[:4]
    pool = shape.class_pool(num_classes, num_drawers, num_permutations)
    k_cls, k_drw, k_rot = jax.random.split(key, 3)
    # Without replacement, in uniformly random order: top-k of i.i.d. uniforms.
    _, pooled = jax.lax.top_k(jax.random.uniform(k_cls, (batch_size, pool)), ways)
    _, drawers = jax.lax.top_k(
        jax.random.uniform(k_drw, (batch_size, ways, num_drawers)), shots + queries_per_class
    )
    classes = pooled % num_classes
    rest = pooled // num_classes
    perms = rest % num_permutations
    if shape.rotations_as_classes:
        rotations = rest // num_permutations
    elif shape.rotate:
        rotations = jax.random.randint(k_rot, (batch_size, ways), 0, 4)
    else:
        rotations = jnp.zeros((batch_size, ways), jnp.int32)
    n = shots + queries_per_class
    if shape.translate:
        # Its own key (fold_in, not a fourth split) keeps untranslated episodes as they were.
        t = shape.translate
        shifts = jax.random.randint(jax.random.fold_in(key, 3), (batch_size, ways, n, 2), -t, t + 1)
    else:
        shifts = jnp.zeros((batch_size, ways, n, 2), jnp.int32)
    i32 = lambda a: a.astype(jnp.int32)
    return EpisodeIndices(i32(classes), i32(drawers), i32(rotations), i32(perms), i32(shifts))


def _rotation_tables(h: int, w: int) -> np.ndarray:
    """`[4, h*w]`: `x_flat[table[k]] == jnp.rot90(x, k).ravel()` (square images)."""
    grid = np.arange(h * w).reshape(h, w)
    return np.stack([np.rot90(grid, k).ravel() for k in range(4)]).astype(np.int32)


def gather_episodes(
    images: jax.Array,
    indices: EpisodeIndices,
    shots: int,
    permutations: jax.Array | None = None,
    *,
    rotate: bool = True,
    translate: int = 0,
) -> tuple[Episode, Episode]:
    """Gathers the images that `indices` names and lays them out as support and query sets.

    Only the `B * ways * (shots + queries)` needed images are gathered and converted.

    Args:
      images: `[C, D, H, W, ch]` uint8 (ink 255 -> 1.0) or float (taken as is).
      indices: from `sample_episode_indices`.
      shots: support examples per class.
      permutations: `[P, H*W]` int pixel permutations, or None.
      rotate: apply `indices.rotations` (False skips the pixel gather when there are no
        permutations either).
      translate: the largest shift of `indices.shifts` (0: the images are not moved).

    Returns:
      `(support, query)`: `Episode`s with x `[B, ways*shots, H, W, ch]` and
      `[B, ways*queries, H, W, ch]` float32, y `[B, ways*shots]` / `[B, ways*queries]` int32,
      class-major (see the module docstring).
    """
    c, d, h, w, ch = images.shape
    b, ways, n = indices.drawers.shape
    rows = indices.classes[:, :, None] * d + indices.drawers  # [B, ways, n] into C * D
    rotated = rotate and h == w
    pix = None  # per class, output pixel p reads source pixel pix[p]
    if rotated:
        pix = jnp.asarray(_rotation_tables(h, w))[indices.rotations]  # [B, ways, HW]
    if permutations is not None:
        perm = jnp.asarray(permutations, jnp.int32)[indices.permutations]  # [B, ways, HW]
        # x_flat[perm][rot] == x_flat[perm[rot]]: permute, then rotate.
        pix = perm if pix is None else jnp.take_along_axis(perm, pix, axis=-1)

    def episode(r: jax.Array, shifts: jax.Array) -> Episode:
        # One gather straight into the output layout: [B, ways, k, ...] -> [B, ways * k, ...].
        k = r.shape[-1]
        if pix is None:
            x = images.reshape(c * d, h, w, ch)[r]
        else:
            x = images.reshape(c * d, h * w, ch)[r[..., None], pix[:, :, None, :]]
        x = x.astype(jnp.float32) * (1.0 / 255.0) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        if translate:
            x = _translated(x.reshape(b, ways, k, h, w, ch), shifts, translate)
        y = jnp.broadcast_to(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), k), (b, ways * k))
        return Episode(x.reshape(b, ways * k, h, w, ch), y)

    shifts = indices.shifts  # [B, ways, shots + queries, 2], in the drawers' order
    return (
        episode(rows[:, :, :shots], shifts[:, :, :shots]),
        episode(rows[:, :, shots:], shifts[:, :, shots:]),
    )


def _translated(x: jax.Array, shifts: jax.Array, t: int) -> jax.Array:
    """`x [..., H, W, ch]` each moved by its `shifts [..., 2]` (down, right), zero fill.

    Out pixel `(i, j)` is in pixel `(i - dy, j - dx)`: a window of the image padded by `t`.
    """
    h, w, ch = x.shape[-3:]
    lead = x.shape[:-3]
    padded = jnp.pad(x.reshape(-1, h, w, ch), ((0, 0), (t, t), (t, t), (0, 0)))
    window = lambda img, s: jax.lax.dynamic_slice(img, (t - s[0], t - s[1], 0), (h, w, ch))
    return jax.vmap(window)(padded, shifts.reshape(-1, 2)).reshape(*lead, h, w, ch)


# The arguments that fix the batch's shapes (`EpisodeShape`'s fields) are static.
@functools.partial(jax.jit, static_argnames=EpisodeShape._fields)
def sample_episodes(
    key: jax.Array,
    images: jax.Array,
    ways: int,
    shots: int,
    queries_per_class: int,
    batch_size: int,
    *,
    rotate: bool = True,
    rotations_as_classes: bool = False,
    translate: int = 0,
    permutations: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> tuple[Episode, Episode]:
    """Samples a batch of N-way K-shot episodes on device (jitted; sizes are static).

    Keep `images` on device (`jax.device_put(split.images)`) so that no call copies it.

    Args:
      key: a PRNG key (`jax.random.key(0)`); the same key gives the same episodes.
      images: `[C, D, H, W, ch]` uint8 (ink 255 maps to 1.0) or float in [0, 1].
      ways: classes per episode (labels `0..ways-1`).
      shots: support examples per class.
      queries_per_class: query examples per class.
      batch_size: episodes per batch `B`.
      rotate: rotate each class by a random multiple of 90 degrees, the same for its support
        and query images (the authors' protocol). Needs square images.
      rotations_as_classes: the 4 rotations of each class are distinct classes instead.
      translate: move every image by its own random whole number of pixels, up to this many
        in each direction, zero fill (0: off; a training augmentation, not in the paper).
      permutations: `[P, H*W]` int pixel permutations (`pixel_permutations`), making `C * P`
        classes (permuted MNIST); None for none.
      rows: `[R]` int, only these episodes of the batch (a process's own tasks,
        `parallel.sample_process_episodes`): bitwise the same as the whole batch's rows, but
        only their images are gathered (the indices of the whole batch are drawn, which is
        cheap). None: all `B`.

    Returns:
      `(support, query)` `Episode`s: x `[B, ways*shots, H, W, ch]` and
      `[B, ways*queries_per_class, H, W, ch]` float32 in [0, 1]; y int32 `[B, ways*shots]`
      and `[B, ways*queries_per_class]`, class-major (module docstring); `R` in place of `B`
      with `rows`.

    Raises:
      ValueError: `ways` above the available classes, `shots + queries_per_class` above the
        examples per class, or non-positive sizes.
    """
    c, d, h, w = images.shape[:4]
    if (rotate or rotations_as_classes) and h != w:
        raise ValueError(f"Rotations need square images, got {h}x{w}; pass rotate=False.")
    shape = EpisodeShape(
        ways, shots, queries_per_class, batch_size, rotate, rotations_as_classes, translate
    )
    num_perms = 1 if permutations is None else int(permutations.shape[0])
    indices = sample_episode_indices(key, c, d, shape, num_perms)
    if rows is not None:
        indices = jax.tree.map(lambda a: a[rows], indices)
    return gather_episodes(
        images, indices, shots, permutations, rotate=rotate or rotations_as_classes,
        translate=translate,
    )  # fmt: skip


def pixel_permutations(
    seed: int,
    num_permutations: int,
    image_shape: tuple[int, int] = (28, 28),
    *,
    include_identity: bool = True,
) -> np.ndarray:
    """Seeded pixel permutations for permuted MNIST (`10 * P` classes from 10 digits).

    Args:
      seed: `numpy.random.default_rng(seed)` draws permutation `p` as `rng.permutation(H*W)`.
      num_permutations: `P`.
      image_shape: `(H, W)`.
      include_identity: permutation 0 is the identity (the original digits are classes 0..9).

    Returns:
      `[P, H*W]` int32.
    """
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}.")
    n = int(np.prod(image_shape))
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(num_permutations)]
    if include_identity:
        perms[0] = np.arange(n)
    return np.stack(perms).astype(np.int32)


def fixed_eval_episodes(
    seed: int,
    images: jax.Array | np.ndarray,
    ways: int,
    shots: int,
    queries_per_class: int,
    num_episodes: int,
    batch_size: int,
    *,
    rotate: bool = False,
    **options,
) -> Iterator[tuple[Episode, Episode]]:
    """A fixed, seeded set of evaluation episodes, in batches: same seed, same episodes.

    Batch `i` is `sample_episodes(jax.random.fold_in(jax.random.key(seed), i), ...)`; the last
    batch holds the remaining `num_episodes % batch_size` episodes when that is not zero.
    Iterating again recomputes the same batches (nothing is stored).

    Args:
      seed: integer seed of the episode set.
      images: `[C, D, H, W, ch]` class array (moved to device once).
      ways, shots, queries_per_class: episode sizes.
      num_episodes: total episodes (e.g. 400 trials as in the paper).
      batch_size: episodes per yielded batch.
      rotate: default False: evaluation classes are not rotated.
      **options: `sample_episodes`' other keywords (`rotations_as_classes`, `permutations`).

    Yields:
      `(support, query)` with leading axis `min(batch_size, remaining)`.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}.")
    images = jax.device_put(images)
    base = jax.random.key(seed)
    for i, start in enumerate(range(0, num_episodes, batch_size)):
        size = min(batch_size, num_episodes - start)
        yield sample_episodes(
            jax.random.fold_in(base, i),
            images,
            ways,
            shots,
            queries_per_class,
            size,
            rotate=rotate,
            **options,
        )


@functools.partial(jax.jit, static_argnames=("ways", "units"))
def spread_labels(
    key: jax.Array, support: Episode, query: Episode, ways: int, units: int
) -> tuple[Episode, Episode]:
    """Gives each episode's classes distinct labels drawn at random from `0..units-1`.

    Label `i` of episode `b` becomes `labels[b, i]`, the `i`-th of `ways` distinct values of
    `range(units)` in uniformly random order (top-k of i.i.d. uniforms), in support and query
    alike. With `MetaNetConfig.label_units="any"` this trains every output unit of a model with
    `max_ways = units`, not only the first `ways`.

    Args:
      key: a PRNG key.
      support, query: a batch from `sample_episodes`, labels `[B, n]` in `0..ways-1`.
      ways: classes per episode.
      units: the labels' range (>= ways).

    Returns:
      `(support, query)` with the same images and relabelled `y`.
    """
    b = support.y.shape[0]
    if units < ways:
        raise ValueError(f"units={units} must be >= ways={ways}")
    _, labels = jax.lax.top_k(jax.random.uniform(key, (b, units)), ways)
    relabel = lambda y: jnp.take_along_axis(labels.astype(jnp.int32), y, axis=1)
    return Episode(support.x, relabel(support.y)), Episode(query.x, relabel(query.y))
