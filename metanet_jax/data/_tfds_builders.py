"""TensorFlow Datasets builders for Omniglot (imported lazily: this module imports TFDS).

Two subclasses of TFDS's stock `omniglot` builder, each registered under its own name (the
name `omniglot` is taken by the stock builder):

* `metanet_omniglot`: the stock checksums, i.e. the original zips from Brenden Lake's GitHub
  repository. Used for TFDS's normal download and for local folders holding the originals.
* `metanet_omniglot_rebuilt`: identical except that the two full zips
  (`images_background.zip`, `images_evaluation.zip`) carry the size and sha256 of the
  *rebuilt* containers in `../shared/datasets/omniglot` (same 32,460 PNGs, different zip
  container bytes). The override lives in this class's `url_infos` only: no checksum check is
  switched off, and TFDS's installed checksum files are never written.

Both builders have one config per source zip (`background`, `evaluation`, `small1`,
`small2`), each with a single split, so that only the zips that exist are ever asked for
(the stock builder asks for all four and retries for minutes when one is missing) and a
missing zip never blocks the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import omniglot as _stock

# config name -> (key in the stock URL dict, TFDS split name of the stock builder)
PARTS: dict[str, tuple[str, str]] = {
    "background": ("train", "train"),
    "evaluation": ("eval", "test"),
    "small1": ("small1", "small1"),
    "small2": ("small2", "small2"),
}

ZIP_NAMES: dict[str, str] = {
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
}

# Size and sha256 of the rebuilt full zips in ../shared/datasets/omniglot (see its README).
REBUILT_URL_INFOS: dict[str, tuple[int, str]] = {
    "images_background.zip": (
        8588032,
        "9892d2170ed983d856e264844632d54814f01001b3731baa409c054caf292a5e",
    ),
    "images_evaluation.zip": (
        5863926,
        "d2dff634dba4546a89a69750392f44ee03fd80d7a3ab19a71f0bc8d643652ede",
    ),
}


def url(part: str) -> str:
    """The download URL of one Omniglot zip (TFDS's stock URL)."""
    return _stock._DL_URLS[PARTS[part][0]]


@dataclasses.dataclass
class OmniglotPartConfig(tfds.core.BuilderConfig):
    """One Omniglot zip as one TFDS config with one split."""

    split: str = "train"


class MetanetOmniglot(_stock.Omniglot):
    """Omniglot, one config per source zip, with the stock (original) checksums."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One config per source zip; alphabet as text, label as id."}
    BUILDER_CONFIGS = [
        OmniglotPartConfig(name=name, split=split, description=ZIP_NAMES[name])
        for name, (_, split) in PARTS.items()
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):  # the stock builder's checksums (its file lives in TFDS's package)
        return dict(_stock.Omniglot.url_infos or {})

    def _info(self) -> tfds.core.DatasetInfo:
        # The stock builder's ClassLabel features need the names of *all* 50 alphabets and
        # 1623 characters, i.e. all four zips; plain text/int features work with one zip.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_stock._DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
                    "alphabet": tfds.features.Text(),
                    "alphabet_char_id": np.int64,
                    "label": np.int64,  # global character id, 0..1622
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_stock._BASE_URL,
            citation=_stock._CITATION,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        directory = dl_manager.download_and_extract(url(cfg.name))
        return [tfds.core.SplitGenerator(name=cfg.split, gen_kwargs={"directory": directory})]


class MetanetOmniglotRebuilt(MetanetOmniglot):
    """As `MetanetOmniglot`, accepting the rebuilt full zips' size and sha256."""

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):  # scoped checksum override, see the module docstring
        infos = dict(_stock.Omniglot.url_infos or {})
        for part in ("background", "evaluation"):
            name = ZIP_NAMES[part]
            size, sha = REBUILT_URL_INFOS[name]
            infos[url(part)] = tfds.download.checksums.UrlInfo(
                size=size, checksum=sha, filename=name
            )
        return infos
