"""Captions for the text-conditioned VAR: a caption table per dataset, and the modes a toy caption allows.

**Toy datasets** know every image's attributes, so their captions are generated at graded descriptiveness; each
kind fixes a known set of modes (with the default 4 shapes x 4 colours x 2 sizes x 2 backgrounds = 64 modes)::

    kind        example                                          modes it allows
    shape       "a shape"                                        64  (nothing fixed)
    class       "a circle"                                       16  (the shape)
    attributes  "a large red circle"                              2  (shape, colour, size)
    full        "a large red circle on a striped background"      1  (everything)
    or2         "a circle or a square"                           32  (two shapes)
    or3         "a circle or a square or a triangle"             48  (three shapes)

An image's candidate captions are every kind's captions that are true of it (or2/or3: each pair/triple of shapes
that contains its own); a training step draws one per image, a kind with probability ``kind_weights[kind]``
(normalised) and uniformly within the kind. :func:`caption_modes` inverts any caption of this grammar into the
modes it allows, by the attribute words it names (a factor it does not name is free).

**Real datasets** take ``captions: {kind: file, path: <csv>}`` — a CSV with header ``path,caption``, ``path`` as in
the dataset's ``manifest.csv`` (relative to the dataset folder, POSIX separators), one or more rows per image,
every train image captioned, UTF-8, read strictly with :mod:`csv` (a caption that holds a comma is quoted:
``img.png,"a circle, striped"``; a row with more or fewer fields than the header is refused, naming file and line),
or VAR-CLIP's ``path: caption`` lines in a ``.txt`` — or ``{kind: templates, templates: ["a photo of a {}", ...]}``
over the class names (underscores read as spaces).

Files (stable; the trainer and the prompt study read them)::

    captions.json  {source, captions: [U strings], kinds: [U], n_modes: [U ints or null], split, n_images}
    captions.npz   offsets (N+1,), ids (nnz,), weights (nnz,) float64: image j's candidates are
                   ids[offsets[j]:offsets[j+1]] with those weights (sum 1); j indexes the split's manifest rows
"""
from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from varup.base.text import words_of
from varup.base.utils import atomic_npz_save, atomic_write_json, read_json
from varup.data.textfile import read_utf8, text_lines

KINDS = ("shape", "class", "attributes", "full", "or2", "or3")
DEFAULT_KIND_WEIGHTS = {k: 1.0 for k in KINDS}
BACKGROUND_WORDS = {"plain": "plain", "stripes": "striped"}


def background_word(name: str) -> str:
    return BACKGROUND_WORDS.get(name, name)


def toy_caption(kind: str, row: Mapping[str, Any], shapes: Sequence[str] = ()) -> str:
    """The caption of ``kind`` for a toy manifest row; or2/or3 name ``shapes`` (in the dataset's class order)."""
    s, c, z = row["class_name"], row["colour"], row["size"]
    if kind == "shape":
        return "a shape"
    if kind == "class":
        return f"a {s}"
    if kind == "attributes":
        return f"a {z} {c} {s}"
    if kind == "full":
        return f"a {z} {c} {s} on a {background_word(row['background'])} background"
    if kind in ("or2", "or3"):
        return " or ".join(f"a {x}" for x in shapes)
    raise ValueError(f"unknown caption kind {kind!r}; known: {', '.join(KINDS)}")


def toy_candidates(row: Mapping[str, Any], classes: Sequence[str], weights: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """(caption, kind, probability) of every caption true of the image, the kinds weighted by ``weights``."""
    out: list[tuple[str, str, float]] = []
    kinds = [k for k in KINDS if weights.get(k, 0) > 0]
    total = sum(weights[k] for k in kinds)
    for k in kinds:
        if k in ("or2", "or3"):
            n = 2 if k == "or2" else 3
            combos = [cs for cs in itertools.combinations(classes, n) if row["class_name"] in cs]
            out += [(toy_caption(k, row, cs), k, weights[k] / total / len(combos)) for cs in combos]
        else:
            out.append((toy_caption(k, row), k, weights[k] / total))
    return out


def caption_modes(caption: str, info: Mapping[str, Any]) -> np.ndarray:
    """Global mode indices (``dataset.json`` modes) a caption of the toy grammar allows: for each factor (shape,
    colour, size, background) the values it names, or all of them when it names none."""
    words = set(words_of(caption))
    factors = {"shape": list(info["classes"]), "colour": list(info["colours"]), "size": list(info["sizes"]),
               "background": list(info["backgrounds"])}
    named = {f: {v for v in vals if (background_word(v) if f == "background" else v) in words}
             for f, vals in factors.items()}
    keep = [m["index"] for m in info["modes"] if all(not named[f] or m[f] in named[f] for f in factors)]
    return np.asarray(sorted(keep), dtype=np.int64)


def _table(per_image: Sequence[Sequence[tuple[str, str, float]]]) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Distinct captions (first-seen order), their kinds, and the CSR arrays of each image's candidates."""
    index: dict[str, int] = {}
    kinds: list[str] = []
    offsets, ids, weights = [0], [], []
    for cands in per_image:
        for cap, kind, w in cands:
            if cap not in index:
                index[cap] = len(index)
                kinds.append(kind)
            ids.append(index[cap])
            weights.append(w)
        offsets.append(len(ids))
    arrays = {"offsets": np.asarray(offsets, np.int64), "ids": np.asarray(ids, np.int64),
              "weights": np.asarray(weights, np.float64)}
    return list(index), kinds, arrays


def _txt_rows(path: Path, text: str) -> Iterable[tuple[int, str, str]]:
    """(line, image path, caption) of VAR-CLIP's ``path: caption`` lines."""
    for i, line in enumerate(text_lines(text), start=1):
        if line.strip():
            p, sep, c = line.partition(":")
            if not sep or not p.strip():
                raise ValueError(f"{path}, line {i}: expected VAR-CLIP's 'path: caption', got {line.strip()!r}")
            yield i, p.strip(), c.strip()


def _csv_rows(path: Path, text: str) -> Iterable[tuple[int, str, str]]:
    """(first line, image path, caption) of each row of a CSV with the columns ``path`` and ``caption`` (others
    allowed), read strictly: a row with more fields than the header (an unquoted comma in a caption) or fewer, or
    broken quoting, is refused naming the file and line."""
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    last = 0
    try:
        for row in rows:
            line, last = last + 1, rows.line_num
            if not any(f.strip() for f in row):
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in row]
                if not {"path", "caption"} <= set(header):
                    raise ValueError(f"{path}, line {line}: expected a CSV header with columns 'path' and 'caption', "
                                     f"got {row}")
                ip, ic = header.index("path"), header.index("caption")
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {line}: {len(row)} fields, but the header has {len(header)} "
                                 f"({','.join(header)}): quote a caption that holds a comma, e.g. "
                                 f'img.png,"a circle, striped"')
            yield line, row[ip].strip(), row[ic].strip()
    except csv.Error as e:
        raise ValueError(f"{path}, line {rows.line_num}: not a valid CSV row ({e}); quote a caption that holds a "
                         f'comma or a quote mark, doubling the quote marks inside it: "a ""striped"" circle"') from None
    if header is None:
        raise ValueError(f"{path}: empty; expected a CSV header 'path,caption' and one row per caption")


def _caption_rows(path: Path) -> Iterable[tuple[int, str, str]]:
    """(line, image path, caption) of a ``path,caption`` CSV, or of VAR-CLIP's ``path: caption`` lines (.txt); the
    file must be UTF-8 (a byte that is not is named with its line)."""
    text = read_utf8(path)
    return _txt_rows(path, text) if path.suffix == ".txt" else _csv_rows(path, text)


def read_caption_file(path: str | Path, image_paths: Sequence[str]) -> list[list[tuple[str, str, float]]]:
    """Candidates per image from a ``path,caption`` CSV; every image must have at least one caption."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path} (text.captions.path)")
    by_path: dict[str, list[str]] = {}
    for i, p, c in _caption_rows(path):
        if not p:
            raise ValueError(f"{path}, line {i}: empty image path")
        if not c:
            raise ValueError(f"{path}, line {i}: empty caption for {p!r}")
        by_path.setdefault(p, []).append(c)
    missing = [p for p in image_paths if p not in by_path]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(image_paths)} images have no caption, e.g. {missing[:3]} "
                         f"(paths as in the dataset's manifest.csv)")
    return [[(c, "file", 1.0 / len(by_path[p])) for c in by_path[p]] for p in image_paths]


def template_candidates(class_names: Sequence[str], templates: Sequence[str]) -> list[list[tuple[str, str, float]]]:
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"captions.templates must be non-empty and each must contain '{{}}', got {list(templates)}")
    return [[(t.format(n.replace("_", " ")), "template", 1.0 / len(templates)) for t in templates]
            for n in class_names]


def build_caption_table(dataset_dir: str | Path, out_dir: str | Path, spec: Mapping[str, Any] | None = None,
                        split: str = "train") -> dict:
    """Write ``captions.json`` and ``captions.npz`` for ``split`` of a prepared dataset (toy or folder)."""
    from varup.data.toy import read_manifest

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    spec = dict(spec or {"kind": "toy"})
    rows = read_manifest(dataset_dir, split)
    if not rows:
        raise ValueError(f"{dataset_dir}: split {split!r} has no images to caption")
    info = read_json(dataset_dir / "dataset.json")
    kind = spec.get("kind", "toy")
    if kind == "toy":
        weights = {**DEFAULT_KIND_WEIGHTS, **dict(spec.get("kind_weights") or {})}
        per_image = [toy_candidates(r, info["classes"], weights) for r in rows]
    elif kind == "file":
        per_image = read_caption_file(spec["path"], [r["path"] for r in rows])
    elif kind == "templates":
        per_image = template_candidates([r["class_name"] for r in rows], spec["templates"])
    else:
        raise ValueError(f"captions.kind must be toy, file or templates, got {kind!r}")
    captions, kinds, arrays = _table(per_image)
    n_modes = [int(len(caption_modes(c, info))) if kind == "toy" else None for c in captions]
    meta = {"source": kind, "split": split, "n_images": len(rows), "captions": captions, "kinds": kinds,
            "n_modes": n_modes}
    atomic_npz_save(out_dir / "captions.npz", **arrays)
    atomic_write_json(out_dir / "captions.json", meta)
    return meta


class CaptionTable:
    """A dataset's caption table; ``choose(step, rows, seed)`` draws one caption id per image, a pure function of
    (seed, step, image), so a resumed run draws the same captions."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.meta = read_json(directory / "captions.json")
        with np.load(directory / "captions.npz") as z:
            self.offsets, self.ids, self.weights = z["offsets"], z["ids"], z["weights"]
        self.captions: list[str] = list(self.meta["captions"])
        if len(self.offsets) != self.meta["n_images"] + 1:
            raise ValueError(f"{directory}: captions.npz covers {len(self.offsets) - 1} images, captions.json "
                             f"{self.meta['n_images']}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def choose(self, images: Iterable[int], seed: int, step: int) -> np.ndarray:
        out = []
        for j in images:
            lo, hi = self.offsets[j], self.offsets[j + 1]
            u = np.random.default_rng([int(seed), int(step), int(j)]).random()
            k = min(int(np.searchsorted(np.cumsum(self.weights[lo:hi]), u * self.weights[lo:hi].sum(), "right")),
                    hi - lo - 1)
            out.append(self.ids[lo + k])
        return np.asarray(out, np.int64)


__all__ = ["KINDS", "toy_caption", "toy_candidates", "caption_modes", "build_caption_table", "CaptionTable",
           "read_caption_file", "template_candidates", "background_word"]
