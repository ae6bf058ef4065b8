"""Episode sampler invariants, on small synthetic class arrays (and one real one)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metanet_jax import Episode, data

C, D, S = 6, 8, 6  # classes, drawers, image side


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (C, D, S, S, 1), dtype=np.uint8)


def _identify(img, images, permutations=None):
    """(class, drawer, rotation, permutation) of an output image, by exhaustive search."""
    perms = [np.arange(S * S)] if permutations is None else list(permutations)
    hits = []
    for c, d, k, p in itertools.product(range(C), range(D), range(4), range(len(perms))):
        src = images[c, d, ..., 0].ravel()[perms[p]].reshape(S, S)
        if np.array_equal(np.rot90(src, k), img[..., 0]):
            hits.append((c, d, k, p))
    assert len(hits) == 1, hits
    return hits[0]


def _as_uint8(x):
    return np.rint(np.asarray(x) * 255).astype(np.uint8)


def test_shapes_labels_and_layout(images):
    s, q = data.sample_episodes(jax.random.key(0), jnp.asarray(images), 4, 2, 3, 5)
    assert isinstance(s, Episode) and isinstance(q, Episode)
    assert s.x.shape == (5, 8, S, S, 1) and q.x.shape == (5, 12, S, S, 1)
    assert s.x.dtype == jnp.float32 and s.y.dtype == jnp.int32 and q.y.dtype == jnp.int32
    assert 0.0 <= float(s.x.min()) and float(s.x.max()) <= 1.0
    np.testing.assert_array_equal(s.y, np.broadcast_to(np.repeat(np.arange(4), 2), (5, 8)))
    np.testing.assert_array_equal(q.y, np.broadcast_to(np.repeat(np.arange(4), 3), (5, 12)))
    for b in range(5):
        assert np.all(np.bincount(np.asarray(s.y[b]), minlength=4) == 2)
        assert np.all(np.bincount(np.asarray(q.y[b]), minlength=4) == 3)


def _check_episodes(s, q, images, ways):
    """Each episode's images, identified in the class array: one class and one rotation per
    label (support and queries alike), all different drawings, classes without replacement.
    Returns the rotations seen."""
    sx, qx = _as_uint8(s.x), _as_uint8(q.x)
    rotations = set()
    for b in range(sx.shape[0]):
        seen_classes = []
        for label in range(ways):
            sup = [_identify(x, images) for x in sx[b][np.asarray(s.y[b]) == label]]
            qry = [_identify(x, images) for x in qx[b][np.asarray(q.y[b]) == label]]
            assert sup and qry
            ids = {(c, k) for c, _, k, _ in sup + qry}
            assert len(ids) == 1  # one class, one rotation for its support and query images
            drawers = [d for _, d, _, _ in sup + qry]
            assert len(set(drawers)) == len(drawers)  # all different drawings
            ((c, k),) = ids
            seen_classes.append(c)
            rotations.add(k)
        assert len(set(seen_classes)) == ways  # classes without replacement
    return rotations


@pytest.mark.parametrize("rotate", [True, False])
def test_support_query_same_classes_disjoint_drawers_consistent_rotation(images, rotate):
    s, q = data.sample_episodes(jax.random.key(1), jnp.asarray(images), 5, 2, 3, 4, rotate=rotate)
    rotations = _check_episodes(s, q, images, 5)
    assert rotations == ({0, 1, 2, 3} if rotate else {0})


def test_rotations_as_classes(images):
    key = jax.random.key(2)
    s, q = data.sample_episodes(key, jnp.asarray(images), 4 * C, 1, 1, 2, rotations_as_classes=True)
    for b in range(2):
        found = {_identify(x, images)[::2] for x in _as_uint8(s.x[b])}
        assert found == set(itertools.product(range(C), range(4)))  # every (class, rotation)
    with pytest.raises(ValueError, match="ways"):
        data.sample_episodes(
            key, jnp.asarray(images), 4 * C + 1, 1, 1, 2, rotations_as_classes=True
        )


def test_permutations(images):
    perms = data.pixel_permutations(3, 3, (S, S))
    s, _ = data.sample_episodes(
        jax.random.key(3),
        jnp.asarray(images),
        3 * C,
        1,
        1,
        2,
        rotate=False,
        permutations=jnp.asarray(perms),
    )
    for b in range(2):
        found = {(c, p) for c, _, k, p in (_identify(x, images, perms) for x in _as_uint8(s.x[b]))}
        assert found == set(itertools.product(range(C), range(3)))


def _moved(img, dy, dx):
    """The loop reference of a translation: out[i, j] = img[i - dy, j - dx], else 0."""
    out = np.zeros_like(img)
    for i, j in itertools.product(range(img.shape[0]), range(img.shape[1])):
        if 0 <= i - dy < img.shape[0] and 0 <= j - dx < img.shape[1]:
            out[i, j] = img[i - dy, j - dx]
    return out


@pytest.mark.parametrize("rotate", [False, True])
def test_translation_moves_each_image_by_its_own_shift(images, rotate):
    # The translation has its own key: the same key with translate=0 draws the same classes,
    # drawers and rotations, so each moved image is the unmoved one shifted by its indices.
    imgs, key, t = jnp.asarray(images), jax.random.key(4), 2
    ways, shots, queries, batch = 3, 2, 3, 4
    moved = data.sample_episodes(key, imgs, ways, shots, queries, batch, rotate=rotate, translate=t)
    still = data.sample_episodes(key, imgs, ways, shots, queries, batch, rotate=rotate)
    shape = data.EpisodeShape(ways, shots, queries, batch, rotate, False, t)
    shifts = np.asarray(data.sample_episode_indices(key, C, D, shape).shifts)
    assert shifts.shape == (batch, ways, shots + queries, 2)
    assert set(np.unique(shifts)) == set(range(-t, t + 1))  # every shift, both directions
    for m, first, k in ((moved[0], still[0], 0), (moved[1], still[1], shots)):
        np.testing.assert_array_equal(m.y, first.y)
        n = m.x.shape[1] // ways
        for b, i in itertools.product(range(batch), range(m.x.shape[1])):
            dy, dx = shifts[b, i // n, k + i % n]
            expected = _moved(np.asarray(first.x[b, i]), dy, dx)
            np.testing.assert_array_equal(np.asarray(m.x[b, i]), expected)
    # Untranslated episodes: no shift drawn, the images as gathered.
    unshifted = data.sample_episode_indices(key, C, D, shape._replace(translate=0)).shifts
    assert not np.any(np.asarray(unshifted))


def test_determinism_and_label_permutation(images):
    imgs = jnp.asarray(images)
    a = data.sample_episodes(jax.random.key(7), imgs, 3, 1, 2, 8)
    b = data.sample_episodes(jax.random.key(7), imgs, 3, 1, 2, 8)
    c = data.sample_episodes(jax.random.key(8), imgs, 3, 1, 2, 8)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a[0].x, c[0].x)
    idx = data.sample_episode_indices(jax.random.key(7), C, D, data.EpisodeShape(3, 1, 2, 64))
    assert len(set(np.asarray(idx.classes[:, 0]).tolist())) > 1  # label 0 is any class


def test_jit_with_traced_key_and_vmap_free(images):
    # Jitted, the key a tracer: the episodes are still made of the class array's images
    # with the sampler's invariants (identified image by image).
    imgs = jnp.asarray(images)
    f = jax.jit(lambda k: data.sample_episodes(k, imgs, 3, 2, 2, 6))
    s, q = f(jax.random.key(0))
    assert s.x.shape == (6, 6, S, S, 1) and q.x.shape == (6, 6, S, S, 1)
    rotations = _check_episodes(s, q, images, 3)
    assert len(rotations) > 1
    s2, _ = f(jax.random.key(1))
    assert not np.array_equal(s2.x, s.x)  # the traced key is used


def test_bad_input(images):
    imgs, key = jnp.asarray(images), jax.random.key(0)
    with pytest.raises(ValueError, match="ways"):
        data.sample_episodes(key, imgs, C + 1, 1, 1, 2)
    with pytest.raises(ValueError, match="shots \\+ queries_per_class"):
        data.sample_episodes(key, imgs, 2, 5, 4, 2)
    with pytest.raises(ValueError, match="square"):
        data.sample_episodes(key, imgs[:, :, :, :4], 2, 1, 1, 2)
    with pytest.raises(ValueError):
        data.sample_episodes(key, imgs, 2, 0, 1, 2)
    with pytest.raises(ValueError, match="translate"):
        data.sample_episodes(key, imgs, 2, 1, 1, 2, translate=-1)


def test_fixed_eval_episodes(images):
    a = list(data.fixed_eval_episodes(5, images, 3, 1, 2, num_episodes=10, batch_size=4))
    b = list(data.fixed_eval_episodes(5, images, 3, 1, 2, num_episodes=10, batch_size=4))
    c = list(data.fixed_eval_episodes(6, images, 3, 1, 2, num_episodes=10, batch_size=4))
    assert [s.x.shape[0] for s, _ in a] == [4, 4, 2]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a[0][0].x, c[0][0].x)
    # Not rotated by default.
    for x in _as_uint8(a[0][0].x[0]):
        assert _identify(x, images)[2] == 0


def test_real_omniglot_episode(omniglot_parts):
    imgs = jax.device_put(omniglot_parts["evaluation"].images)
    s, q = data.sample_episodes(jax.random.key(0), imgs, 5, 1, 10, 16)
    assert s.x.shape == (16, 5, 28, 28, 1) and q.x.shape == (16, 50, 28, 28, 1)
    assert float(s.x.max()) == 1.0 and float(jnp.median(q.x)) == 0.0
    with pytest.raises(ValueError, match="shots \\+ queries_per_class"):
        data.sample_episodes(jax.random.key(0), imgs, 5, 1, 20, 16)
    with pytest.raises(ValueError, match="ways"):
        data.sample_episodes(jax.random.key(0), imgs, 660, 1, 1, 1, rotate=False)


def test_spread_labels_draws_distinct_units_and_keeps_classes(images):
    ways, units, batch = 3, 7, 64
    support, query = data.sample_episodes(jax.random.key(0), images, ways, 1, 2, batch)
    s2, q2 = data.spread_labels(jax.random.key(1), support, query, ways, units)
    np.testing.assert_array_equal(s2.x, support.x)
    np.testing.assert_array_equal(q2.x, query.x)
    sy, qy, s2y, q2y = (np.asarray(a) for a in (support.y, query.y, s2.y, q2.y))
    seen = set()
    for b in range(batch):
        mapping = {}  # old label -> new label, from the support set
        for old, new in zip(sy[b], s2y[b], strict=True):
            assert mapping.setdefault(old, new) == new
        assert len(set(mapping.values())) == ways  # distinct
        assert all(0 <= v < units for v in mapping.values())
        assert [mapping[o] for o in qy[b]] == list(q2y[b])  # queries follow their class
        seen |= set(mapping.values())
    assert seen == set(range(units))  # every unit is used somewhere in 64 episodes
    with pytest.raises(ValueError, match="units=2 must be >= ways=3"):
        data.spread_labels(jax.random.key(1), support, query, ways, 2)
